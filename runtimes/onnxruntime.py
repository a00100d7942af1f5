"""ONNX Runtime: the CPU execution provider, and CUDA when the installed build has it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difftx_edge.runtimes.registry import register_runtime

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Session input types, as ONNX Runtime names them, for inputs handed over in another dtype.
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


@register_runtime("onnxruntime", format="onnx", extra="onnx", requires=(("onnxruntime",),), devices=("cpu", "cuda"))
class OnnxRuntimeRunner:
    def __init__(self, path: str | Path, threads: int = 1, device: str = "cpu"):
        import onnxruntime as ort

        provider, available = PROVIDERS[device], ort.get_available_providers()
        if provider not in available:
            raise ValueError(f"this onnxruntime build has no {provider} (it has {', '.join(available)}): "
                             "pip install onnxruntime-gpu on a machine with an NVIDIA GPU and CUDA")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.path, self.threads, self.device = Path(path), threads, device
        self.session = ort.InferenceSession(str(self.path), options, providers=[provider])
        self.inputs = self.session.get_inputs()

    @staticmethod
    def import_runtime() -> None:
        import onnxruntime  # noqa: F401

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        feed = {spec.name: np.ascontiguousarray(x, dtype=NUMPY_TYPES.get(spec.type, x.dtype))
                for spec, x in zip(self.inputs, inputs, strict=True)}
        return self.session.run(None, feed)

    def info(self) -> dict:
        import onnxruntime as ort

        return {"runtime": "onnxruntime", "version": ort.__version__, "threads": self.threads,
                "device": self.device, "providers": self.session.get_providers()}
