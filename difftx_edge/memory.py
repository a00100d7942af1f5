"""How much memory a piece of work may take, checked before it starts.

A request far larger than the machine (a 65536-token softmax, a model of
billions of parameters, a text task of millions of long windows) otherwise
fails deep inside an allocator with a traceback, or makes the kernel kill the
process, after minutes of work. Each such place estimates its need and calls
:func:`require_memory` first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difftx_edge.model import DiffTransformer, ModelConfig

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


def estimate_training_memory(cfg: ModelConfig, batch_size: int, seq_len: int, eval_batch: int = 256) -> dict:
    """Bytes a training run needs at its peak, by part: a deliberate over-estimate, to refuse the impossible.

    Args:
        cfg: the model.
        batch_size: training batch size.
        seq_len: sequence length N.
        eval_batch: the batch ``evaluate`` uses (no gradients, one layer's activations at a time).

    Returns:
        ``{"parameters", "activations", "evaluation", "total", "largest"}`` in bytes, with the
        number of parameters under ``"count"`` and the part that dominates under ``"largest"``.
    """
    with torch.device("meta"):  # counts the parameters without allocating them
        count = DiffTransformer(cfg).num_parameters()
    f32 = 4
    H, C, N = cfg.n_heads, cfg.d_model, seq_len
    d_ff = cfg.d_ff or 4 * C
    D = C // H

    def scores(kind: str, heads: int) -> float:
        """Floats one layer of ``kind`` keeps per example for ``heads`` heads: its score matrices."""
        if kind == "softmax":
            # Eager training runs the fused SDPA kernel, which never builds the (N, N+1) scores: it keeps the
            # padded q, k, v, the output and per-row statistics (measured: N=2000, batch 64, 1.9 GiB in all).
            return heads * N * (D + 4)
        if kind == "local":
            block = min(cfg.window, N)
            return heads * N * (3 * block + 2 * min(cfg.n_global, N))
        if kind == "linear":
            chunk = min(cfg.chunk, N)
            return heads * (N * (chunk + 2 * (D + 1)) + 2 * (-(-N // chunk)) * D * (D + 1))
        if kind == "lowrank":
            return heads * N * (cfg.rank + -(-cfg.max_len // cfg.rank)) * 2
        if kind == "hybrid":
            local = -(-heads // 2)
            return scores("local", local) + scores("linear", heads - local)
        return heads * N * (N + 1)  # a kind registered elsewhere: assume the quadratic worst case

    kinds = cfg.layer_kinds()
    attention = [scores(kind, H) for kind in kinds]  # floats per example, per layer
    dense = N * (14 * C + 3 * d_ff)  # floats per example per layer: LayerNorms, projections, MLP, residuals
    head = N * cfg.n_outputs if cfg.head == "lm" else cfg.n_outputs
    # A causal softmax builds its (N, N) bool mask, pads it to (N, N+1) for the null key, and SDPA turns that into
    # a float additive mask: 1 + 1 + 4 bytes a score, one layer at a time.
    masks = max((N * (N + 1) * 6 for kind in kinds if kind == "softmax" and cfg.causal), default=0)
    parts = {
        # weights, gradients, AdamW's two moments; the checkpoint's CPU copy and its serialized bytes
        "parameters": count * f32 * 11,
        # forward activations are kept for backward (scores and probabilities: 2x), plus one layer's gradients
        "activations": batch_size * f32 * (sum(dense + 2 * a for a in attention) + max(attention) + 3 * head)
        + masks,
        "evaluation": eval_batch * f32 * (dense // 2 + 2 * max(attention) + 2 * head) + masks,
    }
    total = parts["parameters"] + max(parts["activations"], parts["evaluation"])
    largest = max(parts, key=parts.get)
    return {**parts, "total": total, "largest": largest, "count": count}


def require_training_memory(cfg: ModelConfig, batch_size: int, seq_len: int, device: torch.device) -> None:
    """Refuse, in one line, a run whose estimate exceeds the memory available, before anything is allocated.

    Raises:
        ValueError: naming the part that needs the most, and the flags that shrink it.
    """
    need = estimate_training_memory(cfg, batch_size, seq_len)
    available = None  # the CPU's MemAvailable
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    quadratic = "softmax" in cfg.layer_kinds()
    advice = {
        "parameters": "lower --d-model, --n-layers or --d-ff",
        "activations": "lower --batch-size or --seq-len" + (
            ", or use --attention local, linear or hybrid, whose cost grows linearly with --seq-len"
            if quadratic else ", or lower --d-model"),
        "evaluation": "lower --seq-len" + (", or use --attention local, linear or hybrid" if quadratic else ""),
    }[need["largest"]]
    part = {"parameters": "weights, gradients and optimizer state", "activations": "training activations",
            "evaluation": "evaluation activations at batch 256"}[need["largest"]]
    what = (f"training {need['count']:,} parameters at batch {batch_size} and sequence length {seq_len} "
            f"({part}: {format_bytes(need[need['largest']])})")
    require_memory(need["total"], what, advice, available)
