"""Training end to end: accuracy, save/load, exact resume after a kill, DDP, and the run files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftx_edge.io import load_run
from difftx_edge.tasks import TaskConfig, load_task
from difftx_edge.train import TrainConfig, evaluate, train

SMALL = {"d_model": 32, "n_layers": 1, "n_heads": 2}


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "difftx_edge", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_digits_reaches_95_percent_in_a_ci_sized_run(digits_run):
    tmp_path, test = digits_run
    assert test["accuracy"] >= 0.95
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines[:-1]] == list(range(1, 41)) and lines[-1]["split"] == "test"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["task_info"]["label_names"] == [str(d) for d in range(10)]
    assert config["model"]["attention"] == "hybrid"


def test_save_load_round_trip_reproduces_the_test_metric(tmp_path):
    result = train(TrainConfig(out=str(tmp_path), epochs=2, threads=1), TaskConfig("digits"), SMALL, progress=False)
    model, config = load_run(tmp_path)
    task = load_task(TaskConfig(**config["task"]))
    assert evaluate(model, task.test.inputs, task.test.targets) == pytest.approx(result)


@pytest.mark.slow
def test_kill_mid_run_then_resume_gives_the_uninterrupted_weights(tmp_path):
    flags = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--epochs", "8", "--threads", "1",
             "--dropout", "0.1",  # dropout: the RNG state must resume too
             "--augment", "--ema", "0.9"]  # the augmentation draws and the weight average must resume too
    reference = cli("train", "--out", str(tmp_path / "ref"), *flags)
    assert reference.returncode == 0, reference.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "difftx_edge", "train", "--out", str(run), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 8, "the kill must land mid-run"
    # A kill during a save can leave that save's temporary file, never a half-written state.pt.
    torch.load(run / "state.pt", weights_only=True)
    (run / ".state.pt.killed.tmp").write_bytes(b"half of a checkpoint")  # as a kill mid-save leaves it

    resumed = cli("train", "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not list(run.glob(".*.tmp")), "resume removes what an interrupted save left behind"
    for name in ("model.safetensors",):
        a, b = load_file(tmp_path / "ref" / name), load_file(run / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    final = lambda p: torch.load(p / "state.pt", weights_only=True)["model"]  # noqa: E731
    a, b = final(tmp_path / "ref"), final(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(line).get("epoch") for line in metrics.read_text().splitlines()]
    assert epochs[:8] == list(range(1, 9))


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_matches_one_process(tmp_path):
    # No dropout: each process draws its own dropout masks, so only the deterministic model can match.
    flags = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--epochs", "2", "--threads", "1",
             "--dropout", "0"]
    single = cli("train", "--out", str(tmp_path / "single"), *flags)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "difftx_edge", "train", "--out", str(tmp_path / "ddp"), *flags],
                         capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    for k in a:  # gradients averaged over 2 processes equal the full-batch gradient, up to float rounding
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("task, flags", [
    ("text", ["--seq-len", "32", "--n-train", "64", "--n-val", "16", "--n-test", "16"]),
    ("listops", ["--n-train", "64", "--n-val", "16", "--n-test", "16", "--attention", "linear"]),
])
def test_other_tasks_train(tmp_path, task, flags):
    result = cli("train", "--task", task, "--out", str(tmp_path), "--epochs", "1", "--threads", "1",
                 "--d-model", "32", "--n-layers", "1", *flags)
    assert result.returncode == 0, result.stderr
    test = json.loads(result.stdout)["test"]
    # The metrics reported and logged are the saved checkpoint's: evaluating model.safetensors on the test split
    # gives them back.
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1] == {"split": "test", **test}
    model, config = load_run(tmp_path)
    split = load_task(TaskConfig(**config["task"])).test
    assert evaluate(model, split.inputs, split.targets) == pytest.approx(test)
    if task == "text":
        assert 0 < test["bits_per_byte"] < 8.5  # a byte model starts near log2(256) = 8 bits


def test_torch_threads_are_pinned(tmp_path):
    train(TrainConfig(out=str(tmp_path), epochs=1, threads=1), TaskConfig("digits"), SMALL, progress=False)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)


def test_default_threads_follow_the_model_size():
    from difftx_edge.train import ONE_THREAD_PARAMS, set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(None, 1, ONE_THREAD_PARAMS - 1) == 1  # the digits default is 0.1M parameters
        assert set_threads(None, 1, ONE_THREAD_PARAMS) == os.cpu_count()
        assert set_threads(3, 1, 10) == 3  # a count asked for is kept
    finally:
        torch.set_num_threads(before)


def test_run_directory_holds_the_documented_files(tmp_path):
    train(TrainConfig(out=str(tmp_path), epochs=1, threads=1), TaskConfig("digits"), SMALL, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.jsonl", "model.safetensors",
                                                          "state.pt"]
    assert Path(tmp_path / "state.pt").stat().st_size > 0
