"""The SSH target against an emulated arm64 board (``benchmarks/arm64_board``): real aarch64 runtimes.

The board is Debian arm64 under qemu-user with its own sshd on 127.0.0.1. Its
onnxruntime and ai-edge-litert are the aarch64 wheels, and .pte files run in
the native runner cross-compiled here for aarch64, so the outputs are a real
aarch64 build's and are checked against this machine's on the same inputs;
the timings are QEMU's, and every row says so.

Building the board needs root (mounts, chroot, binfmt_misc): under CI a board
that cannot be built or started fails these tests, never skips them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import unavailable

from difftx_edge.convert import ExportConfig, export_run
from difftx_edge.quantize import QuantConfig, quantize
from difftx_edge.runtimes.bench import BenchConfig, bench
from difftx_edge.runtimes.registry import Bundle, example_tensor
from difftx_edge.runtimes.results import table
from difftx_edge.runtimes.targets import Job, make_target
from difftx_edge.tasks import TaskConfig
from difftx_edge.train import TrainConfig, train

pytestmark = pytest.mark.slow  # builds an arm64 board with debootstrap (minutes) and runs every runtime under QEMU

BOARD = Path(__file__).resolve().parents[3] / "benchmarks" / "arm64_board" / "board.sh"
FORMATS = ("onnx", "litert", "executorch")
SAMPLES = 6



@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """The board, built (or unpacked from the cache) and started on a free port; stopped afterwards."""
    if os.geteuid() != 0:
        unavailable("the emulated board needs root (mounts, chroot, binfmt_misc)")
    env = {**os.environ, "HOST_PYTHON": sys.executable}
    built = subprocess.run(["bash", str(BOARD), "build"], capture_output=True, text=True, env=env, timeout=1800)
    if built.returncode != 0:
        unavailable(f"board.sh build failed: {built.stderr.strip().splitlines()[-1:]}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = subprocess.run(["bash", str(BOARD), "start", "--port", str(port)], capture_output=True, text=True,
                             env=env, timeout=600)
    if started.returncode != 0:
        unavailable(f"board.sh start failed: {started.stderr.strip().splitlines()[-1:]}")
    url = started.stdout.strip().splitlines()[-1]
    config = subprocess.run(["bash", str(BOARD), "ssh-config"], capture_output=True, text=True, env=env,
                            check=True).stdout.strip()
    try:
        yield url, config
    finally:
        subprocess.run(["bash", str(BOARD), "stop"], capture_output=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """fp32 and PTQ int8 bundles of a small digits model for the three formats a board runs."""
    root = tmp_path_factory.mktemp("board_bundles")
    run = root / "run"
    train(TrainConfig(out=str(run), epochs=6, threads=2), TaskConfig("digits"), {"d_model": 32}, progress=False)
    for backend in ("xnnpack", "litert", "onnx"):
        quantize(QuantConfig(run=str(run), backend=backend, method="ptq", calib_batches=4, threads=2), progress=False)
    for precision in ("fp32", "int8"):
        export_run(ExportConfig(run=str(run), out=str(root), format=",".join(FORMATS), precision=precision,
                                parity_batches=2, accuracy=False, threads=2))
    return root


def sample_data(bundle: Bundle, path: Path) -> Path:
    """Inputs for the bundle, stacked (K, *input), with placeholder targets: only the outputs are compared."""
    inputs = np.stack([example_tensor(bundle.manifest["inputs"][0], {}, seed) for seed in range(SAMPLES)])
    np.savez(path, inputs=inputs, targets=np.zeros((SAMPLES, inputs.shape[1]), np.int64))
    return path


def outputs_on(target, bundle: Bundle, data: Path) -> np.ndarray:
    manifest = bundle.manifest
    job = Job(source=bundle.path, manifest=manifest, runtime={"onnx": "onnxruntime"}.get(manifest["format"],
              manifest["format"]), runner="native" if manifest["format"] == "executorch" else "python",
              format=manifest["format"], precision=manifest["precision"], seq_len=bundle.seq_len, batch=1,
              threads=1, warmup=0, runs=2, seconds=None, inputs=manifest["inputs"], data=data, return_outputs=True)
    row = target.run(job)
    return np.asarray(row["outputs"], np.float32)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_board_outputs_match_this_machine(board, bundles, fmt, precision, tmp_path):
    url, config = board
    bundle = Bundle.open(bundles / f"{fmt}-{precision}")
    data = sample_data(bundle, tmp_path / "data.npz")
    with make_target("local") as local:
        host = outputs_on(local, bundle, data)
    with make_target(url, ssh_config=config) as remote:
        assert remote.describe()["machine"] == "aarch64"
        on_board = outputs_on(remote, bundle, data)
    assert host.shape == on_board.shape == (SAMPLES, 1, 10)
    if precision == "fp32":
        assert np.abs(host - on_board).max() <= 1e-5
    else:
        step = bundle.manifest["parity"]["output_step"]
        assert (host.argmax(-1) == on_board.argmax(-1)).all()
        assert np.abs(host - on_board).max() <= step * (1 + 1e-3)


def test_board_rows_are_marked_emulated_and_clean_up(board, bundles, tmp_path):
    url, config = board
    board_tmp = Path(os.environ.get("DIFFTX_BOARD_DIR", "/var/tmp/difftx-arm64-board")) / "root" / "tmp"
    before = set(board_tmp.glob("difftx-edge.*"))
    results = bench(BenchConfig(bundles=[str(bundles / f"{fmt}-int8") for fmt in FORMATS], target=url,
                                ssh_config=config, runs=3, warmup=1, plots=False, out=str(tmp_path)), progress=False)
    assert results["target"]["emulated"] is True and results["target"]["machine"] == "aarch64"
    for row in results["rows"]:
        assert row["status"] == "ok", row["error"]
        assert row["emulated"] is True
    assert results["rows"][2]["runner"] == "native"
    rendered = table(results)
    assert rendered.count("(emulated)") == len(FORMATS) + 1  # every row, and the note under the table
    assert set(board_tmp.glob("difftx-edge.*")) == before


def test_board_without_the_runtime_gives_a_row_error(board, bundles, tmp_path):
    """The board's system Python with numpy alone: the ONNX row fails with one line; the .pte row, which
    needs no Python, still runs."""
    url, config = board
    site = "/opt/venv/lib/python3.11/site-packages"
    setup = (f"mkdir -p /tmp/numpy_only && ln -sfn {site}/numpy {site}/numpy.libs /tmp/numpy_only/ && "
             "printf '#!/bin/sh\\nPYTHONPATH=/tmp/numpy_only exec /usr/bin/python3 \"$@\"\\n' > /tmp/numpy-python "
             "&& chmod +x /tmp/numpy-python")
    subprocess.run(["ssh", "-F", config, "board", setup], check=True, timeout=120)
    results = bench(BenchConfig(bundles=[str(bundles / "onnx-fp32"), str(bundles / "executorch-fp32")], target=url,
                                ssh_config=config, remote_python="/tmp/numpy-python", runs=2, plots=False,
                                out=str(tmp_path)), progress=False)
    onnx_row, pte_row = results["rows"]
    assert onnx_row["status"] == "failed" and "onnxruntime, which is not installed" in onnx_row["error"]
    assert "\n" not in onnx_row["error"]
    assert pte_row["status"] == "ok", pte_row["error"]
