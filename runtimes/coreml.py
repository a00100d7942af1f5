"""Core ML: ``predict`` on macOS; elsewhere a clear line, and the reference evaluation for checks."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from difftx_edge.runtimes.registry import register_runtime


@register_runtime("coreml", format="coreml", extra="coreml", requires=(("coremltools",),))
class CoreMLRunner:
    def __init__(self, path: str | Path, threads: int = 1):
        if platform.system() != "Darwin":
            raise ValueError("the Core ML runtime needs macOS: on Linux a .mlpackage can only be checked by "
                             "reference evaluation (difftx_edge.convert.coreml_reference)")
        import coremltools as ct

        self.path, self.threads = Path(path), threads
        self.model = ct.models.MLModel(str(self.path))
        spec = self.model.get_spec().description
        self.input_names = [i.name for i in spec.input]
        self.output_names = [o.name for o in spec.output]

    @staticmethod
    def import_runtime() -> None:
        import coremltools  # noqa: F401

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        result = self.model.predict(dict(zip(self.input_names, inputs, strict=True)))
        return [np.asarray(result[name]) for name in self.output_names]

    def info(self) -> dict:
        import coremltools as ct

        return {"runtime": "coreml", "version": ct.__version__, "threads": self.threads}
