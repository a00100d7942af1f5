"""Helpers shared by the benchmark scripts: machine info, threads, timing, memory, results.

The scripts run as files (``python benchmarks/<name>.py``), so their own
folder is first on ``sys.path`` and they import this module as ``common``.

Timing follows gpt-fast: warm up, time each call with ``time.perf_counter``,
report the median and p90. Peak memory is the growth of the resident set
(RSS) during one call, read from ``/proc/self/status`` after resetting the
kernel's high-water mark, so it counts every allocator, not just PyTorch's.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from difftx_edge.io import atomic_write_bytes, atomic_write_json
from difftx_edge.runtimes.measure import int8_features_text

# Environment for a child process that measures memory, and only memory. A
# fixed mmap threshold turns off glibc's dynamic threshold, which would
# otherwise start serving large tensors from the heap after the first free and
# keep them resident: memory freed by the warm-up would be reused without
# raising the high-water mark (peak too low), and heap fragmentation would add
# pages no tensor uses (peak too high). With it, RSS follows the live tensors.
# It also makes every large tensor a fresh mmap whose pages fault in, which on
# a 2-core EPYC doubled the latency of the linear kind at N=4096: time in a
# process without it, as users run.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}


def pin_threads(threads: int) -> int:
    """Run PyTorch ops on ``threads`` threads; returns what torch reports back.

    Call it before any parallel work: torch refuses to resize the inter-op
    pool once it has started, and then only the intra-op count is set.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # the inter-op pool already started; intra-op threads are what matter for one forward
        pass
    return torch.get_num_threads()


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, or platform's guess elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int | None = None) -> dict:
    """What a reader needs to compare numbers across machines.

    The load average is included because a benchmark sharing its cores with
    other work runs slower, and the reader should see that.
    """
    from difftx_edge.runtimes.measure import cpu_features

    info = {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads() if threads is None else threads,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1m_5m_15m"] = [round(x, 2) for x in os.getloadavg()]
    return info


# -----------------------------------------------------------------------------
# Timing


def time_calls(fn: Callable[[], object], *, warmup: int = 2, min_runs: int = 5, min_seconds: float = 1.0,
               max_runs: int = 1000, slow_runs: int = 3, max_seconds: float = 10.0) -> list[float]:
    """Per-call wall times of ``fn`` in milliseconds, after ``warmup`` untimed calls.

    Runs until at least ``min_runs`` calls and ``min_seconds`` of timed calls,
    or ``max_runs`` calls; a slow ``fn`` stops after ``slow_runs`` calls once
    ``max_seconds`` have passed, so a multi-second call costs seconds, not minutes.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    total = 0.0
    while len(times) < max_runs:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed * 1e3)
        total += elapsed
        if len(times) >= min_runs and total >= min_seconds:
            break
        if len(times) >= slow_runs and total >= max_seconds:
            break
    return times


def summarize_ms(times_ms: list[float]) -> dict:
    """Median, p90, min and count of per-call times (ms)."""
    return {
        "median_ms": statistics.median(times_ms),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "min_ms": min(times_ms),
        "runs": len(times_ms),
    }


# -----------------------------------------------------------------------------
# Memory (Linux)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: peak memory needs Linux")


def rss_mb() -> float:
    """This process's resident set now, in MB."""
    return _status_kb("VmRSS") / 1024


def reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS.

    Raises:
        RuntimeError: the kernel refused or ignored the reset, so a peak read
            afterwards would still include earlier allocations.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as err:
        raise RuntimeError(f"cannot reset the peak RSS through /proc/self/clear_refs ({err})") from err
    # Allow a few pages: RSS can grow between the two reads (page faults in this very code).
    if _status_kb("VmHWM") > _status_kb("VmRSS") + 256:
        raise RuntimeError("writing 5 to /proc/self/clear_refs did not reset VmHWM: "
                           "this kernel cannot measure peak RSS")


def peak_extra_rss_mb(fn: Callable[[], object]) -> tuple[float, float]:
    """Peak resident memory that one call of ``fn`` adds, in MB, and the RSS before it.

    Warm ``fn`` up first, so that one-time allocations (caches, thread pools)
    count as the baseline rather than as the call's need.
    """
    reset_peak_rss()
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024, before / 1024


# -----------------------------------------------------------------------------
# Results


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_json(path, obj)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` (a PNG, a model file) atomically."""
    atomic_write_bytes(path, data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (markdown, CSV) atomically, ending with one newline."""
    atomic_write_bytes(path, (text.rstrip("\n") + "\n").encode())


def markdown_table(header: list[str], rows: list[list[object]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one of l/r/c per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_markdown(info: dict) -> str:
    """One line of machine info for the top of a results file."""
    load = info.get("loadavg_1m_5m_15m")
    parts = [f"{info['cpu']} ({int8_features_text(info.get('cpu_features'))})", f"{info['cores']} cores",
             f"{info['threads']} thread(s)",
             f"torch {info['torch']}", f"Python {info['python']}", info["os"]]
    if load:
        parts.append(f"load average {load[0]}")
    return "Machine: " + ", ".join(parts) + "."


def command_line() -> str:
    """The command that produced a results file, for reproducing it."""
    return " ".join(["python", *sys.argv])
