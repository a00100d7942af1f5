"""The one-command pipeline: every stage at a tiny size, the report against the JSON it came from, resuming, failures.

The module trains once (``tiny``), on 200 of scikit-learn's digits saved as an
``npz`` task, so that the Core ML reference evaluation covers 20 test examples
instead of 360. The tests after the first re-run the pipeline in the same
directory, in file order, and each leaves it up to date.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from difftx_edge.cli import main
from difftx_edge.convert import FORMATS
from difftx_edge.pipeline import STAGES, PipelineConfig, pipeline, read_record
from difftx_edge.runtimes.measure import describe

TINY = {"task": "npz", "d_model": 16, "epochs": 10, "qat_epochs": 1, "runs": 3, "threads": 2}
BUNDLES = [f"{fmt}-{precision}" for fmt in sorted(FORMATS) for precision in ("fp32", "int8")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sklearn.datasets import load_digits

    from difftx_edge.tasks.digits import image_patches

    root = tmp_path_factory.mktemp("pipeline")
    digits = load_digits()
    rows = np.random.default_rng(0).permutation(len(digits.target))[:200]
    data = root / "digits200.npz"
    np.savez(data, features=(image_patches(digits.images[rows]) / 16).astype(np.float32),
             labels=digits.target[rows].astype(np.int64))
    cfg = PipelineConfig(out=str(root / "out"), data=str(data), **TINY)
    summary = pipeline(cfg, progress=False)
    return cfg, Path(cfg.out), summary


def statuses(summary: dict) -> dict[str, str]:
    return {entry["stage"]: entry["status"] for entry in summary["stages"]}


def units_run(summary: dict) -> list[str]:
    return [unit["unit"] for entry in summary["stages"] for unit in entry["units"] if unit["status"] == "ran"]


def report_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Each markdown table of the report under its section's heading, as one {column: cell} per row."""
    tables, section, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            section, header = line[3:], None
        elif not line.startswith("|"):
            header = None
        else:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if header is None:
                header, tables[section] = cells, []
            elif set("".join(cells)) - set("- "):
                tables[section].append(dict(zip(header, cells, strict=True)))
    return tables


def pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_every_stage_runs_and_the_report_matches_the_json(tiny):
    cfg, out, summary = tiny
    assert statuses(summary) == dict.fromkeys(STAGES, "ran")
    assert read_json(out / "pipeline.json") == summary
    for stage in STAGES:
        assert (out / "logs" / f"{stage}.log").is_file()
    manifests = {name: read_json(out / "bundles" / name / "manifest.json") for name in BUNDLES}
    quant = {b: read_json(out / "int8" / b / "quant_report.json") for b in ("coreml", "litert", "onnx", "xnnpack")}
    results = read_json(out / "bench" / "results.json")
    test = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert test["split"] == "test" and read_json(out / "checks.json")["passed"]
    report = (out / "report.md").read_text()
    tables = report_tables(report)

    accuracy = {row["format"]: row for row in tables["Accuracy"]}
    assert sorted(accuracy) == sorted(FORMATS)
    for fmt, row in accuracy.items():
        backend = FORMATS[fmt].quantizer
        assert row["quantizer"] == backend
        assert row["fp32 PyTorch"] == pct(test["accuracy"])
        for precision in ("fp32", "int8"):
            assert row[f"{precision} in the runtime"] == pct(manifests[f"{fmt}-{precision}"]["accuracy"]["artifact"])
        assert row["PTQ int8 PyTorch"] == pct(quant[backend]["test"]["ptq"]["accuracy"])
        assert row["QAT int8 PyTorch"] == pct(quant[backend]["test"]["qat"]["accuracy"])

    export = {row["bundle"]: row for row in tables["Export"]}
    assert sorted(export) == BUNDLES
    for name, row in export.items():
        manifest = manifests[name]
        parity, acc = manifest["parity"], manifest["accuracy"]
        assert row["size (KB)"] == f"{manifest['artifact_bytes'] / 1024:.1f}"
        expected = (f"{parity['max_steps']:.2f} output steps" if manifest["precision"] == "int8"
                    else f"{parity['max_abs_error']:.1e}")
        assert row["parity vs PyTorch (max)"] == expected
        assert row["top-1 agreement"] == pct(parity["top1_agreement"])
        assert row["accuracy in the runtime (PyTorch)"] == f"{pct(acc['artifact'])} ({pct(acc['pytorch'])})"
        assert row["check"] == "passed"
        checked = "reference evaluation" if manifest["format"] == "coreml" else f"{manifest['format']} runtime"
        assert row["checked by"] == checked
        if manifest["format"] in ("executorch", "litert"):
            delegation = manifest["delegation"]
            assert f"{delegation['delegated_ops']}/{delegation['total_ops']} ops" in row["delegation"]
    assert "not by the Core ML runtime, which runs on macOS only" in report

    latency = {row["bundle"]: row for row in tables["Latency and memory"]}
    assert sorted(latency) == [name for name in BUNDLES if not name.startswith("coreml")]
    for measured in results["rows"]:
        row = latency[Path(measured["source"]).name]
        assert measured["status"] == row["status"] == "ok" and measured["runs"] == cfg.runs
        assert row["runner"] == measured["runner"] and row["N"] == str(measured["seq_len"])
        assert row["p50 ms"] == f"{measured['p50_ms']:.3f}" and row["p90 ms"] == f"{measured['p90_ms']:.3f}"
        assert row["peak RSS MB"] == f"{measured['peak_rss_mb']:.1f}"
        assert row["import baseline MB"] == f"{measured['import_baseline_mb']:.1f}"
    assert "Not benchmarked: coreml-fp32, coreml-int8: the Core ML runtime runs on macOS only" in report
    plots = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert sorted(plots) == ["bench/fp32_vs_int8.png", "bench/latency_vs_seq_len.png"]
    for plot in plots:
        assert (out / plot).read_bytes().startswith(b"\x89PNG")

    stages = {row["stage"]: row for row in tables["Stages"]}
    for entry in summary["stages"][:-1]:
        seconds = sum(unit["seconds"] for unit in entry["units"])
        assert stages[entry["stage"]]["wall time (s)"] == f"{seconds:.1f}"
    versions = {row["package"]: row["version"] for row in tables["Versions"]}
    assert versions["torch"] == torch.__version__ and "executorch" in versions and "onnxruntime" in versions
    assert describe()["cpu"] in report.split("## Machine")[1]


@pytest.mark.slow
def test_rerun_skips_and_deleting_a_stage_redoes_only_it_and_the_report(tiny):
    cfg, out, _ = tiny
    again = pipeline(cfg, progress=False)
    assert statuses(again) == dict.fromkeys(STAGES, "skipped")

    (out / "checks.json").unlink()
    # The report shows each stage's wall time, so it is rewritten after any stage ran.
    assert units_run(pipeline(cfg, progress=False)) == ["check", "report"]

    shutil.rmtree(out / "bench")
    assert units_run(pipeline(cfg, progress=False)) == ["bench", "report"]

    shutil.rmtree(out / "bundles" / "onnx-fp32")
    redone = pipeline(cfg, progress=False)
    assert [u for u in units_run(redone) if u.startswith("export")] == ["export-onnx-fp32"]
    assert units_run(redone)[0] == "export-onnx-fp32" and (out / "bundles" / "onnx-fp32" / "model.onnx").is_file()

    forced = pipeline(cfg, force=("check",), progress=False)
    assert units_run(forced) == ["check", "report"]


@pytest.mark.slow
def test_interrupted_training_continues_from_its_state(tiny):
    cfg, out, _ = tiny
    (out / "stages" / "train.json").unlink()  # as if killed after the last epoch, before the record
    summary = pipeline(cfg, progress=False)
    assert units_run(summary) == ["train", "report"]  # the same weights: no other stage is redone
    assert "continuing the interrupted training" in (out / "logs" / "train.log").read_text()


@pytest.mark.slow
def test_a_failing_stage_is_one_line_naming_it_and_its_log(tiny, capfd):
    cfg, out, _ = tiny
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in TINY.items()]
    args = ["pipeline", "--out", cfg.out, "--data", cfg.data, *flags]
    code = main([*args, "--target", "ssh://nobody@127.0.0.1:1"])  # nothing listens on port 1
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err  # 1: something failed, everything else is done; 2 is bad input
    (failed,) = [line for line in err.splitlines() if " failed: " in line]
    assert failed.startswith("[5/6] bench: ") and failed.endswith(f"(log: {out / 'logs' / 'bench.log'})")
    assert "[1/6] train: up to date, skipped" in err and "[5/6] bench (latency and memory)" in err
    assert "1 unit failed or not run (bench)" in err.strip().splitlines()[-1]
    assert "Traceback" in (out / "logs" / "bench.log").read_text()
    summary = read_json(out / "pipeline.json")
    assert statuses(summary) == {"train": "skipped", "quantize": "skipped", "export": "skipped", "check": "skipped",
                                 "bench": "failed", "report": "ran"}
    assert [f["unit"] for f in summary["failed"]] == ["bench"]
    for unit in ("train", "quantize-xnnpack", "export-onnx-int8", "check"):
        assert read_record(out, unit) is not None
    assert read_record(out, "bench") is None  # a failed unit leaves no record: the next run retries it
    report = (out / "report.md").read_text()
    assert "## Failures" in report and "The benchmark failed: " in report
    assert not (out / "bench" / "results.json").exists()  # no older results pass for this run's

    assert main(args) == 0  # back on this machine: only the benchmark and the report are redone
    summary = read_json(out / "pipeline.json")
    assert units_run(summary) == ["bench", "report"] and summary["failed"] == []
    assert "## Failures" not in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_failing_export_leaves_every_other_unit_done_and_the_report_marks_it(tiny, tmp_path, capfd, monkeypatch):
    """The int8 exports fail parity (our own tolerance made impossible); the fp32 bundles are still exported,
    checked, timed and reported, the command exits 1, and the next run retries exactly the failed units."""
    import difftx_edge.convert.bundle as bundle

    cfg, out, _ = tiny
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    stale = copy / "bundles" / "executorch-int8"
    assert stale.is_dir()
    small = {**TINY, "formats": "executorch,litert"}
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in small.items()]
    args = ["pipeline", "--out", str(copy), "--data", cfg.data, *flags]
    monkeypatch.setattr(bundle, "INT8_MAX_STEPS", -1.0)
    capfd.readouterr()
    code = main([*args, "--force", "export"])
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err
    failures = [line for line in err.splitlines() if " failed: " in line]
    assert [line.split(" failed: ")[0] for line in failures] == ["[3/6] export: executorch-int8",
                                                                 "[3/6] export: litert-int8"]
    for line in failures:
        assert "failed parity against PyTorch" in line and "try: export again with --threads 1" in line
    summary = read_json(copy / "pipeline.json")
    assert statuses(summary) == {"train": "skipped", "quantize": "skipped", "export": "failed", "check": "ran",
                                 "bench": "ran", "report": "ran"}
    assert [f["unit"] for f in summary["failed"]] == ["export-executorch-int8", "export-litert-int8"]
    assert read_record(copy, "export-executorch-int8") is None and read_record(copy, "export-litert-int8") is None
    assert read_record(copy, "export-executorch-fp32") is not None
    assert not stale.exists()  # an older bundle must not pass for the one that failed

    checks = {row["bundle"]: row for row in read_json(copy / "checks.json")["bundles"]}
    assert checks["executorch-fp32"]["passed"] and checks["litert-fp32"]["passed"]
    assert not checks["litert-int8"]["exported"] and "not exported: " in checks["litert-int8"]["problems"][0]
    results = read_json(copy / "bench" / "results.json")
    assert sorted(Path(row["source"]).name for row in results["rows"]) == ["executorch-fp32", "litert-fp32"]
    tables = report_tables((copy / "report.md").read_text())
    assert [row["unit"] for row in tables["Failures"]] == ["export-executorch-int8", "export-litert-int8"]
    export = {row["bundle"]: row for row in tables["Export"]}
    assert export["litert-int8"]["check"].startswith("not exported: litert-int8 failed parity")
    assert export["litert-fp32"]["check"] == "passed"
    assert {row["format"]: row["int8 in the runtime"] for row in tables["Accuracy"]} == {
        "executorch": "not exported", "litert": "not exported"}
    assert "Not benchmarked: executorch-int8, litert-int8: its export failed" in (copy / "report.md").read_text()

    monkeypatch.undo()
    assert main(args) == 0  # the tolerance back: only what failed, and what reads it, is redone
    summary = read_json(copy / "pipeline.json")
    assert units_run(summary) == ["export-executorch-int8", "export-litert-int8", "check", "bench", "report"]
    assert summary["failed"] == [] and read_json(copy / "checks.json")["passed"]


@pytest.mark.parametrize("args, needle", [
    (["--formats", "tflite"], "unknown format 'tflite'"),
    (["--precisions", "int4"], "unknown precision 'int4'"),
    (["--formats", "onnx", "--precisions", "fp16"], "no format among onnx exports fp16"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--qat-epochs", "0"], "epochs and steps must be at least 1"),
    (["--runs", "0"], "runs must be at least 1"),
    (["--attention", "quadratic"], "unknown attention kind 'quadratic'"),
    (["--d-model", "10"], "must be divisible by n_heads"),
    (["--task", "imagenet"], "invalid choice: 'imagenet'"),
    (["--task", "npz"], "task 'npz' needs data"),
    (["--task", "npz", "--data", "/nonexistent/data.npz"], "does not exist"),
    (["--target", "ftp://board"], "unknown target 'ftp://board'"),
    (["--force", "deploy"], "unknown stage 'deploy'"),
    (["--epochs", "many"], "invalid int value: 'many'"),
])
def test_bad_arguments_are_one_line_and_write_nothing(capsys, tmp_path, args, needle):
    out = tmp_path / "out"
    try:
        code = main(["pipeline", "--out", str(out), *args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("difftx-edge pipeline: error: ") and needle in err, err
    assert not out.exists()


def test_an_output_that_is_a_file_is_refused(capsys, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("")
    assert main(["pipeline", "--out", str(taken)]) == 2
    assert "is a file" in capsys.readouterr().err
