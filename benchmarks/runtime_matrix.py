"""Every format x precision x attention kind at N=256 and N=1024, measured by the harness, 1 thread.

Targets (issue 5), each checked and recorded, never raised:
- int8 at least 1.5x faster than fp32 in ExecuTorch and LiteRT at d_model 128;
- int8 artifacts at most 0.35x the size of fp32;
- the native runner's peak memory at most 2x the artifact plus its planned activation memory. The peak counted
  is the growth above the runner's own start (its code and libraries, about 5 MB, the native counterpart of a
  Python process's import baseline), and the planned activation memory is what ExecuTorch's planner allots
  the model's activations when it plans them all (``bundles.planned_activation_bytes``): a delegated .pte
  plans only its inputs and outputs, because XNNPACK keeps intermediate tensors in a workspace of its own;
- harness overhead: the harness's p50 for a .pte within 5% of the native runner's own loop on the same file,
  run by hand outside the harness (interleaved, the median of 3 runs each). The p50 of ExecuTorch's Python
  runtime on the same file is recorded beside it, for information.

A kind that misses the int8 speedup gets a per-op profile: ONNX Runtime's per-node profiler on the same
model's fp32 and int8 ONNX bundles (the pip builds of XNNPACK record no per-op times), summed by op type.

Bundles come from ``bundles.make_bundle`` (untrained models, parity-checked in each runtime) and are reused
from ``--work``. Measurement is ``difftx_edge.runtimes.bench.bench`` itself: one fresh process per row, the
native runner for .pte files. Core ML is not in the default formats: it cannot run on Linux; on macOS add it
with ``--formats executorch,litert,onnx,coreml``.

    python benchmarks/runtime_matrix.py [--kinds ...] [--seq-lens 256,1024] [--d-model 128] [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from bundles import KINDS, make_bundle, planned_activation_bytes
from common import machine_info, machine_markdown, write_json, write_text

from difftx_edge.markdown import markdown_table
from difftx_edge.runtimes.bench import BenchConfig, bench
from difftx_edge.runtimes.measure import summarize

RESULTS = Path(__file__).parent / "results" / "runtime_matrix"
MIN_INT8_SPEEDUP = 1.5
MAX_INT8_SIZE_RATIO = 0.35
MAX_MEMORY_RATIO = 2.0
MAX_HARNESS_OVERHEAD = 1.05
OVERHEAD_REPEATS = 3


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
    planned = planned_memory(kinds, lengths, args.d_model, Path(args.work))
    results = bench(BenchConfig(bundles=[str(p) for p in paths], threads=args.threads, runs=args.runs, warmup=5,
                                out=str(out / "harness")), progress=False)
    pte = [p for p in paths if p.name == "executorch-fp32"]
    python_rows = bench(BenchConfig(bundles=[str(p) for p in pte], threads=args.threads, runs=args.runs, warmup=5,
                                    runner="python", plots=False, out=str(out / "harness_python")),
                        progress=False)["rows"]

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
                        planned_mb = planned[f"{kind}-{N}-{row['precision']}"] / 2**20
                        grown = row["peak_rss_mb"] - row["import_baseline_mb"]
                        bound = row["artifact_bytes"] / 2**20 + planned_mb
                        checks["native_memory"].append({
                            "kind": kind, "N": N, "precision": row["precision"], "peak_mb": row["peak_rss_mb"],
                            "start_mb": row["import_baseline_mb"], "grown_mb": grown,
                            "artifact_mb": row["artifact_bytes"] / 2**20, "planned_mb": planned_mb,
                            "ratio": grown / bound, "meets_target": grown <= MAX_MEMORY_RATIO * bound})
    python_p50 = {key(row): row["p50_ms"] for row in python_rows if row["status"] == "ok"}
    for path in pte:
        harness, by_hand = [], []
        for _ in range(OVERHEAD_REPEATS):  # interleaved, so drift in the machine's speed hits both alike
            row = bench(BenchConfig(bundles=[str(path)], threads=args.threads, runs=args.runs, warmup=5, plots=False,
                                    out=str(out / "harness_repeat")), progress=False)["rows"][0]
            harness.append(row["p50_ms"])
            by_hand.append(native_loop_p50(path, args.threads, args.runs))
        ratio = statistics.median(harness) / statistics.median(by_hand)
        checks["harness_overhead"].append({
            "kind": kind_of(row), "N": row["seq_len"], "harness_ms": statistics.median(harness),
            "native_ms": statistics.median(by_hand), "python_runtime_ms": python_p50.get(key(row)),
            "ratio": ratio, "meets_target": abs(ratio - 1) <= MAX_HARNESS_OVERHEAD - 1})
    profiles = {f"{c['kind']}-{c['N']}": op_profile(Path(args.work), c["kind"], c["N"], args.d_model, args.threads)
                for c in checks["int8_speedup"] if not c["meets_target"] and c["format"] == "executorch"}
    failed = [{"source": r["source"], "error": r["error"]}
              for r in results["rows"] + python_rows if r["status"] != "ok"]
    info = machine_info(args.threads)
    summary = {"machine": info, "d_model": args.d_model, "runs": args.runs, "export_seconds": round(export_seconds),
               "checks": checks, "op_profiles": profiles, "failed_rows": failed,
               "all_targets_met": {name: all(c["meets_target"] for c in found) for name, found in checks.items()}}
    write_json(out / "results.json", summary)
    write_text(out / "results.md", report(summary, results["rows"]))
    print(report(summary, results["rows"]))


def planned_memory(kinds: list[str], lengths: list[int], d_model: int, work: Path) -> dict[str, int]:
    """Planned activation bytes per kind, length and precision, cached in ``work`` (each takes a lowering)."""
    cache = work / f"planned-d{d_model}.json"
    found = json.loads(cache.read_text()) if cache.is_file() else {}
    for kind in kinds:
        for N in lengths:
            for precision in ("fp32", "int8"):
                name = f"{kind}-{N}-{precision}"
                if name not in found:
                    print(f"planned activation memory {name}", flush=True)
                    found[name] = planned_activation_bytes(kind, precision, N, d_model)
                    write_json(cache, found)
    return found


def native_loop_p50(pte: Path, threads: int, runs: int) -> float:
    """The native runner's p50 on ``pte``, run by hand: the binary and its own timing loop, no harness."""
    from difftx_edge.runtimes import native

    argv = native.command(native.build("host"), pte / "model.pte", threads=threads, warmup=5, runs=runs)
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return summarize(native.read_report(done.stdout)["times_ms"])["p50"]


def op_profile(work: Path, kind: str, N: int, d_model: int, threads: int) -> dict:
    """Share of time per op type in ONNX Runtime's per-node profile, fp32 and int8, summed over 20 runs."""
    import numpy as np
    import onnxruntime as ort

    shares = {}
    for precision in ("fp32", "int8"):
        path = make_bundle(kind, "onnx", precision, N, d_model, work) / "model.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = str(work / f"ort-profile-{kind}-{N}-{precision}")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).integers(0, 16, size=(1, N)).astype(np.int64)
        for _ in range(20):
            session.run(None, {session.get_inputs()[0].name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
        totals: dict[str, float] = {}
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                op = event["args"]["op_name"]
                totals[op] = totals.get(op, 0.0) + event["dur"] / 1e3
        total = sum(totals.values())
        shares[precision] = {"total_ms_per_run": total / 20,
                             "ops": {op: {"ms_per_run": ms / 20, "share": ms / total}
                                     for op, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:8]}}
    return shares


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
    lines += [f"## Native runner memory (target: growth above the runner's start <= {MAX_MEMORY_RATIO}x "
              "(artifact + planned activations))", "",
              markdown_table(["kind", "N", "precision", "peak MB", "start MB", "growth MB", "artifact MB",
                              "planned MB", "growth / bound", "met"],
                             [[c["kind"], c["N"], c["precision"], _f(c["peak_mb"], 1), _f(c["start_mb"], 1),
                               _f(c["grown_mb"], 1), _f(c["artifact_mb"], 2), _f(c["planned_mb"], 2),
                               f"{c['ratio']:.2f}", _yes(c["meets_target"])] for c in checks["native_memory"]]), ""]
    lines += [f"## Harness overhead: harness p50 / native runner run by hand (target within "
              f"{MAX_HARNESS_OVERHEAD - 1:.0%})", "",
              markdown_table(["kind", "N", "harness ms", "by hand ms", "ratio", "met", "Python runtime ms"],
                             [[c["kind"], c["N"], _f(c["harness_ms"]), _f(c["native_ms"]), f"{c['ratio']:.3f}",
                               _yes(c["meets_target"]), _f(c["python_runtime_ms"])]
                              for c in checks["harness_overhead"]]), ""]
    for name, profile in summary["op_profiles"].items():
        lines += [f"## Per-op profile of {name} (ONNX Runtime's node profiler, ms per run)", ""]
        for precision, found in profile.items():
            lines += [f"{precision}: {found['total_ms_per_run']:.2f} ms of kernels per run; " + ", ".join(
                f"{op} {v['ms_per_run']:.2f} ({v['share']:.0%})" for op, v in found["ops"].items()) + ".", ""]
    lines += ["Targets met: " + ", ".join(f"{k} {_yes(v)}" for k, v in summary["all_targets_met"].items()) + "."]
    return "\n".join(lines)


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


if __name__ == "__main__":
    main()
