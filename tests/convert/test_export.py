"""Export: every format and precision, checked in its real runtime (Core ML by reference evaluation).

Each bundle must pass parity against PyTorch, carry a manifest that validates
against the schema, and record delegation; failures must leave no bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from difftx_edge.convert import FORMATS, ExportConfig, convert_pt2, export_run
from difftx_edge.convert.bundle import MANIFEST, validate_manifest
from difftx_edge.model import ATTENTION
from difftx_edge.quantize import QuantConfig, quantize
from difftx_edge.tasks import TaskConfig
from difftx_edge.tasks.digits import PREPROCESSING as DIGITS_PREPROCESSING
from difftx_edge.train import TrainConfig, train

KINDS = sorted(ATTENTION)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One briefly trained digits run per attention kind: parity, not accuracy, is under test."""
    found = {}
    for kind in KINDS:
        out = tmp_path_factory.mktemp(f"run_{kind}")
        # Trained enough that the test set's top-1 is not decided by near-ties, which int8 may flip.
        train(TrainConfig(out=str(out), epochs=12, threads=2), TaskConfig("digits"),
              {"attention": kind, "d_model": 32, "n_heads": 4, "n_layers": 2, "rank": 8}, progress=False)
        found[kind] = out
    return found


def check_every_runner(out, run, precision: str) -> None:
    """Every runner loads each bundle through its manifest and runs it: the Python runtimes against eager
    torch (fp32), and the native ExecuTorch runner against ExecuTorch's Python runtime (bit for bit)."""
    from difftx_edge.runtimes import RUNTIMES, Bundle, runtime_for
    from difftx_edge.runtimes.native import NativeRunner

    eager = RUNTIMES["torch"].load(run)
    for bundle_dir in sorted(out.glob(f"*-{precision}")):
        bundle = Bundle.open(bundle_dir)
        x = bundle.example_inputs(seed=3)
        spec = runtime_for(bundle.manifest["format"])
        if spec.name == "coreml":  # Linux: one clear line, not a crash; its parity is the reference check
            with pytest.raises(ValueError, match="needs macOS"):
                spec.load(bundle)
            continue
        runner = spec.load(bundle, threads=2)
        (got,) = runner.run(x)
        # The manifest describes the file's own I/O, which is what an app feeds and reads.
        if spec.name == "litert":
            for side, details in (("inputs", runner.inputs), ("outputs", runner.outputs)):
                for tensor, detail in zip(bundle.manifest[side], details, strict=True):
                    assert (tensor["name"], tensor["dtype"]) == (detail["name"], detail["dtype"].__name__)
                    assert ("quantization" in tensor) == bool(detail["quantization"][0])
        if spec.name == "onnxruntime":
            assert [t["name"] for t in bundle.manifest["inputs"]] == [i.name for i in runner.session.get_inputs()]
            assert [t["name"] for t in bundle.manifest["outputs"]] == [o.name for o in runner.session.get_outputs()]
        if precision == "fp32":
            (expected,) = eager.run([x[0].astype("float32")])
            assert abs(got - expected).max() <= 1e-4, bundle_dir.name
        if spec.name == "executorch":
            (native_out,) = NativeRunner(bundle.artifact, threads=2).run(x)
            assert (native_out == got).all(), bundle_dir.name


def check_bundle(out, fmt: str, precision: str) -> dict:
    bundle = out / f"{fmt}-{precision}"
    manifest = json.loads((bundle / MANIFEST).read_text())
    validate_manifest(manifest)
    assert (bundle / FORMATS[fmt].filename).exists()
    assert manifest["parity"]["passed"] and manifest["parity"]["top1_agreement"] >= 0.99
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    return manifest


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_every_format_passes_parity_in_its_runtime(runs, kind, tmp_path):
    export_run(ExportConfig(run=str(runs[kind]), out=str(tmp_path), format="all", precision="fp32",
                            parity_batches=4, accuracy=False, threads=2))
    for fmt in FORMATS:
        manifest = check_bundle(tmp_path, fmt, "fp32")
        assert manifest["parity"]["max_abs_error"] <= 1e-4
        assert manifest["inputs"][0]["shape"] == [1, 16, 4] and manifest["outputs"][0]["shape"] == [1, 10]
        assert manifest["task"]["label_names"] == [str(d) for d in range(10)]
        assert manifest["preprocessing"] == DIGITS_PREPROCESSING  # what docs/deploy.md codes from
    et = json.loads((tmp_path / "executorch-fp32" / MANIFEST).read_text())["delegation"]
    # Everything in one XNNPACK subgraph (digits has float features, so no embedding lookup either).
    assert et["partitions"] == 1 and et["delegated_ops"] == et["total_ops"] and not et["undelegated"]
    lite = json.loads((tmp_path / "litert-fp32" / MANIFEST).read_text())
    assert lite["partitions"] == 1  # no valued pad (PADV2) left to split the XNNPACK delegate
    delegation = lite["delegation"]
    assert delegation["delegated_ops"] == delegation["total_ops"] and not delegation["undelegated"]
    coreml = json.loads((tmp_path / "coreml-fp32" / MANIFEST).read_text())
    assert "not the Core ML runtime" in coreml["parity"]["check"]
    check_every_runner(tmp_path, runs[kind], "fp32")


INT8_CASES = [(kind, fmt) for kind in KINDS for fmt in sorted(FORMATS)]


@pytest.mark.slow
@pytest.mark.parametrize("kind, fmt", INT8_CASES)
def test_int8_every_format_passes_parity_with_the_converted_model(runs, kind, fmt, tmp_path):
    backend = FORMATS[fmt].quantizer
    quantize(QuantConfig(run=str(runs[kind]), backend=backend, method="ptq", calib_batches=4, threads=2),
             progress=False)
    export_run(ExportConfig(run=str(runs[kind]), out=str(tmp_path), format=fmt, precision="int8",
                            parity_batches=100, accuracy=False, threads=2))
    manifest = check_bundle(tmp_path, fmt, "int8")
    assert manifest["parity"]["max_steps"] <= 2.0 + 1e-3
    check_every_runner(tmp_path, runs[kind], "int8")
    assert manifest["quantized_from"].endswith(f"int8/{backend}")
    if fmt == "executorch":
        delegation = manifest["delegation"]
        assert delegation["partitions"] == 1 and delegation["delegated_ops"] == delegation["total_ops"]
    if fmt == "litert":  # the MLPs' GELUs rewritten to float, which the XNNPACK delegate takes: one partition
        assert manifest["float_gelus"] == 2 and manifest["partitions"] == 1
        assert manifest["delegation"]["delegated_ops"] == manifest["delegation"]["total_ops"]
        # The position table, and the low-rank projections (2 per layer), stay int8 behind a DEQUANTIZE.
        assert manifest["int8_tables"] == (5 if kind == "lowrank" else 1)
    if fmt == "onnx":
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(tmp_path / "onnx-int8" / "model.onnx"))
        # No exporter debug metadata (a quarter of the file, naming this machine's source paths): only the name
        # of the source program's node, which `difftx-edge diff` aligns by.
        kept = [(prop.key, prop.value) for node in model.graph.node for prop in node.metadata_props]
        assert kept and all(key == "difftx.fx_node" and value.isidentifier() for key, value in kept)
        floats = [numpy_helper.to_array(t).size for t in model.graph.initializer
                  if t.data_type == onnx.TensorProto.FLOAT]
        assert max(floats) < 16 * 32, "a float table as large as the position table is left"
    if fmt == "coreml":  # checked by reference evaluation, after the structure: the Linears' weights stored as int8
        linear_weights = 4 * 32 + 2 * (3 * 32 * 32 + 32 * 32 + 2 * 32 * 128) + 32 * 10
        assert manifest["program"]["weights"]["int8"] >= linear_weights
        assert manifest["program"]["inputs"][0]["shape"] == [1, 16, 4]


@pytest.mark.slow
def test_accuracy_is_measured_in_the_runtime(runs, tmp_path):
    (manifest,) = export_run(ExportConfig(run=str(runs["hybrid"]), out=str(tmp_path), format="onnx",
                                          batch=8, threads=2))
    accuracy = manifest["accuracy"]
    assert accuracy["examples"] == 360 and accuracy["artifact"] == pytest.approx(accuracy["pytorch"], abs=0.003)


@pytest.mark.slow
def test_foreign_transformer_encoder_converts_to_every_format(tmp_path):
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0,
                                               batch_first=True)
            self.proj, self.encoder, self.head = nn.Linear(3, 16), nn.TransformerEncoder(layer, 2), nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.encoder(self.proj(x)).mean(dim=1))

    torch.manual_seed(0)
    model = Classifier().eval()
    path = tmp_path / "encoder.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 12, 3),)), path)
    manifests = convert_pt2(path, tmp_path / "out", "all", threads=2, parity_batches=4)
    assert sorted(m["format"] for m in manifests) == sorted(FORMATS)
    for fmt in FORMATS:
        assert check_bundle(tmp_path / "out", fmt, "fp32")["parity"]["max_abs_error"] <= 1e-4


@pytest.mark.slow
def test_manifest_schema_rejects_a_missing_field(runs, tmp_path):
    export_run(ExportConfig(run=str(runs["local"]), out=str(tmp_path), format="onnx", parity_batches=2,
                            accuracy=False, threads=2))
    manifest = json.loads((tmp_path / "onnx-fp32" / MANIFEST).read_text())
    validate_manifest(manifest)
    broken = dict(manifest, parity={k: v for k, v in manifest["parity"].items() if k != "max_abs_error"})
    with pytest.raises(ValueError, match="max_abs_error"):
        validate_manifest(broken)
    with pytest.raises(ValueError, match="artifact_bytes"):
        validate_manifest(dict(manifest, artifact_bytes="12"))


# -----------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "difftx_edge", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def one_line_error(done: subprocess.CompletedProcess, needle: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert needle in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (["--format", "tensorrt"], "unknown format 'tensorrt'"),
    (["--format", "onnx", "--precision", "fp16"], "format onnx does not support precision fp16"),
    (["--format", "onnx", "--seq-len", "64"], "longer than this model can serve (16"),
])
def test_export_bad_arguments(runs, tmp_path, args, needle):
    one_line_error(cli("export", "--run", str(runs["hybrid"]), "--out", str(tmp_path / "o"), *args), needle)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.slow
def test_export_to_a_file_and_a_missing_int8_program(runs, tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    one_line_error(cli("export", "--run", str(runs["hybrid"]), "--out", str(target), "--format", "onnx"), "is a file")
    one_line_error(cli("export", "--run", str(runs["linear"]), "--out", str(tmp_path / "o"), "--format", "litert",
                       "--precision", "int8", "--quantized", str(tmp_path / "nothing")), "no int8 program for litert")


def test_convert_a_corrupt_pt2(tmp_path):
    import zipfile

    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip archive")
    one_line_error(cli("convert", str(bad), "--format", "onnx", "--out", str(tmp_path / "o")),
                   "is not a readable torch.export file")
    broken = tmp_path / "broken.pt2"  # a zip archive, but not an exported program
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("archive_format", "pt2")
    one_line_error(cli("convert", str(broken), "--format", "onnx", "--out", str(tmp_path / "o")),
                   "is not a readable torch.export file")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_convert_names_an_op_no_format_supports(tmp_path):
    class Inverse(nn.Module):
        def forward(self, x):
            return torch.linalg.inv(x @ x.transpose(-1, -2) + torch.eye(4)).sum(-1)

    path = tmp_path / "inverse.pt2"
    torch.export.save(torch.export.export(Inverse(), (torch.randn(1, 4, 4),)), path)
    for fmt in sorted(FORMATS):
        done = cli("convert", str(path), "--format", fmt, "--out", str(tmp_path / "out"))
        # A format that fails to build is exit 1 (bad input is 2), with its one line before the summary line.
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert f"{fmt} cannot convert inverse.pt2" in done.stderr.strip().splitlines()[-2]
        assert "linalg_inv" in done.stderr.strip().splitlines()[-2]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_formats_lists_every_format_and_its_extra():
    done = cli("formats")
    assert done.returncode == 0
    for name, spec in FORMATS.items():
        assert f"`{name}`" in done.stdout and f"`{spec.extra}`" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_coreml_fp16_bundle_passes_its_reference_check(runs, kind, tmp_path):
    (manifest,) = export_run(ExportConfig(run=str(runs[kind]), out=str(tmp_path), format="coreml",
                                          precision="fp16", parity_batches=4, accuracy=False, threads=2))
    assert manifest["precision"] == "fp16" and manifest["deployment_target"] == "iOS17"
    assert manifest["program"]["weights"].get("fp16") and not manifest["program"]["weights"].get("fp32")
    # Not vacuous: fp16 arithmetic differs from fp32, yet stays within the fp16 tolerance.
    assert 1e-6 < manifest["parity"]["max_abs_error"] <= 5e-2


def test_readme_embeds_the_formats_table_from_the_registry():
    from pathlib import Path

    from difftx_edge.convert import formats_table

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert formats_table(installed=False) in readme


# -----------------------------------------------------------------------------
# One failing format never takes down the others


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """A small digits run with ExecuTorch's int8 program (PTQ), and a LiteRT program folder whose .pt2 is cut
    short: a real broken input for one format, built deterministically."""
    import shutil

    root = tmp_path_factory.mktemp("keep_going")
    run = root / "run"
    train(TrainConfig(out=str(run), epochs=8, threads=1), TaskConfig("digits"),
          {"d_model": 16, "n_heads": 2, "n_layers": 1}, progress=False)
    quantize(QuantConfig(run=str(run), backend="xnnpack", method="ptq", calib_batches=2, threads=1), progress=False)
    broken = run / "int8" / "litert"
    shutil.copytree(run / "int8" / "xnnpack", broken)
    program = broken / "quantized.pt2"
    program.write_bytes(program.read_bytes()[:1000])
    return run


@pytest.mark.slow
def test_a_failing_format_leaves_the_others_built_and_is_one_line(int8_run, tmp_path, capfd):
    from difftx_edge.cli import main
    from difftx_edge.convert.api import ExportFailed

    out = tmp_path / "bundles"
    seen = []
    with pytest.raises(ExportFailed) as failed:
        export_run(ExportConfig(run=str(int8_run), out=str(out), format="litert,executorch", precision="int8",
                                parity_batches=2, accuracy=False, threads=1),
                   on_result=lambda name, manifest, reason: seen.append((name, manifest is not None, reason)))
    # litert comes first and fails; executorch is still built, checked and written.
    assert [(name, ok) for name, ok, _ in seen] == [("litert-int8", False), ("executorch-int8", True)]
    assert [m["format"] for m in failed.value.manifests] == ["executorch"]
    (failure,) = failed.value.failures
    assert failure["bundle"] == "litert-int8" and "does not match its config" in failure["reason"]
    assert "\n" not in failure["reason"] and failure["reason"].startswith("litert-int8: ")
    check_bundle(out, "executorch", "int8")
    assert not (out / "litert-int8").exists()

    # The command line: the built bundle on stdout, the failure as one line, exit 1 (bad input is 2).
    out2 = tmp_path / "cli"
    capfd.readouterr()
    code = main(["export", "--run", str(int8_run), "--out", str(out2), "--format", "litert,executorch",
                 "--precision", "int8", "--parity-batches", "2", "--no-accuracy", "--threads", "1"])
    captured = capfd.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    (line,) = captured.out.strip().splitlines()
    assert json.loads(line)["bundle"] == f"{out2}/executorch-int8"
    errors = captured.err.strip().splitlines()
    assert errors[0].startswith("difftx-edge export: litert-int8: ") and "does not match its config" in errors[0]
    assert errors[-1].startswith("difftx-edge export: 1 of 2 bundles failed") and len(errors) == 2, errors
    log = tmp_path / "cli.export.log"
    assert log.is_file() and "==== executorch-int8" in log.read_text()
    assert (out2 / "executorch-int8" / "model.pte").is_file()


def test_every_parity_failure_says_what_to_try_next():
    import numpy as np

    from difftx_edge.convert.bundle import compare

    torch_out = [np.array([[0.0, 1.0, 2.0]], np.float32)]
    far = [np.array([[0.0, 1.0, 2.5]], np.float32)]
    fp32 = compare(far, torch_out, "fp32", None)
    assert not fp32["passed"] and "> 0.0001, the fp32 tolerance on the logits" in fp32["failure"]
    assert "--threads 1" in fp32["failure"]
    int8 = compare(far, torch_out, "int8", 0.1)
    assert not int8["passed"] and "5.00 output steps" in int8["failure"]
    for advice in ("--threads 1", "--method (ptq or qat)", "quantized.pt2"):
        assert advice in int8["failure"]


def test_convert_reports_each_failing_format_and_exits_1(tmp_path, capfd):
    from difftx_edge.cli import main

    class Inverse(nn.Module):
        def forward(self, x):
            return torch.linalg.inv(x @ x.transpose(-1, -2) + torch.eye(4)).sum(-1)

    path = tmp_path / "inverse.pt2"
    torch.export.save(torch.export.export(Inverse(), (torch.randn(1, 4, 4),)), path)
    capfd.readouterr()
    code = main(["convert", str(path), "--format", "onnx,executorch", "--out", str(tmp_path / "out")])
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 3, lines  # one per format, then the summary: the toolchains' chatter is in the log
    assert lines[0].startswith("difftx-edge convert: onnx-fp32: onnx cannot convert inverse.pt2")
    assert lines[1].startswith("difftx-edge convert: executorch-fp32: executorch cannot convert inverse.pt2")
    assert "2 of 2 bundles failed" in lines[2] and (tmp_path / "out.convert.log").is_file()


@pytest.mark.slow
def test_manifests_hold_no_build_paths(int8_run, tmp_path):
    """Manifests ship inside apps: they name the run or .pt2 by name and sha256, never by a path here."""
    (manifest,) = export_run(ExportConfig(run=str(int8_run), out=str(tmp_path / "b"), format="executorch",
                                          precision="int8", parity_batches=2, accuracy=False, threads=1))
    assert manifest["source"]["run"] == "run" and len(manifest["source"]["sha256"]) == 64
    assert manifest["quantized_from"] == "int8/xnnpack"
    text = (tmp_path / "b" / "executorch-int8" / MANIFEST).read_text()
    assert str(int8_run.parent) not in text and str(tmp_path) not in text

    model = nn.Sequential(nn.Linear(3, 4)).eval()
    path = tmp_path / "linear.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3),)), path)
    (manifest,) = convert_pt2(path, tmp_path / "c", "onnx", threads=1, parity_batches=2)
    assert manifest["source"] == {"pt2": "linear.pt2", "sha256": manifest["source"]["sha256"]}
    assert str(tmp_path) not in (tmp_path / "c" / "onnx-fp32" / MANIFEST).read_text()
