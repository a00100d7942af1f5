"""The package installs as documented and imports light."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("executorch", "coremltools", "litert_torch", "onnx", "onnxruntime", "ai_edge_litert", "torchao", "jax")


def test_import_difftx_edge_pulls_in_no_backend():
    code = ("import sys, json, difftx_edge, difftx_edge.cli, difftx_edge.quantize, difftx_edge.convert, "
            "difftx_edge.runtimes, difftx_edge.pipeline; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in %r)))" % (HEAVY,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_import_sets_passive_openmp_threads_that_children_inherit_unless_the_user_chose():
    # Spinning OpenMP threads made training 7x slower on a busy 2-core machine; libgomp reads the policy at load.
    code = ("import os, subprocess, sys, difftx_edge; "
            "print(subprocess.run([sys.executable, '-c', 'import os; print(os.environ[\"OMP_WAIT_POLICY\"])'], "
            "capture_output=True, text=True, check=True).stdout.strip())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"}).stdout
    assert out.strip() == "ACTIVE"


def test_backends_are_installed_for_the_suite():
    # Under CI a missing backend is a failure, never a skip.
    import importlib

    for name in ("executorch", "coremltools", "litert_torch", "ai_edge_litert", "onnx", "onnxruntime", "torchao"):
        importlib.import_module(name)


def test_subpackages_map_into_difftx_edge_only():
    import difftx_edge.convert
    import difftx_edge.pipeline
    import difftx_edge.quantize
    import difftx_edge.runtimes

    assert Path(difftx_edge.convert.__file__).parent.name == "convert"
    assert Path(difftx_edge.quantize.__file__).parent.name == "quantize"
    assert Path(difftx_edge.runtimes.__file__).parent.name == "runtimes"
    assert Path(difftx_edge.pipeline.__file__).parent.name == "pipeline"


def test_regular_install_wheel_holds_subpackages_under_difftx_edge(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("difftx_edge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for sub in ("quantize", "convert", "runtimes", "runtimes/native", "runtimes/targets", "pipeline", "tasks"):
        assert f"difftx_edge/{sub}/__init__.py" in names
    assert "difftx_edge/runtimes/native/runner.cpp" in names  # the native runner is compiled from it on first use
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"difftx_edge"}, top_level
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "difftx-edge = difftx_edge.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[test]" && pytest'
    assert f"python3 -m venv .venv && . .venv/bin/activate && {command}" in readme
    assert ci.rstrip().splitlines()[-1] == command
