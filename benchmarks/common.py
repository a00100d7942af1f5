"""Helpers shared by the benchmark scripts: machine info, memory, results.

The scripts run as files (``python benchmarks/<name>.py``), so their own
folder is first on ``sys.path`` and they import this module as ``common``.

What the package already defines, they import from it, so that every number
is made the same way: threads from ``difftx_edge.threads.pin_threads``,
timing from the harness's ``timed_loop`` and ``summarize``
(``difftx_edge.runtimes.measure``: p50, p90 and p99 everywhere), tables from
``difftx_edge.markdown``, versions from ``difftx_edge.extras``. Peak memory is the growth of the resident set
(RSS) during one call, read from ``/proc/self/status`` after resetting the
kernel's high-water mark, so it counts every allocator, not just PyTorch's.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

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
    from difftx_edge.extras import versions
    from difftx_edge.runtimes.measure import cpu_features

    info = {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions(),
        "threads": torch.get_num_threads() if threads is None else threads,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1m_5m_15m"] = [round(x, 2) for x in os.getloadavg()]
    return info


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


def machine_markdown(info: dict) -> str:
    """One line of machine info for the top of a results file."""
    load = info.get("loadavg_1m_5m_15m")
    parts = [f"{info['cpu']} ({int8_features_text(info.get('cpu_features'))})", f"{info['cores']} cores",
             f"{info['threads']} thread(s)",
             f"torch {info['versions']['torch']}", f"Python {info['python']}", info["os"]]
    if load:
        parts.append(f"load average {load[0]}")
    return "Machine: " + ", ".join(parts) + "."


def command_line() -> str:
    """The command that produced a results file, for reproducing it."""
    return " ".join(["python", *sys.argv])
