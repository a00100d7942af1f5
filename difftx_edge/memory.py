"""How much memory a piece of work may take, checked before it starts.

A request far larger than the machine (a 65536-token softmax, a model of
billions of parameters, a text task of millions of long windows) otherwise
fails deep inside an allocator with a traceback, or makes the kernel kill the
process, after minutes of work. Each such place estimates its need and calls
:func:`require_memory` first.
"""

from __future__ import annotations

from pathlib import Path

_MEMINFO = Path("/proc/meminfo")


def available_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo``: what can be allocated without swapping; None where unknown."""
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts in KiB
    except (OSError, ValueError, IndexError):
        return None
    return None


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human number: ``4.0 GiB``."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} PiB"


def require_memory(needed: float, what: str, advice: str, available: int | None = None) -> None:
    """Raise ValueError when ``needed`` bytes exceed the memory available now.

    Args:
        needed: the estimate, in bytes.
        what: what needs it, e.g. ``"training (activations 3.9 GiB, ...)"``.
        advice: what to reduce, e.g. ``"lower --batch-size or --seq-len"``.
        available: the bytes available; None reads ``/proc/meminfo`` (no check where it is missing).

    Raises:
        ValueError: one line naming the estimate, the memory available and the advice.
    """
    available = available_bytes() if available is None else available
    if available is not None and needed > available:
        raise ValueError(f"{what} needs about {format_bytes(needed)}, but only {format_bytes(available)} of memory "
                         f"is available: {advice}")
