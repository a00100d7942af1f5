"""How forward latency and peak memory grow with sequence length, per attention kind.

Sweeps N at a fixed small model (d_model 128, 4 heads, 2 layers, float
features in, classify head, sinusoidal positions, batch 1, bidirectional) for
every attention kind, and for PyTorch's fused
``F.scaled_dot_product_attention`` as plain full attention, registered here as
the kind ``sdpa``: the full attention a user would pick without this package.

Each (kind, N) runs in two fresh subprocesses, so one case's allocations never
pollute another's numbers. In the first, after one warm-up forward, the
kernel's RSS high-water mark is reset and one forward is measured: its peak
extra RSS is the memory the forward needs on top of the model and input. That
process fixes glibc's mmap threshold so RSS follows the live tensors, which
slows large allocations; the second process, with the default allocator users
get, times the forward (p50, p90, p99: the harness's timing loop). Both run under
``torch.inference_mode()`` on ``--threads`` threads (default 1).

Writes ``results.json``, ``results.md`` and ``scaling.png`` to ``--out``, with
the log-log slope of latency from N=1024 to 8192 and a pass/fail line per
target. A missed target is recorded, not raised.

    python benchmarks/attention_scaling.py                        # full sweep, 1 thread
    python benchmarks/attention_scaling.py --seq-lens 256,1024 --kinds softmax,linear
"""

from __future__ import annotations

import argparse
import functools
import gc
import io
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (
    MEMORY_ENV,
    command_line,
    machine_info,
    machine_markdown,
    peak_extra_rss_mb,
    write_bytes,
    write_json,
    write_text,
)

from difftx_edge.markdown import markdown_table
from difftx_edge.model import ATTENTION, DiffTransformer, ModelConfig, SoftmaxAttention, register_attention
from difftx_edge.runtimes.measure import latency_columns, summarize, timed_loop
from difftx_edge.runtimes.targets.registry import thread_env
from difftx_edge.threads import pin_threads


@register_attention("sdpa")
class SDPAAttention(nn.Module):
    """PyTorch's fused full attention: the baseline a user would otherwise pick.

    Plain softmax (no eps term), so it is not numerically one of our kinds; it
    lives here, not in the model, because it exists only to be compared against.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.causal = cfg.causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, N, D)


@register_attention("softmax_explicit")
class ExplicitSoftmaxAttention(SoftmaxAttention):
    """Our softmax kind in the form it exports to mobile runtimes: the N x N score matrix is built.

    Eager ``softmax`` runs fused SDPA and never builds that matrix; on a device
    (ExecuTorch, LiteRT) full attention runs this form, so the targets are
    checked against both.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.explicit(q, k, v)


KINDS = ("softmax", "softmax_explicit", "local", "lowrank", "linear", "hybrid", "sdpa")
SEQ_LENS = (256, 512, 1024, 2048, 4096, 8192)
EFFICIENT = ("local", "linear", "hybrid")  # the kinds the targets are about
SLOPE_RANGE = (1024, 8192)
INPUT_DIM = 16
MODEL = dict(input_dim=INPUT_DIM, n_outputs=10, d_model=128, n_heads=4, n_layers=2, head="classify",
             position="sinusoidal", window=64, rank=64, causal=False)
OUT = Path(__file__).resolve().parent / "results" / "attention_scaling"
# Timing: one warm-up call, then 1 s of timed calls and at least 3, so a multi-second forward (full attention at
# 8192) costs 3 calls, not minutes.
TIMING = dict(warmup=1, runs=None, seconds=1.0)


def model_config(kind: str, n: int) -> ModelConfig:
    # max_len = N: lowrank's projection must cover the sequence; the other kinds ignore it with sinusoidal positions.
    return ModelConfig(attention=kind, max_len=n, **MODEL)


# -----------------------------------------------------------------------------
# One case, in its own process


def build(kind: str, n: int, threads: int) -> tuple[functools.partial, int]:
    """The forward of the ``kind`` model on one random (1, n, INPUT_DIM) input, and the threads it runs on."""
    threads = pin_threads(threads)
    torch.manual_seed(0)
    model = DiffTransformer(model_config(kind, n)).eval()
    return functools.partial(model, torch.randn(1, n, INPUT_DIM)), threads


def measure_memory(kind: str, n: int, threads: int) -> dict:
    """Peak extra RSS of one forward; run it under MEMORY_ENV, so RSS follows the live tensors."""
    forward, threads = build(kind, n, threads)
    with torch.inference_mode():
        forward()  # warm-up: one-time allocations (cached masks, thread pools) join the baseline, not the peak
        gc.collect()
        peak_mb, base_mb = peak_extra_rss_mb(forward)
    return {"peak_extra_mb": peak_mb, "rss_before_mb": base_mb}


def measure_latency(kind: str, n: int, threads: int) -> dict:
    """p50, p90 and p99 latency of the forward (``summarize``), with the allocator users get."""
    forward, threads = build(kind, n, threads)
    with torch.inference_mode():
        forward()  # the first call pays one-time costs; keep it out of the page-fault count too
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = timed_loop(forward, **TIMING)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    # Page faults show when the allocator hands large temporaries back to the OS and every
    # forward touches fresh pages, which can cost more than the arithmetic. The machine may be
    # shared: the 1-minute load average says how busy it was while this case ran.
    return {"threads": threads, **latency_columns(summarize(times)), "runs": len(times),
            "minor_faults_per_forward": round(faults / (len(times) + 1)),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


MEASURES = {"memory": measure_memory, "latency": measure_latency}


def run_case(kind: str, n: int, threads: int) -> dict:
    """One (kind, N) row: memory and latency, each in a fresh interpreter.

    Memory runs first, in its own process, so that no earlier allocation
    pollutes its peak; a failure becomes a row with its error, reported at the end.
    """
    row = {"kind": kind, "n": n}
    for what, extra_env in (("memory", MEMORY_ENV), ("latency", {})):
        env = {**os.environ, **extra_env, **thread_env(threads)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{what}:{kind}:{n}",
               "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
            return {**row, "error": f"{what}: {lines[-1]}"}
        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return row


# -----------------------------------------------------------------------------
# Analysis


def loglog_slope(rows: list[dict], kind: str) -> dict | None:
    """Least-squares slope of log(p50 latency) on log(N) over SLOPE_RANGE; None with under two points."""
    lo, hi = SLOPE_RANGE
    points = sorted((r["n"], r["p50_ms"]) for r in rows
                    if r["kind"] == kind and "error" not in r and lo <= r["n"] <= hi)
    if len(points) < 2:
        return None
    n, ms = (np.log(np.array(v, dtype=float)) for v in zip(*points))
    return {"slope": float(np.polyfit(n, ms, 1)[0]), "seq_lens": [p[0] for p in points]}


def check_targets(rows: list[dict], slopes: dict[str, dict | None]) -> list[dict]:
    """Every target with its measured value; ``pass`` is None when the sweep did not measure it."""
    by = {(r["kind"], r["n"]): r for r in rows if "error" not in r}

    def ratio(base: str, kind: str, n: int, key: str) -> float | None:
        if (base, n) not in by or (kind, n) not in by:
            return None
        return by[base, n][key] / max(by[kind, n][key], 1e-9)

    targets = []
    for kind in EFFICIENT:
        slope = slopes.get(kind)
        checks = [  # (target, measured, comparison, needed)
            (f"{kind} faster than softmax at N=4096", ratio("softmax", kind, 4096, "p50_ms"), ">=", 10.0),
            (f"{kind} less peak memory than softmax at N=4096", ratio("softmax", kind, 4096, "peak_extra_mb"),
             ">=", 10.0),
            (f"{kind} faster than softmax_explicit at N=4096", ratio("softmax_explicit", kind, 4096, "p50_ms"),
             ">=", 10.0),
            (f"{kind} less peak memory than softmax_explicit at N=4096",
             ratio("softmax_explicit", kind, 4096, "peak_extra_mb"), ">=", 10.0),
            (f"{kind} faster than sdpa at N=4096", ratio("sdpa", kind, 4096, "p50_ms"), ">=", 2.0),
            (f"{kind} faster than sdpa at N=8192", ratio("sdpa", kind, 8192, "p50_ms"), ">=", 4.0),
            (f"{kind} latency slope N=1024..8192", slope["slope"] if slope else None, "<=", 1.15),
        ]
        for name, value, comparison, needed in checks:
            ok = None if value is None else (value <= needed if comparison == "<=" else value >= needed)
            targets.append({"target": name, "value": value, "needed": needed, "comparison": comparison, "pass": ok})
    return targets


# -----------------------------------------------------------------------------
# Output


def _cell(rows_by: dict, kind: str, n: int, key: str, fmt: str) -> str:
    row = rows_by.get((kind, n))
    if row is None:
        return "-"
    return "error" if "error" in row else format(row[key], fmt)


def _result(ok: bool | None) -> str:
    return "not measured" if ok is None else ("PASS" if ok else "MISS")


def render_markdown(report: dict) -> str:
    rows, kinds, seq_lens = report["rows"], report["kinds"], report["seq_lens"]
    by = {(r["kind"], r["n"]): r for r in rows}
    cfg = report["model"]
    lines = [
        "# Attention scaling: forward latency and peak memory against sequence length",
        "",
        machine_markdown(report["machine"]),
        f"Model: d_model {cfg['d_model']}, {cfg['n_heads']} heads, {cfg['n_layers']} layers, "
        f"float input ({cfg['input_dim']} features), {cfg['head']} head, {cfg['position']} positions, "
        f"window {cfg['window']}, rank {cfg['rank']}, batch 1, bidirectional, float32, `torch.inference_mode()`. "
        "`sdpa` is PyTorch's fused `F.scaled_dot_product_attention` as plain full attention. "
        "`softmax` is our eps-softmax kind as it runs in eager PyTorch (fused SDPA with a null key); "
        "`softmax_explicit` is the same kind in the form it exports to mobile runtimes (the N x N matrix is built).",
        f"Command: `{report['command']}` ({report['total_seconds']:.0f} s in all).",
        "",
        "## Latency: p50 ms per forward (p90, p99, min and run counts in results.json)",
        "",
        markdown_table(["N", *kinds], [[n, *(_cell(by, k, n, "p50_ms", ".2f") for k in kinds)] for n in seq_lens]),
        "",
        "## Peak memory: extra RSS MB during one forward, beyond the built model and input",
        "",
        markdown_table(["N", *kinds],
                       [[n, *(_cell(by, k, n, "peak_extra_mb", ".1f") for k in kinds)] for n in seq_lens]),
        "",
        f"## Log-log slope of latency, N = {SLOPE_RANGE[0]}..{SLOPE_RANGE[1]} (1 = linear, 2 = quadratic)",
        "",
        markdown_table(["kind", "slope", "points"],
                       [[k, "-" if s is None else f"{s['slope']:.2f}", "-" if s is None else len(s["seq_lens"])]
                        for k, s in report["slopes"].items()]),
        "",
        "## Targets",
        "",
        markdown_table(["target", "measured", "needed", "result"],
                       [[t["target"], "-" if t["value"] is None else f"{t['value']:.2f}",
                         f"{t['comparison']} {t['needed']:g}", _result(t["pass"])] for t in report["targets"]]),
    ]
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {r['kind']} at N={r['n']}: {r['error']}" for r in errors]
    return "\n".join(lines)


def render_plot(report: dict) -> bytes:
    """Latency and peak memory against N, log-log, one line per kind, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for kind in report["kinds"]:
        rows = sorted((r for r in report["rows"] if r["kind"] == kind and "error" not in r), key=lambda r: r["n"])
        if not rows:
            continue
        n = [r["n"] for r in rows]
        slope = report["slopes"].get(kind)
        label = kind if slope is None else f"{kind} (slope {slope['slope']:.2f})"
        full = kind in ("softmax", "softmax_explicit", "sdpa")  # the quadratic baselines: dashed, square markers
        style = dict(marker="s" if full else "o", linestyle="--" if full else "-",
                     markerfacecolor="none" if full else None)
        ax_t.plot(n, [r["p50_ms"] for r in rows], label=label, **style)
        # A peak below one page rounds to 0, which a log axis cannot show.
        ax_m.plot(n, [r["peak_extra_mb"] if r["peak_extra_mb"] > 0 else math.nan for r in rows], label=kind, **style)
    for ax, title, ylabel in ((ax_t, "Forward latency (p50)", "ms"),
                              (ax_m, "Peak extra memory during the forward (RSS)", "MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(report["seq_lens"], [str(n) for n in report["seq_lens"]])
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(f"d_model 128, 4 heads, 2 layers, batch 1, {m['threads']} thread(s), {m['cpu']}, "
                 f"torch {m['versions']['torch']}", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


# -----------------------------------------------------------------------------
# CLI


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _kind_list(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ATTENTION]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown attention kind(s) {unknown or text!r}: use {','.join(sorted(ATTENTION))}")
    return kinds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=_int_list, default=list(SEQ_LENS), metavar="N,N,...",
                   help=f"sequence lengths (default {','.join(map(str, SEQ_LENS))})")
    p.add_argument("--kinds", type=_kind_list, default=list(KINDS), metavar="KIND,...",
                   help=f"attention kinds, from {','.join(sorted(ATTENTION))} (default {','.join(KINDS)})")
    p.add_argument("--out", type=Path, default=OUT,
                   help="results folder (default benchmarks/results/attention_scaling)")
    p.add_argument("--threads", type=_positive_int, default=1, help="PyTorch threads per forward (default 1)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # memory|latency:KIND:N: measure one case, print JSON
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        what, kind, n = args.worker.split(":")
        print(json.dumps(MEASURES[what](kind, int(n), args.threads)))
        return 0

    seq_lens = sorted(set(args.seq_lens))
    for kind in args.kinds:  # reject impossible shapes (a window longer than N) before minutes of work
        for n in seq_lens:
            try:
                model_config(kind, n)
            except ValueError as err:
                raise SystemExit(f"{kind} at N={n}: {err}") from err

    start = time.perf_counter()
    info = machine_info(args.threads)
    rows = []
    for n in seq_lens:
        for kind in args.kinds:
            row = run_case(kind, n, args.threads)
            rows.append(row)
            if "error" in row:
                print(f"N={n:5d} {kind:8s} ERROR {row['error']}", file=sys.stderr, flush=True)
            else:
                print(f"N={n:5d} {kind:8s} p50 {row['p50_ms']:9.2f} ms  p90 {row['p90_ms']:9.2f} ms  "
                      f"runs {row['runs']:4d}  peak +{row['peak_extra_mb']:8.1f} MB", flush=True)

    slopes = {kind: loglog_slope(rows, kind) for kind in args.kinds}
    info["loadavg_after_1m_5m_15m"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "machine": info,
        "model": MODEL,
        "timing": TIMING,
        "command": command_line(),
        "kinds": args.kinds,
        "seq_lens": seq_lens,
        "rows": rows,
        "slopes": slopes,
        "targets": check_targets(rows, slopes),
        "total_seconds": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", report)
    markdown = render_markdown(report)
    write_text(args.out / "results.md", markdown)
    write_bytes(args.out / "scaling.png", render_plot(report))
    print("\n" + markdown)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
