"""Pinning PyTorch's thread pools: the one place that sets them, for training, eager runs and benchmarks.

torch is imported inside the function, so importing this module stays light
(the device runner's zipapp carries it for the eager runtime).
"""

from __future__ import annotations


def pin_threads(threads: int) -> int:
    """Run PyTorch ops on ``threads`` threads; returns what torch reports back.

    Oversubscribed threads slow small models by an order of magnitude, so
    callers always pin. The inter-op pool is resized too where it has not
    started yet: torch refuses to resize it once it has, and then only the
    intra-op count, which is what one forward or training step uses, is set.

    Raises:
        ValueError: ``threads`` is below 1.
    """
    import torch

    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # the inter-op pool already started: intra-op threads are what matter here
        pass
    return torch.get_num_threads()
