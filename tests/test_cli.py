"""Bad input gets one clear line and a non-zero exit code, never a traceback."""

from __future__ import annotations

import numpy as np
import pytest

from difftx_edge.cli import main
from difftx_edge.tasks import TaskConfig
from difftx_edge.train import TrainConfig, train


def run_cli(capsys, *args: str) -> tuple[int, str]:
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in last, last


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(out=str(out), epochs=1, threads=1), TaskConfig("digits"),
          {"d_model": 16, "n_layers": 1, "n_heads": 2}, progress=False)
    return out


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("args, needles", [
    (["train", "--task", "imagenet"], ["invalid choice: 'imagenet'"]),
    (["train", "--attention", "dense"], ["unknown attention kind 'dense'"]),
    (["train", "--window", "64"], ["window (64) is larger than the sequence"]),
    (["train", "--epochs", "0"], ["epochs must be at least 1"]),
    (["train", "--epochs", "two"], ["invalid int value: 'two'"]),
    (["evaluate", "--run", "/nonexistent/run"], ["no config.json"]),
])
def test_bad_arguments(capsys, tmp_path, args, needles):
    code, err = run_cli(capsys, *args, *(["--out", str(tmp_path / "o")] if args[0] == "train" else []))
    assert_one_line_error(code, err, *needles)


def test_missing_and_corrupt_checkpoint(capsys, trained_run, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((trained_run / "config.json").read_text())
    assert_one_line_error(*run_cli(capsys, "evaluate", "--run", str(broken)), "no checkpoint model.safetensors")
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert_one_line_error(*run_cli(capsys, "evaluate", "--run", str(broken)), "is corrupt")
    (broken / "config.json").write_text("{not json")
    assert_one_line_error(*run_cli(capsys, "evaluate", "--run", str(broken)), "is corrupt")


def test_evaluate_a_good_run(capsys, trained_run):
    assert main(["evaluate", "--run", str(trained_run), "--threads", "1"]) == 0
    assert '"accuracy"' in capsys.readouterr().out


def test_existing_run_needs_resume_or_force(capsys, trained_run):
    code, err = run_cli(capsys, "train", "--out", str(trained_run), "--epochs", "1")
    assert_one_line_error(code, err, "already holds a run", "--resume", "--force")


def test_resume_without_a_run(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "train", "--out", str(tmp_path), "--resume"), "nothing to resume")


def test_corrupt_training_state(capsys, trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "state.pt").write_bytes(b"corrupt")
    assert_one_line_error(*run_cli(capsys, "train", "--out", str(run), "--resume"), "state.pt is corrupt")


@pytest.mark.parametrize("arrays, needles", [
    (dict(labels=np.array([0, 1, 5] * 10), tokens=np.ones((30, 8), int), label_names=np.array(["a", "b"])),
     ["label"]),
    (dict(labels=np.array([0, 1] * 15), tokens=np.ones((30,), int)), ["tokens"]),
    (dict(labels=np.array([0, 1] * 15), features=np.ones((30, 8), np.float32)), ["features"]),
    (dict(labels=np.array([0, 1] * 15)), ["tokens", "features"]),
    (dict(labels=np.array([0, -1] * 15), tokens=np.ones((30, 8), int)), ["negative"]),
])
def test_bad_user_data(capsys, tmp_path, arrays, needles):
    path = write_npz(tmp_path / "data.npz", **arrays)
    code, err = run_cli(capsys, "train", "--task", "npz", "--data", path, "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_user_npz_data_trains(capsys, tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 12, 3)).astype(np.float32)
    labels = (features[:, :, 0].mean(1) > 0).astype(np.int64)
    path = write_npz(tmp_path / "data.npz", labels=labels, features=features)
    assert main(["train", "--task", "npz", "--data", path, "--out", str(tmp_path / "o"), "--epochs", "1",
                 "--threads", "1", "--d-model", "16", "--n-heads", "2", "--window", "4"]) == 0
    assert (tmp_path / "o" / "model.safetensors").exists()


def test_console_script_is_installed():
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "difftx-edge"
    assert exe.exists(), "pip install . must install the difftx-edge console script"
    result = subprocess.run([exe, "train", "--attention", "nope"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "difftx-edge train: error: unknown attention kind 'nope': use one of hybrid, linear, local, lowrank, softmax"]
