"""ONNX Runtime: the CPU execution provider, and CUDA when the installed build has it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difftx_edge.runtimes.registry import register_runtime

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Session input types, as ONNX Runtime names them, for inputs handed over in another dtype.
# The metadata key convert/onnx.py keeps on the ONNX node that computes a source program node's value, naming
# that node: what `difftx-edge diff` aligns ONNX Runtime's tensors with PyTorch's by.
FX_NODE = "difftx.fx_node"
# Graph optimisation levels by the names `diff --against` takes.
OPTIMIZATION = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                "all": "ORT_ENABLE_ALL"}
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


@register_runtime("onnxruntime", format="onnx", extra="onnx", requires=(("onnxruntime",),), devices=("cpu", "cuda"))
class OnnxRuntimeRunner:
    def __init__(self, path: str | Path, threads: int = 1, device: str = "cpu", optimization: str = "all"):
        import onnxruntime as ort

        provider, available = PROVIDERS[device], ort.get_available_providers()
        if provider not in available:
            raise ValueError(f"this onnxruntime build has no {provider} (it has {', '.join(available)}): "
                             "pip install onnxruntime-gpu on a machine with an NVIDIA GPU and CUDA")
        self.path, self.threads, self.device, self.optimization = Path(path), threads, device, optimization
        self.session = ort.InferenceSession(str(self.path), self._options(), providers=[provider])
        self.inputs = self.session.get_inputs()

    def _options(self):
        import onnxruntime as ort

        if self.optimization not in OPTIMIZATION:
            raise ValueError(f"unknown ONNX Runtime optimisation level {self.optimization!r}: use one of "
                             f"{', '.join(OPTIMIZATION)}")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION[self.optimization])
        return options

    @staticmethod
    def import_runtime() -> None:
        import onnxruntime  # noqa: F401

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        feed = {spec.name: np.ascontiguousarray(x, dtype=NUMPY_TYPES.get(spec.type, x.dtype))
                for spec, x in zip(self.inputs, inputs, strict=True)}
        return self.session.run(None, feed)

    def intermediates(self, inputs: list[np.ndarray]) -> list[tuple[str, np.ndarray, float | None]]:
        """``(source node, value, int8 step)`` of every value the export tagged with its source program node.

        The tagged values become graph outputs of a copy of the model, run at
        this runner's optimisation level. A value that is a graph output cannot
        be fused away, so fusions that would consume one (an int8 MatMul's
        float result, say) do not happen in this run; a QuantizeLinear output
        is what a fused integer node produces too, and is still compared. int8
        values come back dequantized, with their scale as the step.
        """
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        model = onnx.load(str(self.path))
        constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        producer = {value: node for node in model.graph.node for value in node.output}
        quantized_inputs = {value for node in model.graph.node if node.op_type == "QuantizeLinear"
                            for value in node.input[:1]}
        tagged: dict[str, tuple[str, tuple[float, int] | None]] = {}  # value -> (source node, int8 scale/zero)
        for node in model.graph.node:
            source = next((p.value for p in node.metadata_props if p.key == FX_NODE), None)
            if source is None or node.op_type == "DequantizeLinear" or _in_qdq_group(node, producer,
                                                                                     quantized_inputs):
                continue
            quantized = None
            if node.op_type == "QuantizeLinear" and node.input[1] in constants:
                zero = constants.get(node.input[2]) if len(node.input) > 2 else None
                quantized = (float(constants[node.input[1]]), int(zero) if zero is not None else 0)
            tagged[node.output[0]] = (source, quantized)  # the last node of an op's decomposition wins
        known = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in tagged if name not in known)
        session = ort.InferenceSession(model.SerializeToString(), self._options(),
                                       providers=[PROVIDERS[self.device]])
        feed = {spec.name: np.ascontiguousarray(x, dtype=NUMPY_TYPES.get(spec.type, x.dtype))
                for spec, x in zip(session.get_inputs(), inputs, strict=True)}
        names = list(tagged)
        found = []
        for name, value in zip(names, session.run(names, feed), strict=True):
            source, quantized = tagged[name]
            if quantized is not None:
                scale, zero = quantized
                found.append((source, ((value.astype(np.float32) - zero) * scale).astype(np.float32), scale))
            elif np.issubdtype(np.asarray(value).dtype, np.number) or np.asarray(value).dtype == bool:
                found.append((source, np.asarray(value, dtype=np.float32), None))
        return found

    def info(self) -> dict:
        import onnxruntime as ort

        return {"runtime": "onnxruntime", "version": ort.__version__, "threads": self.threads,
                "device": self.device, "providers": self.session.get_providers()}


def _in_qdq_group(node, producer: dict, quantized_inputs: set[str]) -> bool:
    """Whether ``node`` sits between DequantizeLinear and QuantizeLinear, where ONNX Runtime fuses the group
    into one integer kernel. Its float output exists only in the unfused graph: making it a graph output
    would keep the group from fusing, and the tap would see float arithmetic the artifact does not run. The
    group's QuantizeLinear output is what the fused kernel writes, and is tapped instead."""
    from_dequantize = any(value in producer and producer[value].op_type == "DequantizeLinear"
                          for value in node.input)
    return from_dequantize and any(value in quantized_inputs for value in node.output)
