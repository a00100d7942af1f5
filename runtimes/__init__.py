"""Runners, one module per runtime (ExecuTorch, LiteRT, ONNX Runtime, Core ML). Installed as ``difftx_edge.runtimes``.

Importing this package loads no runtime: each runner imports its packages when it loads an artifact.
"""

from difftx_edge.runtimes import coreml, eager, executorch, litert, onnxruntime  # noqa: F401  (each registers)
from difftx_edge.runtimes.registry import RUNTIMES, Bundle, RuntimeSpec, register_runtime, runtime_for

__all__ = ["RUNTIMES", "Bundle", "RuntimeSpec", "register_runtime", "runtime_for"]
