"""difftx-edge: compact Differentiable Transformers for phones, boards and microcontrollers.

Importing the package is light: the export backends (ExecuTorch, LiteRT,
Core ML, ONNX) are imported only inside the functions that use them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from difftx_edge.model import ATTENTION, DiffTransformer, ModelConfig, register_attention  # noqa: E402

__all__ = ["ATTENTION", "DiffTransformer", "ModelConfig", "register_attention", "__version__"]
