"""difftx-edge: compact Differentiable Transformers for phones, boards and microcontrollers.

Importing the package is light: the export backends (ExecuTorch, LiteRT,
Core ML, ONNX) are imported only inside the functions that use them.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# OpenMP threads that spin while they wait for work keep spinning when the other cores are busy:
# two spinning threads on a busy 2-core machine made training 7x slower than one thread. Passive
# threads sleep instead. libgomp reads this once, when torch loads it, so it is set here, before
# the first import of torch (``import torch`` before ``import difftx_edge`` keeps OpenMP's default);
# child processes inherit it, and a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from difftx_edge.model import ATTENTION, DiffTransformer, ModelConfig, register_attention  # noqa: E402

__all__ = ["ATTENTION", "DiffTransformer", "ModelConfig", "register_attention", "__version__"]
