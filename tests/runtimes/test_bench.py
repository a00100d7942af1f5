"""The benchmark harness: every field in the results, failures as rows, honest memory, and the SSH target.

The SSH tests run against a real sshd on 127.0.0.1 (``conftest.sshd``),
started with throw-away keys; the "board" is this machine, reached the way
a Raspberry Pi is.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difftx_edge.convert import ExportConfig, export_run
from difftx_edge.hashing import sha256_tree
from difftx_edge.quantize import QuantConfig, quantize
from difftx_edge.runtimes.bench import BenchConfig, bench
from difftx_edge.runtimes.results import CSV_FIELDS
from difftx_edge.runtimes.targets import make_target
from difftx_edge.tasks import TaskConfig
from difftx_edge.train import TrainConfig, train

ROW_FIELDS = {"source", "bundle", "attention", "format", "precision", "runtime", "runner", "target", "emulated",
              "device", "threads", "batch", "seq_len", "input_shape", "status", "error", "load_ms",
              "first_inference_ms", "min_ms", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "runs", "times_ms",
              "throughput_per_s", "peak_rss_mb", "import_baseline_mb", "artifact_bytes", "accuracy", "info"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A small and a large digits model (d_model 32 and 256), the small one exported to every runnable format."""
    root = tmp_path_factory.mktemp("bench")
    found = {}
    for name, d_model in (("small", 32), ("large", 256)):
        run = root / f"run_{name}"
        train(TrainConfig(out=str(run), epochs=2, threads=2), TaskConfig("digits"),
              {"d_model": d_model, "n_heads": 4, "n_layers": 2}, progress=False)
        formats = "executorch,litert,onnx" if name == "small" else "onnx,executorch"
        export_run(ExportConfig(run=str(run), out=str(root / name), format=formats, precision="fp32",
                                parity_batches=2, threads=2))
        if name == "small":
            quantize(QuantConfig(run=str(run), backend="litert", method="ptq", calib_batches=4, threads=2),
                     progress=False)
            export_run(ExportConfig(run=str(run), out=str(root / name), format="litert", precision="int8",
                                    parity_batches=2, threads=2))
            int8_io_bundle(run, root / name / "litert-int8", root / "int8_io" / "litert-int8")
            found["int8_io/litert-int8"] = root / "int8_io" / "litert-int8"
        found[f"run_{name}"] = run
        for bundle in (root / name).iterdir():
            found[f"{name}/{bundle.name}"] = bundle
    return found


def int8_io_bundle(run: Path, bundle: Path, out: Path) -> None:
    """``bundle`` with its int8 program converted as litert-torch does by default, without strict QDQ: the
    input and output tensors are then int8 with a scale and zero point, which a runner has to handle."""
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig as LiteRTQuantConfig

    from difftx_edge.convert import FORMATS
    from difftx_edge.convert.bundle import MANIFEST, artifact_io
    from difftx_edge.convert.litert import unfold_int8_weights
    from difftx_edge.quantize import get_quantizer_spec, load_quantized
    from difftx_edge.quantize.api import int8_dir

    program, _ = load_quantized(int8_dir(run, "litert"))
    shutil.copytree(bundle, out)
    config = LiteRTQuantConfig(pt2e_quantizer=get_quantizer_spec("litert").quantizer(qat=False))
    litert_torch.convert(unfold_int8_weights(program.module()), (torch.zeros(1, 16, 4),),
                         quant_config=config).export(str(out / "model.tflite"))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest.update(artifact_io(FORMATS["litert"], out / "model.tflite", {}, manifest["inputs"], manifest["outputs"]))
    (out / MANIFEST).write_text(json.dumps(manifest))
    rehash(out)  # a new file: bench checks the hash it opens


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "difftx_edge", *args], capture_output=True, text=True, timeout=900)


def one_line_error(done: subprocess.CompletedProcess, needle: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert needle in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]


def rehash(bundle: Path) -> None:
    """Make a bundle's manifest vouch for its (broken) artifact: a damaged file is refused before any row runs,
    and these tests are about the runtime rejecting one."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifact_sha256"] = sha256_tree(bundle / manifest["artifact"])
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
def test_results_have_every_field_and_a_broken_bundle_is_a_failed_row(bundles, tmp_path):
    broken = tmp_path / "broken-onnx"
    shutil.copytree(bundles["small/onnx-fp32"], broken)
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    rehash(broken)
    out = tmp_path / "results"
    done = cli("bench", str(bundles["small/onnx-fp32"]), str(bundles["small/litert-fp32"]),
               str(bundles["small/executorch-fp32"]), str(bundles["run_small"]), str(broken),
               "--runs", "20", "--warmup", "2", "--accuracy", "--out", str(out))
    assert done.returncode == 1, done.stderr[-2000:]  # some rows failed: results written, exit 1
    assert "Traceback" not in done.stderr and "4 of 5 rows measured" in done.stderr

    results = json.loads((out / "results.json").read_text())
    assert {"cpu", "machine", "packages", "python"} <= set(results["host"])
    assert results["config"]["threads"] == 1 and results["target"]["url"] == "local"
    ok = [row for row in results["rows"] if row["status"] == "ok"]
    assert [row["format"] for row in ok] == ["onnx", "litert", "executorch", "torch"]
    for row in ok:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["runs"] == len(row["times_ms"]) == 20
        assert row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["peak_rss_mb"] >= row["import_baseline_mb"] > 0
        assert row["throughput_per_s"] == pytest.approx(1e3 / row["mean_ms"])
        assert row["seq_len"] == 16 and row["batch"] == 1 and row["threads"] == 1
    # Accuracy in each runtime is the accuracy the export measured in the same runtime.
    for row in ok[:3]:
        manifest = json.loads((Path(row["source"]) / "manifest.json").read_text())
        assert row["accuracy"] == pytest.approx(manifest["accuracy"]["artifact"], abs=1e-9)
    executorch = ok[2]
    assert executorch["runner"] == "native" and executorch["peak_rss_mb"] < 100  # no Python, no torch
    assert ok[0]["import_baseline_mb"] < 150  # the device runner imports onnxruntime, not torch

    (failed,) = [row for row in results["rows"] if row["status"] != "ok"]
    assert failed["source"] == str(broken) and failed["error"] and "\n" not in failed["error"]
    assert "failed: " in (out / "results.md").read_text()

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == CSV_FIELDS and len(table) == 5
    for name in ("latency_vs_seq_len.png", "fp32_vs_int8.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Rows name their model's folder too, and show the input's shape.
    assert "| small/onnx-fp32 | onnx | fp32 | python | local | 16 | 1x16x4 |" in done.stdout


@pytest.mark.slow
def test_quantized_io_is_fed_as_floats_and_scores_as_the_export_measured(bundles, tmp_path):
    """Our int8 .tflite keeps its quantize and dequantize inside (strict QDQ), so it takes and returns float
    like fp32. A .tflite with int8 input and output declares their scales in the manifest; the harness feeds
    the runner floats (it quantizes them), and the accuracy equals what the export measured in LiteRT."""
    ours = json.loads((bundles["small/litert-int8"] / "manifest.json").read_text())
    assert ours["inputs"][0]["dtype"] == ours["outputs"][0]["dtype"] == "float32"
    bundle = bundles["int8_io/litert-int8"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["inputs"][0]["dtype"] == "int8" and manifest["inputs"][0]["quantization"]["scale"] > 0
    assert manifest["outputs"][0]["dtype"] == "int8" and manifest["outputs"][0]["quantization"]["scale"] > 0
    results = bench(BenchConfig(bundles=[str(bundle), str(bundles["small/litert-int8"])], runs=3, warmup=1,
                                accuracy=True, plots=False, out=str(tmp_path)), progress=False)
    assert [row["status"] for row in results["rows"]] == ["ok", "ok"]
    for row in results["rows"]:  # the same int8 program: one image of 360 apart at most
        assert row["accuracy"] == pytest.approx(ours["accuracy"]["artifact"], abs=1 / 360 + 1e-9)


@pytest.mark.slow
def test_peak_memory_is_the_isolated_process_own(bundles, tmp_path):
    """A bundle with larger weights reports a larger peak, by at least its extra weight bytes."""
    results = bench(BenchConfig(bundles=[str(bundles[f"{size}/{fmt}"]) for fmt in ("onnx-fp32", "executorch-fp32")
                                         for size in ("small", "large")],
                                runs=5, warmup=1, plots=False, out=str(tmp_path)), progress=False)
    rows = {(Path(r["source"]).parent.name, r["format"]): r for r in results["rows"]}
    for fmt in ("onnx", "executorch"):
        small, large = rows[("small", fmt)], rows[("large", fmt)]
        assert small["status"] == large["status"] == "ok"
        extra_mb = (large["artifact_bytes"] - small["artifact_bytes"]) / 2**20
        assert extra_mb > 1
        assert large["peak_rss_mb"] - small["peak_rss_mb"] >= 0.8 * extra_mb, (fmt, small, large)


@pytest.mark.slow
def test_torch_rows_at_several_lengths(bundles, tmp_path):
    results = bench(BenchConfig(bundles=[str(bundles["run_small"])], seq_lens="8,16,64", runs=3, warmup=0,
                                out=str(tmp_path)), progress=False)
    assert [(r["seq_len"], r["status"], r.get("input_shape")) for r in results["rows"]] == [
        (8, "ok", [1, 8, 4]), (16, "ok", [1, 16, 4]), (64, "failed", None)]
    assert "longer than this model serves (16)" in results["rows"][2]["error"]


def cuda_rows(bundles, tmp_path) -> list[dict]:
    """The torch, ONNX Runtime and LiteRT rows of the small model on the cuda target."""
    results = bench(BenchConfig(bundles=[str(bundles["run_small"]), str(bundles["small/onnx-fp32"]),
                                         str(bundles["small/litert-fp32"])], target="cuda", runs=3,
                                plots=False, out=str(tmp_path)), progress=False)
    assert [row["runtime"] for row in results["rows"]] == ["torch", "onnxruntime", "litert"]
    assert all(row["device"] == "cuda" for row in results["rows"])
    litert_row = results["rows"][2]
    assert (litert_row["status"], litert_row["error"]) == (
        "failed", "target cuda runs torch and onnxruntime rows only, not litert")
    return results["rows"]


# Each machine runs exactly one of the two cases below, and each states what must hold there. CI has no GPU, so
# there the first one runs: a skip, not conftest.unavailable, which would fail CI for lacking a GPU.
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the case with a GPU runs instead")
def test_cuda_target_without_a_gpu_refuses_each_row_in_one_line(bundles, tmp_path):
    import onnxruntime as ort

    torch_row, onnx_row, _ = cuda_rows(bundles, tmp_path)
    assert (torch_row["status"], torch_row["error"]) == (
        "failed", "torch finds no CUDA device here: run the cuda target on a machine with an NVIDIA GPU and a "
                  "CUDA build of torch")
    # The onnx extra installs onnxruntime's CPU build, which names the providers it has instead.
    assert (onnx_row["status"], onnx_row["error"]) == (
        "failed", f"this onnxruntime build has no CUDAExecutionProvider (it has "
                  f"{', '.join(ort.get_available_providers())}): pip install onnxruntime-gpu on a machine with an "
                  "NVIDIA GPU and CUDA")
    assert "p50_ms" not in torch_row and "p50_ms" not in onnx_row


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (CI has none): the case without a "
                                                          "GPU runs instead")
def test_cuda_target_measures_torch_and_onnxruntime_rows_on_the_gpu(bundles, tmp_path):
    import onnxruntime as ort

    torch_row, onnx_row, _ = cuda_rows(bundles, tmp_path)
    assert torch_row["status"] == "ok", torch_row["error"]
    assert torch_row["info"]["device"] == "cuda" and torch_row["info"]["gpu"] == torch.cuda.get_device_name()
    assert torch_row["gpu_peak_mb"] > 0 and torch_row["runs"] == 3
    if "CUDAExecutionProvider" not in ort.get_available_providers():  # a CPU build of onnxruntime on a GPU machine
        assert onnx_row["status"] == "failed" and "pip install onnxruntime-gpu" in onnx_row["error"]
    else:  # measured on the GPU: the session did not fall back to the CPU
        assert onnx_row["status"] == "ok", onnx_row["error"]
        assert onnx_row["info"]["providers"][0] == "CUDAExecutionProvider" and onnx_row["runs"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (["--runs", "5", "--seconds", "2"], "give --runs or --seconds, not both"),
    (["--seq-lens", "16,x"], "bad --seq-lens '16,x'"),
    (["--threads", "0"], "threads must be at least 1"),
    (["--target", "tpu://x"], "unknown target 'tpu://x'"),
    (["--target", "ssh://root@127.0.0.1;touch /tmp/pwned"], "bad SSH target"),
    (["--target", "ssh://-oProxyCommand=touch@x"], "bad SSH target"),
])
def test_bad_arguments_are_one_line(bundles, tmp_path, args, needle):
    one_line_error(cli("bench", str(bundles["small/onnx-fp32"]), "--out", str(tmp_path / "o"), *args), needle)
    assert not (tmp_path / "o").exists()
    assert not Path("/tmp/pwned").exists()


def test_a_missing_path_is_one_line(tmp_path):
    one_line_error(cli("bench", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")), "is not a directory")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("bench", str(tmp_path / "empty"), "--out", str(tmp_path / "o")), "holds neither a bundle's")


def test_device_runner_carries_what_the_runtimes_import_and_names_its_version(tmp_path):
    """The zipapp has no real difftx_edge package: the helpers the runtimes import (hashing, threads, extras)
    travel in it, and its stub package says which difftx-edge built it, so its rows list the same versions."""
    from difftx_edge import __version__
    from difftx_edge.runtimes.measure import device_runner

    runner = device_runner(tmp_path / "runner.pyz")
    done = subprocess.run([sys.executable, "-I", str(runner), "--describe"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    packages = json.loads(done.stdout)["packages"]
    assert packages["difftx-edge"] == __version__ and "numpy" in packages


# -----------------------------------------------------------------------------
# The SSH target, against a real sshd on 127.0.0.1


def ssh_bench(sshd, paths, tmp_path, **options) -> dict:
    url, config = sshd
    return bench(BenchConfig(bundles=[str(p) for p in paths], target=url, ssh_config=config,
                             remote_python=options.pop("remote_python", sys.executable), plots=False,
                             out=str(tmp_path / "ssh"), **options), progress=False)


@pytest.mark.slow
def test_ssh_round_trip_copies_runs_returns_and_cleans_up(bundles, sshd, tmp_path):
    before = set(Path("/tmp").glob("difftx-edge.*"))
    paths = [bundles[f"small/{name}"] for name in ("onnx-fp32", "litert-fp32", "executorch-fp32")]
    results = ssh_bench(sshd, paths, tmp_path, runs=10, warmup=1, accuracy=True)
    for row, path in zip(results["rows"], paths, strict=True):
        assert row["status"] == "ok", row["error"]
        assert row["target"] == sshd[0] and row["emulated"] is False
        # Outputs computed on the board: the task accuracy equals the export's in the same runtime.
        manifest = json.loads((path / "manifest.json").read_text())
        assert row["accuracy"] == pytest.approx(manifest["accuracy"]["artifact"], abs=1e-9)
    assert results["rows"][2]["runner"] == "native"
    assert set(Path("/tmp").glob("difftx-edge.*")) == before  # the board's private directory is gone


@pytest.mark.slow
def test_ssh_paths_never_reach_a_shell(bundles, sshd, tmp_path):
    planted = tmp_path / "planted"
    hostile = tmp_path / f"b; touch {planted} $(touch {planted}) `touch {planted}`"
    shutil.copytree(bundles["small/onnx-fp32"], hostile)
    results = ssh_bench(sshd, [hostile], tmp_path, runs=3, warmup=0)
    assert results["rows"][0]["status"] == "ok", results["rows"][0]["error"]
    assert not planted.exists()


@pytest.mark.slow
def test_ssh_private_directory_is_removed_even_when_a_row_fails(bundles, sshd, tmp_path):
    url, config = sshd
    before = set(Path("/tmp").glob("difftx-edge.*"))
    with make_target(url, ssh_config=config, remote_python=sys.executable) as target:
        remote = Path(target._dir())
        assert remote.is_dir() and remote.stat().st_mode & 0o777 == 0o700  # mktemp -d: private to the user
    assert not remote.exists()
    broken = tmp_path / "broken"
    shutil.copytree(bundles["small/litert-fp32"], broken)
    (broken / "model.tflite").write_bytes(b"\0" * 64)
    rehash(broken)  # a file the runtime refuses, not one the bundle's hash gives away
    results = ssh_bench(sshd, [broken], tmp_path, runs=3)
    assert results["rows"][0]["status"] == "failed" and results["rows"][0]["error"]
    assert set(Path("/tmp").glob("difftx-edge.*")) == before


@pytest.mark.slow
def test_ssh_board_without_the_runtime_gives_a_row_error(bundles, sshd, tmp_path):
    """A board whose Python has numpy but not onnxruntime: the row says what is missing."""
    import numpy

    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", str(bare)], check=True)
    subprocess.run([str(bare / "bin" / "python"), "-m", "pip", "install", "--quiet", f"numpy=={numpy.__version__}"],
                   check=True)
    results = ssh_bench(sshd, [bundles["small/onnx-fp32"]], tmp_path, runs=3, remote_python=str(bare / "bin/python"))
    (row,) = results["rows"]
    assert row["status"] == "failed" and "onnxruntime, which is not installed" in row["error"], row["error"]


@pytest.mark.slow
def test_ssh_unreachable_host_and_timeout_are_one_line(bundles, sshd, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    one_line_error(cli("bench", str(bundles["small/onnx-fp32"]), "--target", f"ssh://root@127.0.0.1:{closed_port}",
                       "--ssh-config", sshd[1], "--out", str(tmp_path / "o")), "cannot reach")
    results = ssh_bench(sshd, [bundles["small/onnx-fp32"]], tmp_path, seconds=12.0, timeout=5.0)
    assert results["rows"][0]["status"] == "failed"
    assert "timed out after 5 s" in results["rows"][0]["error"]


# -----------------------------------------------------------------------------
# Rows a user can tell apart, Core ML off macOS, plots that show something, runs found by checkpoint


def crafted(bundle: Path, out: Path, **changes) -> Path:
    """A copy of ``bundle`` whose manifest has ``changes`` (a Core ML bundle as Linux sees one, a model with no
    task); the artifact and its sha256 stay, so the bundle opens as any other."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(changes)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.slow
def test_coreml_rows_are_not_run_off_macos_and_are_no_failure(bundles, tmp_path, capfd):
    import platform

    from difftx_edge.cli import main

    if platform.system() == "Darwin":
        pytest.skip("on macOS the Core ML runtime runs")
    coreml = crafted(bundles["small/onnx-fp32"], tmp_path / "m" / "coreml-fp32", format="coreml")
    capfd.readouterr()
    code = main(["bench", str(bundles["small/onnx-fp32"]), str(coreml), "--runs", "3", "--warmup", "0",
                 "--no-plots", "--out", str(tmp_path / "o")])
    captured = capfd.readouterr()
    assert code == 0, captured.err[-2000:]  # before: exit 1 for every `bench bundles/*` on Linux
    assert "1 of 2 rows measured; 1 not run (macOS only)" in captured.err
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    assert [row["status"] for row in rows] == ["ok", "not run (macOS only)"] and rows[1]["error"] is None
    assert "| m/coreml-fp32 | coreml | fp32 |" in captured.out and "| not run (macOS only) |" in captured.out


@pytest.mark.slow
def test_rows_name_their_model_and_n_is_a_sequence_length_only(bundles, tmp_path):
    from difftx_edge.runtimes.results import table

    # A converted model has no task and no difftx-edge model config: its input's dimension 1 is not a sequence
    # length (it may be a CNN's channels).
    no_task = crafted(bundles["small/onnx-fp32"], tmp_path / "cnn" / "onnx-fp32", task=None, model=None)
    results = bench(BenchConfig(bundles=[str(bundles["small/executorch-fp32"]), str(bundles["large/executorch-fp32"]),
                                         str(no_task)], runs=3, warmup=0, plots=False, out=str(tmp_path / "o")),
                    progress=False)
    names = [row["bundle"] for row in results["rows"]]
    assert names == ["small/executorch-fp32", "large/executorch-fp32", "cnn/onnx-fp32"]
    assert [row["seq_len"] for row in results["rows"]] == [16, 16, None]
    lines = table(results).splitlines()
    assert lines[2].startswith("| small/executorch-fp32 |") and lines[3].startswith("| large/executorch-fp32 |")
    assert "| local | - | 1x16x4 |" in lines[4]


@pytest.mark.slow
def test_one_length_per_series_is_a_bar_chart(bundles):
    from difftx_edge.runtimes.results import latency_figure

    row = {"status": "ok", "seq_len": 16, "attention": "hybrid", "precision": "fp32", "runner": "python",
           "emulated": False}
    single = [dict(row, format="onnx", p50_ms=1.0), dict(row, format="litert", p50_ms=2.0)]
    ax = latency_figure(single).axes[0]
    assert len(ax.patches) == 2 and not ax.lines  # before: two one-point lines on an axis from 15.2 to 16.8
    several = single + [dict(row, format="onnx", seq_len=64, p50_ms=3.0)]
    ax = latency_figure(several).axes[0]
    assert not ax.patches and len(ax.lines) == 2 and ax.get_xscale() == "log"


@pytest.mark.slow
def test_accuracy_finds_the_run_by_its_checkpoint_not_a_path_in_the_manifest(bundles, tmp_path):
    moved = tmp_path / "elsewhere" / "onnx-fp32"  # no run beside it: the manifest holds no path to follow
    shutil.copytree(bundles["small/onnx-fp32"], moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    assert manifest["source"]["run"] == "run_small" and "/" not in manifest["source"]["run"]
    alone = bench(BenchConfig(bundles=[str(moved)], runs=3, warmup=0, accuracy=True, plots=False,
                              out=str(tmp_path / "a")), progress=False)
    assert "give its run directory on the command line too" in alone["rows"][0]["error"]
    both = bench(BenchConfig(bundles=[str(moved), str(bundles["run_small"])], runs=3, warmup=0, accuracy=True,
                             plots=False, out=str(tmp_path / "b")), progress=False)
    assert both["rows"][0]["status"] == "ok"
    assert both["rows"][0]["accuracy"] == pytest.approx(manifest["accuracy"]["artifact"], abs=1e-9)
