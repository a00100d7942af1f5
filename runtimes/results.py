"""The benchmark harness's results: ``results.json``, ``results.csv``, ``results.md`` and the PNG plots.

``difftx_edge.runtimes.bench`` measures the rows; this module writes and
renders them. It runs on the host only (the device runner leaves it out).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from difftx_edge.io import atomic_write_bytes, atomic_write_json
from difftx_edge.markdown import markdown_table, number_cell

# A row's status: measured, failed (with its error), or not run because it cannot run on such a target at all,
# which is no failure (Core ML executes on macOS only; Linux checks its bundles by reference evaluation).
OK, FAILED, NOT_RUN_MACOS = "ok", "failed", "not run (macOS only)"
EMULATED_NOTE = "emulated board: the outputs are real, the timings are an emulator's, not the board's"
CSV_FIELDS = ["source", "bundle", "attention", "format", "precision", "runtime", "runner", "target", "emulated",
              "device", "threads", "batch", "seq_len", "input_shape", "status", "error", "load_ms",
              "first_inference_ms", "min_ms", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "runs",
              "throughput_per_s", "peak_rss_mb", "import_baseline_mb", "gpu_peak_mb", "artifact_bytes", "accuracy"]


def write_results(results: dict, out: Path, *, plots: bool) -> None:
    atomic_write_json(out / "results.json", results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results["rows"])
    atomic_write_bytes(out / "results.csv", buffer.getvalue().encode())
    atomic_write_bytes(out / "results.md", (table(results) + "\n").encode())
    if plots:
        for name, png in render_plots(results["rows"]).items():
            atomic_write_bytes(out / name, png)


def table(results: dict) -> str:
    """The results as a markdown table, with the machine it ran on."""
    target = results["target"]
    header = ["bundle", "format", "precision", "runner", "target", "N", "input", "p50 ms", "p90 ms", "p99 ms",
              "per s", "peak MB", "import MB", "size MB", "accuracy", "status"]
    rows = []
    for row in results["rows"]:
        mark = " (emulated)" if row["emulated"] else ""
        status = f"failed: {row['error']}" if row["status"] == FAILED else row["status"]
        # N only for a sequence (a task's length); the input's shape says the rest, a CNN's channels included.
        shape = row.get("input_shape")
        rows.append([
            row.get("bundle") or Path(row["source"]).name, row["format"], row["precision"], row["runner"],
            f"{row['target']}{mark}", str(row["seq_len"] or "-"), "x".join(map(str, shape)) if shape else "-",
            number_cell(row.get("p50_ms")), number_cell(row.get("p90_ms")), number_cell(row.get("p99_ms")),
            number_cell(row.get("throughput_per_s"), 1), number_cell(row.get("peak_rss_mb"), 1),
            number_cell(row.get("import_baseline_mb"), 1), number_cell(row["artifact_bytes"] / 1e6, 2),
            number_cell(None if row.get("accuracy") is None else 100 * row["accuracy"], 2), status])
    machine = (f"Target {target['url']}: {target.get('cpu')} ({target.get('machine')}, {target.get('cores')} cores), "
               f"{results['config']['threads']} thread(s)")
    notes = [machine + "."]
    if target.get("emulated"):
        notes.append(f"(emulated) {EMULATED_NOTE}.")
    return "\n".join([markdown_table(header, rows), "", *notes])



def render_plots(rows: list[dict]) -> dict[str, bytes]:
    """PNG bytes by file name: p50 latency against sequence length, and fp32 against int8, per format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in rows if row["status"] == OK]
    pngs = {"latency_vs_seq_len.png": figure_png(latency_figure(ok))}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = sorted({(row["format"], str(row["attention"]), row["seq_len"] or 0) for row in ok})
    width = 0.38
    for offset, precision in ((-width / 2, "fp32"), (width / 2, "int8")):
        heights = [min((r["p50_ms"] for r in ok if (r["format"], str(r["attention"]), r["seq_len"] or 0) == g
                        and r["precision"] == precision), default=0.0) for g in groups]
        ax.bar(np.arange(len(groups)) + offset, heights, width, label=precision)
    ax.set_xticks(np.arange(len(groups)), [f"{fmt}\n{kind}" + (f"\nN={n}" if n else "") for fmt, kind, n in groups],
                  fontsize=7, rotation=90 if len(groups) > 12 else 0)
    ax.set(ylabel="p50 latency (ms)", title="fp32 against int8, per format")
    ax.legend()
    pngs["fp32_vs_int8.png"] = figure_png(fig)
    return pngs


def latency_figure(rows: list[dict]):
    """p50 latency against sequence length, one line per runtime and precision, from measured rows.

    With one length per series a line is a single point on an axis that spans
    nothing, so each series is a bar instead. Rows of models that take no
    sequence (no task length) have no place on a length axis and are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if not row["seq_len"]:
            continue
        key = f"{row['attention']} {row['format']} {row['precision']} ({row['runner']})" + (
            " [emulated]" if row["emulated"] else "")
        series.setdefault(key, []).append((row["seq_len"], row["p50_ms"]))
    if series and all(len(points) == 1 for points in series.values()):
        keys = sorted(series)
        ax.bar(np.arange(len(keys)), [series[k][0][1] for k in keys])
        ax.set_xticks(np.arange(len(keys)), [f"{k}\nN={series[k][0][0]}" for k in keys], fontsize=7,
                      rotation=90 if len(keys) > 6 else 0)
        ax.set(ylabel="p50 latency (ms)",
               title="p50 latency, one sequence length per series (bench --seq-lens or more bundles for a curve)")
        return fig
    for key, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
    ax.set(xlabel="sequence length N", ylabel="p50 latency (ms)", title="Latency against sequence length")
    if len({point[0] for points in series.values() for point in points}) > 1:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return fig


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (tight layout, 110 dpi); closes it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
