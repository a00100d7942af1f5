"""The report: every number comes from the JSON files the stages wrote, so it can be rendered again from a folder."""

from __future__ import annotations

import json
from pathlib import Path

from difftx_edge.convert import FORMATS
from difftx_edge.markdown import markdown_table, number_cell
from difftx_edge.pipeline.cache import read_record
from difftx_edge.pipeline.plan import (
    ACCURACY_TOLERANCE,
    BENCH,
    BUNDLES,
    CHECKS,
    RUN,
    SUMMARY,
    PipelineConfig,
    Plan,
    unit_names,
)
from difftx_edge.quantize.api import INT8, int8_dir


def render_report(out: Path, cfg: PipelineConfig, plan: Plan, failed: dict[str, str] | None = None) -> str:
    """``report.md``: accuracy, export, latency and memory tables, the plots, the stages, machine and versions.

    Args:
        out: the pipeline's folder, whose JSON results the report is made of.
        cfg: the pipeline's config.
        plan: what it builds.
        failed: unit -> the one-line reason it failed or did not run; the
            report lists them first and marks what they left out.
    """
    from difftx_edge.extras import versions
    from difftx_edge.runtimes.measure import describe, int8_features_text

    failed = failed or {}

    def read(path: Path) -> dict | None:  # a unit that failed may have left no file
        return json.loads(path.read_text()) if path.is_file() else None

    run_config = json.loads((out / RUN / "config.json").read_text())
    test = _test_metrics(out / RUN / "metrics.jsonl")
    quant = {b: report for b in plan.backends if (report := read(int8_dir(out, b) / "quant_report.json"))}
    checks = {row["bundle"]: row for row in (read(out / CHECKS) or {"bundles": []})["bundles"]}
    manifests = {name: manifest for name in plan.bundle_names
                 if f"export-{name}" not in failed and (manifest := read(out / BUNDLES / name / "manifest.json"))}
    # A failed benchmark's rows, each with its status, when it got as far as writing them (it removes older ones
    # first); a benchmark that could not run has none.
    results = None
    if plan.benched and not failed.get("bench", "").startswith("not run"):
        results = read(out / BENCH / "results.json")
    model = run_config["model"]
    examples = next((row["accuracy"]["examples"] for row in checks.values() if row["accuracy"]), None)

    int8 = (f"; int8 by QAT ({plural(cfg.qat_epochs, 'epoch')}) with each format's quantizer" if plan.backends
            else "")
    sources = [f"`{RUN}/metrics.jsonl`", *([f"`{INT8}/*/quant_report.json`"] if plan.backends else []),
               f"`{BUNDLES}/*/manifest.json`", f"`{CHECKS}`", *([f"`{BENCH}/results.json`"] if results else [])]
    lines = ["# difftx-edge pipeline report", "",
             f"Task `{cfg.task}`, {model['attention']} attention, d_model {model['d_model']}, {model['n_layers']} "
             f"layers, {plural(cfg.epochs, 'training epoch')}{int8}; formats {', '.join(plan.formats)} at "
             f"{', '.join(plan.precisions)}; benchmark target `{cfg.target}`. Written by `difftx-edge pipeline` from "
             f"the JSON results in this folder: {', '.join(sources)}.", ""]
    if failed:
        lines += ["## Failures", "",
                  f"{plural(len(failed), 'unit')} failed or could not run; everything else ran, and what they would "
                  "have made is marked below. Each log is in `logs/<stage>.log`; a re-run retries them.", ""]
        reasons = [[unit, reason.replace("|", "\\|")] for unit, reason in failed.items()]
        lines += [markdown_table(["unit", "reason"], reasons), ""]

    lines += ["## Accuracy", "",
              f"Test-split accuracy ({examples or '-'} examples). PyTorch: the fp32 checkpoint"
              + (", and each quantizer's int8 program after PTQ and after QAT" if plan.backends else "")
              + ". In the runtime: the exported artifact, on the same inputs"
              + (" (int8: the shipped program's artifact: QAT's only when it beat PTQ on the validation split)."
                 if plan.backends else "."), ""]
    header = ["format", "quantizer", "fp32 PyTorch", *[f"{p} in the runtime" for p in plan.precisions]]
    if plan.backends:
        header += ["PTQ int8 PyTorch", "QAT int8 PyTorch", "shipped"]
    rows = []
    for fmt in plan.formats:
        spec = FORMATS[fmt]
        row = [fmt, spec.quantizer, _pct(test.get("accuracy"))]
        for p in plan.precisions:
            check = checks.get(f"{fmt}-{p}")
            if (fmt, p) not in plan.bundles:
                row.append("not supported")
            elif f"export-{fmt}-{p}" in failed:
                row.append("not exported")
            elif check and check["accuracy"]:
                row.append(_pct(check["accuracy"]["artifact"]))
            else:
                row.append("-")
        if plan.backends:
            report = quant.get(spec.quantizer)
            row += [_pct(report["test"]["ptq"]["accuracy"]) if report else "-",
                    _pct((report["test"]["qat"] or {}).get("accuracy")) if report else "-",
                    f"{report['shipped'].upper()}: {report['reason']}".replace("|", "\\|") if report else "-"]
        rows.append(row)
    lines += [markdown_table(header, rows), ""]
    if "coreml" in plan.formats:
        lines += ["Core ML's accuracy and parity are measured by reference evaluation of the saved program's ops "
                  "with coremltools (labelled below), not by the Core ML runtime, which runs on macOS only.", ""]

    lines += ["## Export", "",
              f"Each bundle's parity against PyTorch on held-out test inputs (float: max abs error on the logits; "
              f"int8: output quantization steps), and the check of its runtime accuracy against PyTorch's on the "
              f"same inputs (tolerance {ACCURACY_TOLERANCE:.0%}).", ""]
    rows = []
    for name in plan.bundle_names:
        manifest, check = manifests.get(name), checks.get(name)
        if manifest is None:
            reason = failed.get(f"export-{name}", "no manifest")
            rows.append([name, "-", "-", "-", "-", f"not exported: {reason}".replace("|", "\\|"), "-", "-", "-"])
            continue
        accuracy = check["accuracy"] if check else None
        if check is None:
            verdict = "not checked" + (f": {failed['check']}" if "check" in failed else "")
        else:
            verdict = "passed" if check["passed"] else f"failed: {'; '.join(check['problems'])}"
        rows.append([name, f"{manifest['artifact_bytes'] / 1024:.1f}", _parity(manifest["parity"]),
                     _pct(manifest["parity"]["top1_agreement"]),
                     f"{_pct(accuracy['artifact'])} ({_pct(accuracy['pytorch'])})" if accuracy else "-",
                     verdict.replace("|", "\\|"), _checked_by(manifest), _delegation(manifest),
                     f"{manifest['export_seconds']:.1f}"])
    header = ["bundle", "size (KB)", "parity vs PyTorch (max)", "top-1 agreement", "accuracy in the runtime (PyTorch)",
              "check", "checked by", "delegation", "conversion (s)"]
    lines += [markdown_table(header, rows), ""]
    if plan.unsupported:
        lines += ["Not exported (the format lacks the precision): "
                  + ", ".join(f"{f} {p}" for f, p in plan.unsupported) + ".", ""]

    lines += ["## Latency and memory", ""]
    if "bench" in failed:
        lines += [f"The benchmark failed: {failed['bench']} (log: `logs/bench.log`).", ""]
    if results:
        target = results["target"]
        lines += [f"Batch 1 at the exported sequence length, {results['config']['runs']} timed runs after "
                  f"{results['config']['warmup']} warm-up runs, each bundle in a fresh process on target "
                  f"`{target['url']}` ({target.get('cpu')}, {target.get('cores')} cores), "
                  f"{results['config']['threads']} thread(s). Peak RSS is the measuring process's peak; the import "
                  "baseline is its peak after importing the runtime, before loading the model.", ""]
        rows = [[Path(row["source"]).name, row["runner"], str(row["seq_len"] or "-"),
                 number_cell(row.get("p50_ms"), 3), number_cell(row.get("p90_ms"), 3),
                 number_cell(row.get("peak_rss_mb"), 1), number_cell(row.get("import_baseline_mb"), 1),
                 f"{row['artifact_bytes'] / 1024:.1f}", row["status"]] for row in results["rows"]]
        lines += [markdown_table(["bundle", "runner", "N", "p50 ms", "p90 ms", "peak RSS MB", "import baseline MB",
                                  "size (KB)", "status"], rows), ""]
        if target.get("emulated"):
            lines += ["The target is an emulated board: its outputs are real, its timings are an emulator's.", ""]
        lines += [f"![p50 latency against sequence length]({BENCH}/latency_vs_seq_len.png)", "",
                  f"![fp32 against int8 per format]({BENCH}/fp32_vs_int8.png)", ""]
    elif "bench" not in failed:
        lines += ["Nothing was benchmarked: " + ("no bundle can run on this target." if not plan.benched else
                                                 "no bundle to time was exported."), ""]
    not_benched = {**plan.not_benched, **{name: "its export failed (see Failures)" for name in plan.benched
                                          if f"export-{name}" in failed}}
    for reason in dict.fromkeys(not_benched.values()):
        names = [name for name, why in not_benched.items() if why == reason]
        lines += [f"Not benchmarked: {', '.join(names)}: {reason}.", ""]

    lines += ["## Stages", "",
              "Wall time of the run that wrote each stage's outputs (a stage skipped as up to date keeps its "
              f"earlier time); `{SUMMARY}` holds the last invocation's.", ""]
    rows = []
    for stage, units in unit_names(plan).items():
        records = [read_record(out, unit) or {} for unit in units]
        seconds = [r.get("seconds") for r in records]
        total = sum(s for s in seconds if s is not None) if units and None not in seconds else None
        rows.append([stage, ", ".join(u.split("-", 1)[-1] if "-" in u else u for u in units) or "not needed",
                     number_cell(total, 1)])
    lines += [markdown_table(["stage", "units", "wall time (s)"], rows), ""]

    machine = describe()
    lines += ["## Machine", "",
              f"- Host (training, QAT, export, checks): {machine['cpu']} ({machine['machine']}, {machine['cores']} "
              f"cores; {int8_features_text(machine['cpu_features'])}), {machine['os']}, Python {machine['python']}; "
              f"{cfg.threads or machine['cores']} thread(s)."]
    if results:
        target = results["target"]
        lines.append(f"- Benchmark target `{target['url']}`: {target.get('cpu')} ({target.get('machine')}, "
                     f"{target.get('cores')} cores; {int8_features_text(target.get('cpu_features'))}), "
                     f"{target.get('os')}, {results['config']['threads']} thread(s).")
    lines += ["", "## Versions", ""]
    found = {**machine["packages"], **versions()}
    lines += [markdown_table(["package", "version"], [[name, found[name]] for name in sorted(found)]), ""]
    return "\n".join(lines)


def plural(n: int, noun: str) -> str:
    """``n noun``, with an s unless n is 1."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _checked_by(manifest: dict) -> str:
    return "reference evaluation" if FORMATS[manifest["format"]].check == "reference" else manifest["parity"]["check"]


def _test_metrics(metrics: Path) -> dict:
    """The test-split line of a run's metrics.jsonl."""
    for line in reversed(metrics.read_text().splitlines()):
        if line.strip():
            record = json.loads(line)
            if record.get("split") == "test":
                return record
    return {}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _parity(parity: dict) -> str:
    if parity.get("output_step"):
        return f"{parity['max_steps']:.2f} output steps"
    return f"{parity['max_abs_error']:.1e}"


def _delegation(manifest: dict) -> str:
    """The delegation figures of an ExecuTorch or LiteRT bundle, or a Core ML program's stored weight types."""
    delegation = manifest.get("delegation")
    if delegation:
        unit = "subgraph" if manifest["format"] == "executorch" else "partition"
        return (f"{delegation['partitions']} XNNPACK {unit}(s), {delegation['delegated_ops']}/"
                f"{delegation['total_ops']} ops")
    weights = (manifest.get("program") or {}).get("weights")
    if weights:
        return "stored weights: " + ", ".join(f"{dtype} {count}" for dtype, count in sorted(weights.items()))
    return "-"
