"""A real, non-editable install, used from the clone's root.

``pip install .`` puts ``convert/``, ``quantize/``, ``runtimes/`` and ``pipeline/``
inside the installed ``difftx_edge``; the clone's own ``difftx_edge/`` folder
lacks them.
Run from the clone's root, anything that puts the working directory on
``sys.path`` (``python -m``, ``python -c``) imports that folder instead. The
commands must work there all the same.

The install goes into a fresh virtual environment that sees this one's
packages (torch and the runtimes) through a ``.pth`` line, which adds the
folder without running the editable install's own ``.pth`` hook: the
difftx_edge it imports is the freshly installed one. No network is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache",
                                     "runs", "pipeline-out", "bundles")


def run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "VIRTUAL_ENV")}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**env, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the clone, the venv's python, a trained run): difftx-edge installed from a copy of this tree, not editable."""
    root = tmp_path_factory.mktemp("install")
    clone = root / "clone"  # a copy, so that the build's egg-info and build/ never land in this tree
    shutil.copytree(ROOT, clone, ignore=COPY_IGNORE)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root)
    Path(purelib.stdout.strip(), "base-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
                str(clone)], root)
    assert done.returncode == 0, done.stderr[-3000:]
    where = run([str(python), "-c", "import difftx_edge.pipeline as p, difftx_edge.runtimes as r; "
                 "print(r.__file__); print(p.__file__)"], root)
    assert where.returncode == 0 and len(where.stdout.split()) == 2, (where.stdout, where.stderr[-2000:])
    assert all(path.startswith(str(venv)) for path in where.stdout.split()), where.stdout

    from difftx_edge.tasks import TaskConfig
    from difftx_edge.train import TrainConfig, train

    trained = root / "trained"
    train(TrainConfig(out=str(trained), epochs=1, threads=1), TaskConfig("digits"),
          {"d_model": 16, "n_heads": 2, "n_layers": 1}, progress=False)
    return clone, python, trained


@pytest.mark.slow
def test_bench_runs_from_the_clone_root(installed, tmp_path):
    clone, python, trained = installed
    out = tmp_path / "results"
    done = run([str(python.parent / "difftx-edge"), "bench", str(trained), "--runs", "3", "--warmup", "1",
                "--no-plots", "--out", str(out)], cwd=clone)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["status"] == "ok" and row["format"] == "torch", row["error"]


@pytest.mark.slow
def test_python_api_from_the_clone_root_with_p_and_from_elsewhere(installed, tmp_path):
    """What the README says: from the root, ``python -P``; from anywhere else, plain ``python``."""
    clone, python, trained = installed
    script = ("import sys; from difftx_edge.runtimes.bench import BenchConfig, bench; "
              f"r = bench(BenchConfig(bundles=[{str(trained)!r}], runs=3, warmup=1, plots=False, "
              f"out=sys.argv[1]), progress=False); print(r['rows'][0]['status'])")
    for flags, cwd in ((["-P"], clone), ([], tmp_path)):
        done = run([str(python), *flags, "-c", script, str(tmp_path / f"api{len(flags)}")], cwd=cwd)
        assert done.returncode == 0 and done.stdout.split() == ["ok"], done.stderr[-3000:]
