"""Latency and memory against sequence length inside ExecuTorch and LiteRT: softmax against hybrid attention.

Target (issue 5): the hybrid's log-log latency slope over N = 1024..8192 stays at most 1.15 inside the
runtimes too, not only in eager torch (``attention_scaling.py``). The same range as that benchmark, for the
same reason: below 1024 the fixed per-token cost (embedding, MLPs) hides the attention's growth.

fp32 bundles of the default-width model (d_model 64, 4 heads, 2 layers; ``bundles.make_bundle``, parity
checked) at each N, measured by the harness: one fresh process per row, the native runner for .pte files,
1 thread, ``--seconds`` of timed runs per row (at least 3).

    python benchmarks/scaling_runtimes.py [--seq-lens 256,512,...,8192] [--d-model 64] [--seconds 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bundles import make_bundle
from common import machine_info, machine_markdown, write_json, write_text

from difftx_edge.markdown import markdown_table
from difftx_edge.runtimes.bench import BenchConfig, bench

RESULTS = Path(__file__).parent / "results" / "scaling_runtimes"
KINDS = ("softmax", "hybrid")
FORMATS = ("executorch", "litert")
SLOPE_RANGE = (1024, 8192)
MAX_HYBRID_SLOPE = 1.15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--work", default="/tmp/difftx-scaling-runtimes", help="bundles are built here and reused")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    lengths = [int(n) for n in args.seq_lens.split(",")]

    started = time.perf_counter()
    paths = []
    for kind in KINDS:
        for N in lengths:
            for fmt in FORMATS:
                print(f"bundle {kind} N={N} {fmt}", flush=True)
                paths.append(make_bundle(kind, fmt, "fp32", N, args.d_model, Path(args.work)))
    export_seconds = time.perf_counter() - started
    out = Path(args.out)
    results = bench(BenchConfig(bundles=[str(p) for p in paths], threads=args.threads, seconds=args.seconds,
                                warmup=2, out=str(out / "harness"), timeout=1800), progress=False)
    rows = results["rows"]
    slopes = {}
    for kind in KINDS:
        for fmt in FORMATS:
            points = sorted((r["seq_len"], r["p50_ms"]) for r in rows if r["status"] == "ok" and r["format"] == fmt
                            and _kind(r) == kind and SLOPE_RANGE[0] <= r["seq_len"] <= SLOPE_RANGE[1])
            slope = float(np.polyfit(np.log([p[0] for p in points]), np.log([p[1] for p in points]), 1)[0]) \
                if len(points) >= 2 else None
            slopes[f"{kind} {fmt}"] = {"slope": slope, "points": len(points)}
    hybrid_ok = all(s["slope"] is not None and s["slope"] <= MAX_HYBRID_SLOPE
                    for name, s in slopes.items() if name.startswith("hybrid"))
    summary = {"machine": machine_info(args.threads), "d_model": args.d_model, "seconds_per_row": args.seconds,
               "export_seconds": round(export_seconds), "slopes": slopes, "slope_range": SLOPE_RANGE,
               "hybrid_slope_target_met": hybrid_ok,
               "failed_rows": [{"source": r["source"], "error": r["error"]} for r in rows if r["status"] != "ok"]}
    write_json(out / "results.json", summary)
    write_text(out / "results.md", report(summary, rows))
    print(report(summary, rows))


def _kind(row: dict) -> str:
    return Path(row["source"]).parent.name.split("-d")[0]


def report(summary: dict, rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    lengths = sorted({r["seq_len"] for r in rows})
    header = ["kind", "format"] + [f"N={n}" for n in lengths]
    latency, memory = [], []
    for kind in KINDS:
        for fmt in FORMATS:
            cells = {r["seq_len"]: r for r in ok if _kind(r) == kind and r["format"] == fmt}
            latency.append([kind, fmt] + [f"{cells[n]['p50_ms']:.2f}" if n in cells else "-" for n in lengths])
            memory.append([kind, fmt] + [f"{cells[n]['peak_rss_mb']:.0f}" if n in cells else "-" for n in lengths])
    lo, hi = summary["slope_range"]
    lines = ["# Scaling inside the runtimes", "", machine_markdown(summary["machine"]),
             f"fp32, untrained d_model {summary['d_model']} models, batch 1; each row a fresh process timed for "
             f"{summary['seconds_per_row']} s; .pte rows in the native runner.", "",
             "## p50 latency (ms)", "", markdown_table(header, latency), "",
             "## Peak resident memory of the measuring process (MB)", "", markdown_table(header, memory), "",
             f"## Log-log latency slope, N = {lo}..{hi} (1 = linear, 2 = quadratic; hybrid target <= "
             f"{MAX_HYBRID_SLOPE})", "",
             markdown_table(["kind, format", "slope", "points"],
                            [[name, "-" if s["slope"] is None else f"{s['slope']:.2f}", s["points"]]
                             for name, s in summary["slopes"].items()]), "",
             f"Hybrid slope target met: {'yes' if summary['hybrid_slope_target_met'] else '**no**'}."]
    if summary["failed_rows"]:
        lines += ["", "Failed rows: " + "; ".join(f"{Path(f['source']).parent.name}/{Path(f['source']).name}: "
                                                  f"{f['error']}" for f in summary["failed_rows"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
