"""`difftx-edge diff`: an artifact's intermediate tensors against its source program, node by node.

What must hold: a layer corrupted on purpose in the checkpoint, in a way that
survives export, is the first tensor `diff` names, against the uncorrupted
run; a faithful bundle has no tensor beyond tolerance; alignment covers at
least 90 % of the source program's nodes; bad input is one line and exit 2.
For ONNX and ExecuTorch, fp32 and int8.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_npz

from difftx_edge.cli import main
from difftx_edge.model import DiffTransformer, ModelConfig
from difftx_edge.pipeline.diff import Tap, compare, reference_values, tensor_nodes

TINY = {"d_model": 16, "n_layers": 2, "n_heads": 2}
CORRUPTED = "blocks.1.mlp.0"  # the second block's first MLP Linear


def corrupt(run: Path, out: Path, module: str = CORRUPTED) -> Path:
    """A copy of ``run`` whose ``module`` weight is 1.5x: a wrong layer that export carries faithfully."""
    shutil.copytree(run, out)
    weights = load_file(run / "model.safetensors")
    weights[f"{module}.weight"] = weights[f"{module}.weight"] * 1.5
    save_file(weights, out / "model.safetensors")
    return out


def small_program(attention: str = "hybrid", seed: int = 0):
    torch.manual_seed(seed)
    model = DiffTransformer(ModelConfig(input_dim=4, n_outputs=10, max_len=16, attention=attention)).eval()
    x = torch.randn(1, 16, 4)
    return model, x, torch.export.export(model, (x,))


# -----------------------------------------------------------------------------
# The comparison itself, on PyTorch values


@pytest.mark.parametrize("attention", ["hybrid", "softmax", "local"])
def test_the_corrupted_layer_is_named_first(attention):
    model, x, program = small_program(attention)
    reference = reference_values(program, (x,))
    assert set(reference) == {node.name for node in tensor_nodes(program)}
    with torch.no_grad():
        model.blocks[1].mlp[0].weight.mul_(1.5)
    corrupted = reference_values(torch.export.export(model, (x,)), (x,))
    report = compare(program, reference, [Tap(name, value) for name, value in corrupted.items()])
    first = report.first_divergence
    assert first is not None and first.module == CORRUPTED and first.op == "linear", first
    assert all(row.within for row in report.rows if row.index < first.index)
    assert report.coverage == 1.0 and not report.unaligned


def test_identical_values_and_masks_are_within_tolerance():
    _, x, program = small_program("local")  # its masks hold -inf, equal on both sides
    reference = reference_values(program, (x,))
    report = compare(program, reference, [Tap(name, value.copy()) for name, value in reference.items()])
    assert report.first_divergence is None and report.compared == len(reference)


def test_a_view_left_out_is_covered_by_its_source_and_a_computed_node_is_not():
    _, x, program = small_program()
    reference = reference_values(program, (x,))
    nodes = {node.name: node for node in tensor_nodes(program)}
    view = next(name for name, node in nodes.items() if node.target == torch.ops.aten.reshape.default
                and node.args[0].op == "call_function")
    linear = next(name for name, node in nodes.items() if node.target == torch.ops.aten.linear.default)
    taps = [Tap(name, value) for name, value in reference.items() if name not in (view, linear)]
    report = compare(program, reference, taps)
    assert report.covered_by_source >= 1 and linear in report.unaligned and view not in report.unaligned


def test_int8_tensors_are_judged_in_their_steps():
    _, x, program = small_program()
    reference = reference_values(program, (x,))
    name = next(iter(reference))
    step = float(np.abs(reference[name]).max()) / 127
    off_by_one = reference[name] + step
    assert compare(program, reference, [Tap(name, off_by_one, step)], "int8").rows[0].steps == pytest.approx(1)
    assert compare(program, reference, [Tap(name, off_by_one, step)], "int8").first_divergence is None
    assert compare(program, reference, [Tap(name, off_by_one + 2 * step, step)], "int8").first_divergence


# -----------------------------------------------------------------------------
# In ONNX Runtime and LiteRT, from the command line


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-epoch digits run, its corrupted copy, and an ONNX and a LiteRT fp32 bundle of each."""
    from difftx_edge.convert import ExportConfig, export_run
    from difftx_edge.tasks import TaskConfig
    from difftx_edge.train import TrainConfig, train

    root = tmp_path_factory.mktemp("diff")
    run = root / "run"
    train(TrainConfig(out=str(run), epochs=1, threads=2), TaskConfig("digits"), TINY, progress=False)
    bad = corrupt(run, root / "bad")
    for source in (run, bad):
        export_run(ExportConfig(run=str(source), out=str(root / f"{source.name}-bundles"), format="onnx,litert",
                                parity_batches=1, accuracy=False))
    return root


def diff_cli(capfd, *args: str) -> tuple[int, dict | None, str]:
    code = main(["diff", *args])
    captured = capfd.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("{")]
    return code, json.loads(lines[-1]) if lines else None, captured.err


def diff_names_the_corrupted_linear(capfd, bundle: Path, run: Path, out: Path) -> tuple[str, dict]:
    """``diff`` of a bundle of the corrupted run against the untouched ``run``: exit 1, the corrupted Linear
    first, 90 % of the program covered. Returns stderr and the result line."""
    code, result, err = diff_cli(capfd, str(bundle), "--source", str(run), "--out", str(out))
    assert code == 1, err
    assert result["first_divergence"]["module"] == CORRUPTED and result["first_divergence"]["op"] == "linear"
    assert result["coverage"] >= 0.9
    return err, result


@pytest.mark.slow
def test_onnx_diff_names_the_corrupted_layer(runs, capfd, tmp_path):
    err, _ = diff_names_the_corrupted_linear(capfd, runs / "bad-bundles" / "onnx-fp32", runs / "run", tmp_path / "d")
    assert "first beyond tolerance" in err and len(err.strip().splitlines()) == 1
    report = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert report["first_divergence"]["module"] == CORRUPTED
    assert "**first beyond tolerance**" in (tmp_path / "d" / "diff.md").read_text()
    assert (tmp_path / "d" / "diff.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_onnx_diff_of_a_faithful_bundle(runs, capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(runs)  # the manifest's run is found in the working directory
    code, result, err = diff_cli(capfd, str(runs / "run-bundles" / "onnx-fp32"), "--out", str(tmp_path / "d"))
    assert code == 0 and result["first_divergence"] is None, err
    assert result["coverage"] >= 0.9
    # The same artifact at two ONNX Runtime optimisation levels: fp32 fusions change nothing beyond 1e-4.
    code, result, err = diff_cli(capfd, str(runs / "run-bundles" / "onnx-fp32"), "--against", "basic",
                                 "--out", str(tmp_path / "a"))
    assert code == 0 and result["first_divergence"] is None, err


@pytest.mark.slow
def test_litert_diff_names_the_corrupted_layer_and_passes_a_faithful_bundle(runs, capfd, tmp_path):
    diff_names_the_corrupted_linear(capfd, runs / "bad-bundles" / "litert-fp32", runs / "run", tmp_path / "bad")
    code, result, err = diff_cli(capfd, str(runs / "run-bundles" / "litert-fp32"), "--source", str(runs / "run"),
                                 "--out", str(tmp_path / "good"))
    assert code == 0 and result["first_divergence"] is None, err
    assert result["coverage"] >= 0.9


@pytest.mark.slow
def test_litert_int8_diff_covers_the_program(runs, capfd, tmp_path):
    """An int8 .tflite against the int8 program quantize wrote. The converter moves each quantize up through
    views and cat, and computes a Linear in int8: those int8 tensors are compared with the program's quantize
    (exactly equal here), not with the float node they are named after, which its range clips."""
    from difftx_edge.convert import ExportConfig, export_run
    from difftx_edge.quantize import QuantConfig, quantize

    run = shutil.copytree(runs / "run", tmp_path / "run")
    quantize(QuantConfig(run=str(run), backend="litert", method="ptq", calib_batches=4, threads=2), progress=False)
    export_run(ExportConfig(run=str(run), out=str(tmp_path / "bundles"), format="litert", precision="int8",
                            parity_batches=1, accuracy=False))
    code, result, err = diff_cli(capfd, str(tmp_path / "bundles" / "litert-int8"), "--source", str(run),
                                 "--out", str(tmp_path / "d"))
    assert code == 0 and result["first_divergence"] is None, err
    assert result["coverage"] >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("args, needles", [
    (lambda r, t: [str(shutil.copytree(r / "bad-bundles" / "onnx-fp32", t / "moved" / "onnx-fp32"))],
     ("was made from run 'bad'", "--source RUN")),
    (lambda r, t: [str(r / "run-bundles" / "onnx-fp32"), "--source", str(t)], ("is not a run folder",)),
    (lambda r, t: [str(r / "run-bundles" / "onnx-fp32"), "--source", str(r / "run"), "--inputs",
                   str(write_npz(t / "x.npz", tokens=np.zeros((1, 1, 16, 4), np.float32)))],
     ("'tokens' is not an input",)),
    (lambda r, t: [str(r / "run-bundles" / "onnx-fp32"), "--source", str(r / "run"), "--inputs",
                   str(write_npz(t / "x.npz", x=np.zeros((1, 1, 16, 5), np.float32)))], ("has shape",)),
    (lambda r, t: [str(t)], ("is not a bundle",)),
    (lambda r, t: [str(r / "run-bundles" / "onnx-fp32"), "--source", str(r / "run"), "--tolerance", "0"],
     ("--tolerance",)),
])
def test_bad_input_is_one_line_and_exit_2(runs, capfd, tmp_path, args, needles):
    out = tmp_path / "d"
    code, result, err = diff_cli(capfd, *args(runs, tmp_path), "--out", str(out))
    lines = err.strip().splitlines()
    assert code == 2 and result is None and len(lines) == 1 and "Traceback" not in err, err
    assert all(needle in lines[0] for needle in needles), lines[0]
    assert not out.exists() and not (tmp_path / "d.diff.log").exists()


# -----------------------------------------------------------------------------
# In ExecuTorch's portable kernels, from the command line


@pytest.fixture(scope="module")
def et_runs(runs):
    """``runs`` with an ExecuTorch fp32 bundle of the run and of its corrupted copy, and an int8 one of the run
    (PTQ with the XNNPACK quantizer)."""
    from difftx_edge.convert import ExportConfig, export_run
    from difftx_edge.quantize import QuantConfig, quantize

    for source in (runs / "run", runs / "bad"):
        export_run(ExportConfig(run=str(source), out=str(runs / f"{source.name}-pte"), format="executorch",
                                parity_batches=1, accuracy=False))
    quantize(QuantConfig(run=str(runs / "run"), backend="xnnpack", method="ptq", calib_batches=2, threads=1),
             progress=False)
    export_run(ExportConfig(run=str(runs / "run"), out=str(runs / "run-pte"), format="executorch",
                            precision="int8", parity_batches=1, accuracy=False))
    return runs


@pytest.mark.slow
def test_executorch_diff_names_the_corrupted_layer(et_runs, capfd, tmp_path):
    diff_names_the_corrupted_linear(capfd, et_runs / "bad-pte" / "executorch-fp32", et_runs / "run", tmp_path / "d")
    # The bundle's .pte runs its program in one XNNPACK call: the report says whose kernels it checked instead.
    report = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert report["checked"].startswith("portable kernels")


@pytest.mark.slow
def test_a_pte_moved_from_its_run_is_still_checked_at_its_outputs(et_runs, capfd, tmp_path):
    # Its run is not beside it, so its program is rebuilt from --source, which is not its own: the
    # intermediates agree, and the outputs, which come from the .pte itself, do not.
    moved = shutil.copytree(et_runs / "bad-pte" / "executorch-fp32", tmp_path / "moved" / "executorch-fp32")
    code, result, err = diff_cli(capfd, str(moved), "--source", str(et_runs / "run"), "--out", str(tmp_path / "d"))
    assert code == 1, err
    report = json.loads((tmp_path / "d" / "diff.json").read_text())
    first = report["first_divergence"]
    assert first["module"] != CORRUPTED and first["index"] == max(row["index"] for row in report["rows"]), first


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_executorch_diff_of_a_faithful_bundle(et_runs, capfd, tmp_path, precision):
    code, result, err = diff_cli(capfd, str(et_runs / "run-pte" / f"executorch-{precision}"), "--source",
                                 str(et_runs / "run"), "--out", str(tmp_path / "d"))
    assert code == 0 and result["first_divergence"] is None, err
    assert result["coverage"] >= 0.9
    report = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert report["precision"] == precision and not report["unaligned"]
    if precision == "int8":  # the quantize nodes are compared, in their own steps
        assert any(row["steps"] is not None for row in report["rows"])
