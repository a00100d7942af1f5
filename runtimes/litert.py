"""LiteRT (ai-edge-litert), falling back to tflite_runtime, whose interpreter API is the same.

Quantized inputs and outputs are (de)quantized here with the tensor's own
scale and zero point, and int64 token ids become the int32 the converter made
of them.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

from difftx_edge.runtimes.registry import register_runtime

# convert/litert.py names each tensor after the FX nodes it holds the value of: "fx:add_1;;fx:mean;", plus a
# counter where a name repeats ("fx:linear;1"). A tensor named otherwise (a constant, the signature's input) or
# named after one plus a suffix (the float twin of an int8 GELU, "fx:gelu;/float") is not tapped.
_FX_NAMES = re.compile(r"(?:fx:[^;]+;;?)+\d*")
# The graph outputs, which the converter names after the signature, come back named by position.
OUTPUT = "output:"


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

    def intermediates(self, inputs: list[np.ndarray]) -> list[tuple[list[str], np.ndarray, float | None]]:
        """``(FX nodes, value, int8 step)`` of every op output named after the FX nodes it came from, in
        execution order, then of each graph output (named ``output:<position>``).

        A second interpreter runs with every tensor preserved and without the
        default XNNPACK delegate, whose intermediates read back as garbage (it
        keeps its own buffers): ``diff`` therefore checks LiteRT's builtin
        kernels on this file, not XNNPACK's. An op the converter fused lists
        every node it came from, in no reliable order. int8 tensors come back
        dequantized, with their scale as the step; per-channel ones (weights)
        are left out.
        """
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        interpreter = Interpreter(model_path=str(self.path), num_threads=self.threads,
                                  experimental_preserve_all_tensors=True,
                                  experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        interpreter.allocate_tensors()
        for spec, x in zip(interpreter.get_input_details(), inputs, strict=True):
            interpreter.set_tensor(spec["index"], _to_input(x, spec))
        interpreter.invoke()
        details = {d["index"]: d for d in interpreter.get_tensor_details()}
        ops = interpreter._get_ops_details()
        made = {index for op in ops for index in op["outputs"]}
        made |= {spec["index"] for spec in interpreter.get_input_details()}
        # The converter folds constant arithmetic across nodes: a Linear's bias went into the next add's
        # constant ("fx:add;;fx:linear;"), and the tensor named "fx:linear;" then held x @ W.T alone. A node
        # listed on a constant beside others is therefore not tapped on a tensor of its own.
        folded = {node for index, detail in details.items() if index not in made
                  for node in _fx_nodes(detail["name"]) if len(_fx_nodes(detail["name"])) > 1}
        found = []
        for op in ops:
            for index in op["outputs"]:
                detail = details.get(index)
                if detail is None or not _FX_NAMES.fullmatch(detail["name"]) or _per_channel(detail):
                    continue
                nodes = _fx_nodes(detail["name"])
                if len(nodes) == 1 and nodes[0] in folded:
                    continue
                found.append((nodes, *_tapped(interpreter.get_tensor(index), detail)))
        for position, spec in enumerate(interpreter.get_output_details()):
            found.append(([f"{OUTPUT}{position}"], *_tapped(interpreter.get_tensor(spec["index"]), spec)))
        return found

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


def _fx_nodes(name: str) -> list[str]:
    return re.findall(r"fx:([^;]+);", name) if _FX_NAMES.fullmatch(name) else []


def _per_channel(detail: dict) -> bool:
    return len(detail.get("quantization_parameters", {}).get("scales", ())) > 1


def _tapped(value: np.ndarray, detail: dict) -> tuple[np.ndarray, float | None]:
    """A tensor as float, with its int8 step (its scale) when it is quantized."""
    scale = detail["quantization"][0]
    float_value = _from_output(value, detail).astype(np.float32, copy=False)
    return float_value, (float(scale) if scale and np.issubdtype(value.dtype, np.integer) else None)


def _from_output(y: np.ndarray, spec: dict) -> np.ndarray:
    scale, zero = spec["quantization"]
    if scale and np.issubdtype(y.dtype, np.integer):
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
    return y.copy()
