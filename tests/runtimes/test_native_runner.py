"""The native ExecuTorch runner, difftx-et-runner: parity with the Python runtime, its report, errors and builds.

Everything runs for real: the runner is compiled with g++ (and cross-compiled for aarch64, then run under QEMU)
into a fresh cache. A missing compiler or QEMU skips with the apt package to install, and fails under CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import unavailable

from difftx_edge.runtimes import native
from difftx_edge.runtimes.native import BINARY, NativeRunner

AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"  # installed with g++-aarch64-linux-gnu (libc6-arm64-cross)


class Tokens(torch.nn.Module):
    """Int64 tokens (1, 16) -> logits (1, 10): an embedding outside XNNPACK, a linear inside it."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(32, 24)
        self.linear = torch.nn.Linear(24, 10)

    def forward(self, x):
        return self.linear(self.embedding(x).mean(dim=1))


class Features(torch.nn.Module):
    """Float (2, 4, 8) -> (2, 4, 3), all in XNNPACK."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 32)
        self.b = torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def lowered(module, example, path):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = to_edge_transform_and_lower(torch.export.export(module.eval(), (example,)),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    with open(path, "wb") as f:
        program.write_to_file(f)
    return path


def int8_portable(example, path):
    """Tokens quantized with PT2E and not lowered, so the quantize/dequantize ops run as portable kernels."""
    import executorch.kernels.quantized  # noqa: F401  (registers the out variants of quantize/dequantize)
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from executorch.exir import to_edge
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = torch.export.export(Tokens().eval(), (example,)).module()
    graph = prepare_pt2e(graph, XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)))
    for _ in range(4):
        graph(torch.randint(0, 32, example.shape))
    graph = convert_pt2e(graph)
    with open(path, "wb") as f:
        to_edge(torch.export.export(graph, (example,))).to_executorch().write_to_file(f)
    return path


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """name -> (.pte path, a function making one input batch from a seed)."""
    out = tmp_path_factory.mktemp("programs")
    tokens = torch.randint(0, 32, (1, 16))
    return {
        "tokens": (lowered(Tokens(), tokens, out / "tokens.pte"),
                   lambda seed: [np.random.default_rng(seed).integers(0, 32, (1, 16), dtype=np.int64)]),
        "features": (lowered(Features(), torch.randn(2, 4, 8), out / "features.pte"),
                     lambda seed: [np.random.default_rng(seed).standard_normal((2, 4, 8), dtype=np.float32)]),
        "int8-portable": (int8_portable(tokens, out / "int8.pte"),
                          lambda seed: [np.random.default_rng(seed).integers(0, 32, (1, 16), dtype=np.int64)]),
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache, so that builds (and the aarch64 download) happen from scratch."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFTX_EDGE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def host_build(cache):
    """(directory, seconds the first build took)."""
    reason = native.problem("host")
    if reason:
        unavailable(reason)
    start = time.perf_counter()
    directory = native.build("host")
    return directory, time.perf_counter() - start


def python_runtime(path, batches):
    """The outputs of ExecuTorch's Python runtime, one thread, for each batch."""
    import executorch.kernels.quantized  # noqa: F401  (registers the quantize/dequantize kernels)
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    _unsafe_reset_threadpool(1)
    method = Runtime.get().load_program(path).load_method("forward")
    return [[o.numpy().copy() for o in method.execute([torch.from_numpy(x) for x in batch])] for batch in batches]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tokens", "features", "int8-portable"])
def test_outputs_equal_the_python_runtime_bit_for_bit(programs, host_build, name):
    path, make = programs[name]
    batches = [make(seed) for seed in range(5)]
    expected = python_runtime(path, batches)
    runner = NativeRunner(path, threads=1)
    for batch, want in zip(batches, expected):
        got = runner.run(batch)
        assert len(got) == len(want) == 1
        assert got[0].dtype == np.float32 and got[0].shape == want[0].shape
        np.testing.assert_array_equal(got[0], want[0])
    # All batches in one process, through --input/--output.
    for got, want in zip(runner.run_batches(batches), expected):
        np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.slow
def test_output_file_holds_each_batch_in_order_then_timing_runs(programs, host_build, tmp_path):
    path, make = programs["tokens"]
    batches = [make(seed) for seed in range(3)]
    (tmp_path / "in.bin").write_bytes(b"".join(batch[0].tobytes() for batch in batches))
    report = NativeRunner(path).measure(warmup=1, runs=2, input_file=tmp_path / "in.bin",
                                        output_file=tmp_path / "out.bin")
    assert report["batches"] == 3 and len(report["times_ms"]) == 2
    written = np.fromfile(tmp_path / "out.bin", dtype="<f4").reshape(3, 1, 10)
    np.testing.assert_array_equal(written, np.stack([want[0] for want in python_runtime(path, batches)]))


@pytest.mark.slow
def test_measure_reports_times_memory_and_progress(programs, host_build):
    path, _ = programs["tokens"]
    seen = []
    report = NativeRunner(path).measure(warmup=2, runs=40, progress=lambda i, of: seen.append((i, of)))
    assert report["runner"] == "native" and report["threads"] == 1 and report["batches"] == 1
    assert len(report["times_ms"]) == 40 and all(t > 0 for t in report["times_ms"])
    assert report["load_ms"] > 0 and report["first_inference_ms"] > 0
    assert 0 < report["baseline_rss_kb"] <= report["peak_rss_kb"] < 100 * 1024
    assert report["inputs"] == [{"dtype": "int64", "shape": [1, 16]}]
    assert report["outputs"] == [{"dtype": "float32", "shape": [1, 10]}]
    assert seen[-1] == (40, 40) and 10 <= len(seen) <= 21  # about 20 updates, not one per run

    seen.clear()
    report = NativeRunner(path).measure(warmup=0, seconds=0.05, progress=lambda i, of: seen.append((i, of)))
    # The runner stops once its timed runs add up to 50 ms; each time is printed rounded to 0.1 us.
    assert len(report["times_ms"]) >= 3 and sum(report["times_ms"]) >= 50 - 5e-5 * len(report["times_ms"])
    assert seen and all(of is None for _, of in seen)

    assert NativeRunner(programs["features"][0], threads=2).measure(warmup=0, runs=1)["threads"] == 2


@pytest.mark.slow
def test_bad_input_is_a_one_line_error(programs, host_build, tmp_path):
    path, _ = programs["tokens"]
    runner = NativeRunner(path)
    (tmp_path / "short.bin").write_bytes(bytes(100))
    (tmp_path / "truncated.pte").write_bytes(path.read_bytes()[:3000])
    cases = [
        (lambda: NativeRunner(tmp_path / "missing.pte"), "cannot read model"),
        (lambda: runner.measure(warmup=0, runs=1, input_file=tmp_path / "short.bin"),
         r"holds 100 bytes, not a multiple of one batch \(128 bytes\)"),
        (lambda: runner.run([np.zeros((1, 16), dtype=np.int32)]), r"must be int64 \[1, 16\], got int32"),
        (lambda: NativeRunner(tmp_path / "truncated.pte"), "InvalidProgram"),
        (lambda: runner.measure(warmup=0, runs=1, seconds=1.0), "runs or seconds"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    # The CLI itself: usage errors exit 2 with one line on stderr and nothing on stdout.
    result = subprocess.run([str(runner.binary), "--model", str(path), "--input", str(tmp_path / "short.bin")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{BINARY}: error: ")


@pytest.mark.slow
def test_build_is_cached_relocatable_and_atomic(programs, host_build, cache, tmp_path, monkeypatch):
    directory, first_build_s = host_build
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [BINARY, *(f"lib{name}.so" for name in native.LIBRARIES)])
    mtime = (directory / BINARY).stat().st_mtime_ns
    start = time.perf_counter()
    assert native.build("host") == directory
    assert (directory / BINARY).stat().st_mtime_ns == mtime and time.perf_counter() - start < first_build_s / 2

    # The directory runs from anywhere: the binary finds its libraries through $ORIGIN, not the wheel.
    moved = shutil.copytree(directory, tmp_path / "moved")
    env = {key: value for key, value in os.environ.items() if key != "LD_LIBRARY_PATH"}
    result = subprocess.run([str(moved / BINARY), "--model", str(programs["tokens"][0]), "--runs", "1"],
                            capture_output=True, text=True, env=env, check=True)
    assert result.stderr == "" and len(json.loads(result.stdout)["times_ms"]) == 1

    # A failed compile raises one line naming its log, and leaves neither a build nor a temp directory behind.
    broken = tmp_path / "runner.cpp"
    broken.write_text("#error planted failure\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    before = set((cache / "native").iterdir())
    with pytest.raises(ValueError, match=r"compiling difftx-et-runner for host failed .* in (\S+\.log)$") as error:
        native.build("host")
    assert "\n" not in str(error.value)
    log = (cache / "native").joinpath(str(error.value).rsplit("/", 1)[-1])
    assert "planted failure" in log.read_text()
    assert set((cache / "native").iterdir()) - before == {log}


@pytest.fixture(scope="module")
def aarch64_build(cache):
    reason = native.problem("aarch64")
    if reason:
        unavailable(reason)
    start = time.perf_counter()
    directory = native.build("aarch64")
    return directory, time.perf_counter() - start


@pytest.mark.slow
def test_aarch64_cross_build_is_all_aarch64(aarch64_build):
    directory, _ = aarch64_build
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted([BINARY, *(f"lib{name}.so" for name in native.LIBRARIES)])
    for name in names:
        assert native.elf_machine(directory / name) == 183, name  # EM_AARCH64


@pytest.mark.slow
def test_aarch64_runner_matches_the_python_runtime_under_qemu(programs, aarch64_build, tmp_path):
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if qemu is None:
        unavailable("qemu-aarch64 is not installed: apt-get install qemu-user-static")
    directory, _ = aarch64_build
    path, make = programs["features"]
    batches = [make(seed) for seed in range(4)]
    (tmp_path / "in.bin").write_bytes(b"".join(batch[0].tobytes() for batch in batches))
    report = native.invoke(native.command(directory, path, input_file=tmp_path / "in.bin",
                                          output_file=tmp_path / "out.bin", runs=3,
                                          prefix=[qemu, "-L", AARCH64_SYSROOT]))
    assert report["batches"] == 4 and len(report["times_ms"]) == 3
    got = np.fromfile(tmp_path / "out.bin", dtype="<f4").reshape(4, 2, 4, 3)
    # ARM's NEON kernels sum in another order than x86's: equal to rounding, not bit for bit.
    np.testing.assert_allclose(got, np.stack([want[0] for want in python_runtime(path, batches)]), atol=1e-5)


def test_one_client_builds_every_command_line():
    """Every caller (NativeRunner, the local and ssh targets, the aarch64 check) gets its command line here: the
    binary under a directory that may be a board's, and the flags the runner parses."""
    argv = native.command("/tmp/difftx-edge.x/native", "/tmp/difftx-edge.x/job1/model.pte", threads=2, warmup=3,
                          seconds=1.5, input_file="in.bin", output_file="out.bin", progress=True,
                          prefix=["qemu-aarch64", "-L", AARCH64_SYSROOT])
    assert argv == ["qemu-aarch64", "-L", AARCH64_SYSROOT, f"/tmp/difftx-edge.x/native/{BINARY}", "--model",
                    "/tmp/difftx-edge.x/job1/model.pte", "--threads", "2", "--warmup", "3", "--seconds", "1.5",
                    "--input", "in.bin", "--output", "out.bin", "--progress"]
    assert native.command("d", "m.pte", runs=4) == [f"d/{BINARY}", "--model", "m.pte", "--threads", "1",
                                                   "--warmup", "0", "--runs", "4"]
    with pytest.raises(ValueError, match="runs or seconds"):
        native.command("d", "m.pte", runs=4, seconds=1.0)


def test_stderr_gives_progress_and_the_error_line():
    seen = []
    lines = ['{"progress": 2, "of": 4}\n', "E 00:00 loader said something\n", '{"progress": 4, "of": null}\n',
             f"{BINARY}: error: cannot read model m.pte\n"]
    assert native.read_stderr(lines, lambda done, of: seen.append((done, of))) == "cannot read model m.pte"
    assert seen == [(2, 4), (4, None)]
    assert native.read_stderr(lines[:2]) == "E 00:00 loader said something"
    assert native.read_stderr([]) is None


def test_module_imports_only_stdlib_and_numpy():
    # Loaded as a file, apart from its parent package: this module must work where torch is absent.
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('native', {str(native.__file__)!r})\n"
            "module = sys.modules['native'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'executorch', 'difftx_edge')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
