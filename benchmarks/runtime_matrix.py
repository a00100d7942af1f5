"""Every format x precision x attention kind at N=256 and N=1024, measured by the harness, 1 thread.

Targets (issue 5), each checked and recorded, never raised:
- int8 at least 1.5x faster than fp32 in ExecuTorch and LiteRT at d_model 128;
- int8 artifacts at most 0.35x the size of fp32;
- the native runner's peak memory at most 2x the artifact plus its planned activation memory;
- harness overhead: the harness's p50 for a .pte through ExecuTorch's Python runtime within 5% of the native
  runner's own loop on the same file.

Bundles come from ``bundles.make_bundle`` (untrained models, parity-checked in each runtime) and are reused
from ``--work``. Measurement is ``difftx_edge.runtimes.bench.bench`` itself: one fresh process per row, the
native runner for .pte files. Core ML is not in the default formats: it cannot run on Linux; on macOS add it
with ``--formats executorch,litert,onnx,coreml``.

    python benchmarks/runtime_matrix.py [--kinds ...] [--seq-lens 256,1024] [--d-model 128] [--runs 30]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bundles import KINDS, make_bundle
from common import machine_info, machine_markdown, markdown_table, write_json, write_text
from difftx_edge.runtimes.bench import BenchConfig, bench

RESULTS = Path(__file__).parent / "results" / "runtime_matrix"
MIN_INT8_SPEEDUP = 1.5
MAX_INT8_SIZE_RATIO = 0.35
MAX_MEMORY_RATIO = 2.0
MAX_HARNESS_OVERHEAD = 1.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--formats", default="executorch,litert,onnx")
    parser.add_argument("--seq-lens", default="256,1024")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--work", default="/tmp/difftx-runtime-matrix", help="bundles are built here and reused")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    kinds, formats = args.kinds.split(","), args.formats.split(",")
    lengths = [int(n) for n in args.seq_lens.split(",")]

    started = time.perf_counter()
    paths = []
    for N in lengths:
        for kind in kinds:
            for fmt in formats:
                for precision in ("fp32", "int8"):
                    print(f"bundle {kind} N={N} {fmt} {precision}", flush=True)
                    paths.append(make_bundle(kind, fmt, precision, N, args.d_model, Path(args.work)))
    export_seconds = time.perf_counter() - started

    out = Path(args.out)
    results = bench(BenchConfig(bundles=[str(p) for p in paths], threads=args.threads, runs=args.runs, warmup=5,
                                out=str(out / "harness")), progress=False)
    pte = [str(p) for p in paths if p.name == "executorch-fp32"]
    python_rows = bench(BenchConfig(bundles=pte, threads=args.threads, runs=args.runs, warmup=5, runner="python",
                                    plots=False, out=str(out / "harness_python")), progress=False)["rows"]

    rows = {key(row): row for row in results["rows"]}
    checks = {"int8_speedup": [], "int8_size": [], "native_memory": [], "harness_overhead": []}
    for N in lengths:
        for kind in kinds:
            for fmt in formats:
                fp32, int8 = rows.get((kind, N, fmt, "fp32")), rows.get((kind, N, fmt, "int8"))
                if not (fp32 and int8 and fp32["status"] == int8["status"] == "ok"):
                    continue
                ratio = int8["artifact_bytes"] / fp32["artifact_bytes"]
                checks["int8_size"].append({"kind": kind, "N": N, "format": fmt, "ratio": ratio,
                                            "meets_target": ratio <= MAX_INT8_SIZE_RATIO})
                if fmt in ("executorch", "litert"):
                    speedup = fp32["p50_ms"] / int8["p50_ms"]
                    checks["int8_speedup"].append({"kind": kind, "N": N, "format": fmt, "fp32_ms": fp32["p50_ms"],
                                                   "int8_ms": int8["p50_ms"], "speedup": speedup,
                                                   "meets_target": speedup >= MIN_INT8_SPEEDUP})
                if fmt == "executorch":
                    for row in (fp32, int8):
                        bound = row["artifact_bytes"] / 2**20 + row["planned_activation_mb"]
                        checks["native_memory"].append({
                            "kind": kind, "N": N, "precision": row["precision"], "peak_mb": row["peak_rss_mb"],
                            "baseline_mb": row["import_baseline_mb"], "artifact_mb": row["artifact_bytes"] / 2**20,
                            "planned_mb": row["planned_activation_mb"], "ratio": row["peak_rss_mb"] / bound,
                            "meets_target": row["peak_rss_mb"] <= MAX_MEMORY_RATIO * bound})
    for row in python_rows:
        native = rows.get(key(row))
        if row["status"] == "ok" and native and native["status"] == "ok":
            ratio = row["p50_ms"] / native["p50_ms"]
            checks["harness_overhead"].append({"kind": kind_of(row), "N": row["seq_len"], "python_ms": row["p50_ms"],
                                               "native_ms": native["p50_ms"], "ratio": ratio,
                                               "meets_target": ratio <= MAX_HARNESS_OVERHEAD})
    failed = [{"source": r["source"], "error": r["error"]}
              for r in results["rows"] + python_rows if r["status"] != "ok"]
    info = machine_info(args.threads)
    summary = {"machine": info, "d_model": args.d_model, "runs": args.runs, "export_seconds": round(export_seconds),
               "checks": checks, "failed_rows": failed,
               "all_targets_met": {name: all(c["meets_target"] for c in found) for name, found in checks.items()}}
    write_json(out / "results.json", summary)
    write_text(out / "results.md", report(summary, results["rows"]))
    print(report(summary, results["rows"]))


def key(row: dict) -> tuple:
    return kind_of(row), row["seq_len"], row["format"], row["precision"]


def kind_of(row: dict) -> str:
    return Path(row["source"]).parent.name.split("-d")[0]


def report(summary: dict, rows: list[dict]) -> str:
    lines = ["# Runtime matrix", "", machine_markdown(summary["machine"]),
             f"Untrained models, d_model {summary['d_model']}, 4 heads, 2 layers, ListOps tokens, batch 1; "
             f"{summary['runs']} timed runs per row after 5 warm-up runs, each row a fresh process "
             "(`difftx_edge.runtimes.bench`). .pte rows run in the native runner.", ""]
    table = [[kind_of(r), r["seq_len"], r["format"], r["precision"], r["runner"], _f(r.get("p50_ms")),
              _f(r.get("p90_ms")), _f(r.get("peak_rss_mb"), 1), _f(r["artifact_bytes"] / 2**20, 2),
              r["status"] if r["status"] == "ok" else f"failed: {r['error']}"] for r in rows]
    lines += [markdown_table(["kind", "N", "format", "precision", "runner", "p50 ms", "p90 ms", "peak MB", "size MB",
                              "status"], table), ""]
    checks = summary["checks"]
    lines += [f"## int8 speedup over fp32 (target >= {MIN_INT8_SPEEDUP}x)", "", markdown_table(
        ["kind", "N", "format", "fp32 ms", "int8 ms", "speedup", "met"],
        [[c["kind"], c["N"], c["format"], _f(c["fp32_ms"]), _f(c["int8_ms"]), f"{c['speedup']:.2f}x",
          _yes(c["meets_target"])] for c in checks["int8_speedup"]]), ""]
    lines += [f"## int8 size / fp32 size (target <= {MAX_INT8_SIZE_RATIO})", "", markdown_table(
        ["kind", "N", "format", "ratio", "met"],
        [[c["kind"], c["N"], c["format"], f"{c['ratio']:.3f}", _yes(c["meets_target"])]
         for c in checks["int8_size"]]), ""]
    lines += [f"## Native runner peak memory (target <= {MAX_MEMORY_RATIO}x artifact + planned activations)", "",
              markdown_table(["kind", "N", "precision", "peak MB", "process start MB", "artifact MB", "planned MB",
                              "ratio", "met"],
                             [[c["kind"], c["N"], c["precision"], _f(c["peak_mb"], 1), _f(c["baseline_mb"], 1),
                               _f(c["artifact_mb"], 2), _f(c["planned_mb"], 3), f"{c['ratio']:.2f}",
                               _yes(c["meets_target"])] for c in checks["native_memory"]]), ""]
    lines += [f"## Harness overhead: Python runtime p50 / native loop p50 (target <= {MAX_HARNESS_OVERHEAD})", "",
              markdown_table(["kind", "N", "python ms", "native ms", "ratio", "met"],
                             [[c["kind"], c["N"], _f(c["python_ms"]), _f(c["native_ms"]), f"{c['ratio']:.3f}",
                               _yes(c["meets_target"])] for c in checks["harness_overhead"]]), ""]
    lines += ["Targets met: " + ", ".join(f"{k} {_yes(v)}" for k, v in summary["all_targets_met"].items()) + "."]
    return "\n".join(lines)


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


if __name__ == "__main__":
    main()
