"""ExecuTorch's Python runtime (pybindings), with the XNNPACK backend it ships."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difftx_edge.runtimes.registry import register_runtime


@register_runtime("executorch", format="executorch", extra="executorch", requires=(("executorch",),))
class ExecuTorchRunner:
    def __init__(self, path: str | Path, threads: int = 1):
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        _register_quantized_kernels()
        _unsafe_reset_threadpool(threads)
        self.path, self.threads = Path(path), threads
        self.method = Runtime.get().load_program(self.path).load_method("forward")

    @staticmethod
    def import_runtime() -> None:
        import executorch.extension.pybindings.portable_lib  # noqa: F401
        import executorch.runtime  # noqa: F401

        _register_quantized_kernels()

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        outputs = self.method.execute([torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
        return [o.numpy().copy() for o in outputs]

    def info(self) -> dict:
        from importlib.metadata import version

        return {"runtime": "executorch", "runner": "python", "version": version("executorch"), "threads": self.threads}


def _register_quantized_kernels() -> None:
    """Register the quantized kernels with the runtime: an int8 .pte looks up its token embedding there.

    The pybindings runtime holds the portable and optimized kernels only; without these, loading an int8 .pte
    fails on ``quantized_decomposed::embedding_byte.out`` (``convert/executorch.py``).
    """
    import executorch.kernels.quantized  # noqa: F401
