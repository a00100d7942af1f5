"""ONNX Runtime: the CPU execution provider, and CUDA when the installed build has it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from difftx_edge.runtimes.registry import register_runtime


@register_runtime("onnxruntime", format="onnx", extra="onnx", requires=(("onnxruntime",),))
class OnnxRuntimeRunner:
    def __init__(self, path: str | Path, threads: int = 1, provider: str = "CPUExecutionProvider"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.path, self.threads = Path(path), threads
        self.session = ort.InferenceSession(str(self.path), options, providers=[provider])
        self.inputs = self.session.get_inputs()

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        feed = {spec.name: np.ascontiguousarray(x) for spec, x in zip(self.inputs, inputs, strict=True)}
        return self.session.run(None, feed)

    def info(self) -> dict:
        import onnxruntime as ort

        return {"runtime": "onnxruntime", "version": ort.__version__, "threads": self.threads,
                "providers": self.session.get_providers()}
