"""LiteRT (ai-edge-litert), falling back to tflite_runtime, whose interpreter API is the same.

Quantized inputs and outputs are (de)quantized here with the tensor's own
scale and zero point, and int64 token ids become the int32 the converter made
of them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from difftx_edge.runtimes.registry import register_runtime


def interpreter_class():
    if importlib.util.find_spec("ai_edge_litert") is not None:
        from ai_edge_litert.interpreter import Interpreter
    else:  # devices with only the legacy runtime (it needs numpy<2)
        from tflite_runtime.interpreter import Interpreter
    return Interpreter


@register_runtime("litert", format="litert", extra="litert", requires=(("ai_edge_litert",), ("tflite_runtime",)))
class LiteRTRunner:
    def __init__(self, path: str | Path, threads: int = 1):
        self.path, self.threads = Path(path), threads
        self.interpreter = interpreter_class()(model_path=str(self.path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()

    @staticmethod
    def import_runtime() -> None:
        interpreter_class()

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        for spec, x in zip(self.inputs, inputs, strict=True):
            self.interpreter.set_tensor(spec["index"], _to_input(x, spec))
        self.interpreter.invoke()
        return [_from_output(self.interpreter.get_tensor(spec["index"]), spec) for spec in self.outputs]

    def delegation(self) -> dict:
        """Partitions (one delegate node each), delegated and total ops, and the ops left to the interpreter.

        The interpreter keeps the nodes a delegate replaced and does not expose
        its execution plan, so this walks back from the outputs: a tensor a
        delegate node produces comes from it, any other from the original op,
        which therefore runs outside every delegate.
        """
        ops = self.interpreter._get_ops_details()
        delegates = [op for op in ops if "delegate" in op["op_name"].lower()]
        originals = [op for op in ops if "delegate" not in op["op_name"].lower()]
        producer = {t: op for op in originals for t in op["outputs"]}
        producer.update({t: op for op in delegates for t in op["outputs"]})
        needed = [spec["index"] for spec in self.outputs]
        seen_tensors, outside = set(), {}  # outside: op index -> op name
        while needed:
            tensor = needed.pop()
            if tensor in seen_tensors or tensor not in producer:
                continue  # graph inputs and constants have no producer
            seen_tensors.add(tensor)
            op = producer[tensor]
            if "delegate" not in op["op_name"].lower():
                outside[op["index"]] = op["op_name"]
            needed.extend(t for t in op["inputs"] if t >= 0)
        counts: dict[str, int] = {}
        for name in outside.values():
            counts[name] = counts.get(name, 0) + 1
        return {"partitions": len(delegates), "delegated_ops": len(originals) - len(outside),
                "total_ops": len(originals), "undelegated": counts}

    def info(self) -> dict:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = {"runtime": "ai-edge-litert", "version": version("ai-edge-litert")}
        except PackageNotFoundError:
            found = {"runtime": "tflite-runtime", "version": version("tflite-runtime")}
        return {**found, "threads": self.threads}


def _to_input(x: np.ndarray, spec: dict) -> np.ndarray:
    scale, zero = spec["quantization"]
    if scale and np.issubdtype(spec["dtype"], np.integer) and np.issubdtype(x.dtype, np.floating):
        info = np.iinfo(spec["dtype"])
        return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(spec["dtype"])
    return np.ascontiguousarray(x.astype(spec["dtype"], copy=False))


def _from_output(y: np.ndarray, spec: dict) -> np.ndarray:
    scale, zero = spec["quantization"]
    if scale and np.issubdtype(y.dtype, np.integer):
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
    return y.copy()
