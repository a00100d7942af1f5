"""ONNX: one self-contained opset-18 file from the dynamo exporter, checked with onnx's full checker."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difftx_edge.convert.registry import register_format
from difftx_edge.runtimes.onnxruntime import FX_NODE

OPSET = 18


def artifact_io(artifact: Path, facts: dict, inputs: list[dict], outputs: list[dict]) -> dict:
    """The .onnx file's own tensor names and dtypes, with the program's shapes."""
    import onnxruntime as ort

    from difftx_edge.runtimes.onnxruntime import NUMPY_TYPES

    session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    return {side: [{"name": t.name, "shape": list(ours["shape"]), "dtype": np.dtype(NUMPY_TYPES[t.type]).name}
                   for t, ours in zip(found, program, strict=True)]
            for side, found, program in (("inputs", session.get_inputs(), inputs),
                                         ("outputs", session.get_outputs(), outputs))}


@register_format("onnx", filename="model.onnx", precisions=("fp32", "int8"), quantizer="onnx", extra="onnx",
                 requires=("onnx", "onnxruntime", "onnxscript"), artifact_io=artifact_io)
def export(program, path: Path, precision: str, options: dict) -> dict:
    import onnx
    import torch

    onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=OPSET, external_data=False,
                                     verbose=False)
    # The exporter annotates every node with its module path, FX node and Python stack trace: about
    # 1 kB a node, a quarter of a small int8 file, and the trace names this machine's source paths. Only the
    # name of the source program's node is kept, on the ONNX node that computes that node's value.
    source_names = _source_node_names(onnx_program.exported_program, program)
    for node in onnx_program.model.graph.all_nodes():
        node.metadata_props.clear()
        value = node.outputs[0].name if node.outputs else None
        if value in source_names:
            node.metadata_props[FX_NODE] = source_names[value]
    onnx_program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"opset": OPSET, "ops": dict(sorted(ops.items()))}


def _source_node_names(decomposed, program) -> dict[str, str]:
    """The node of ``program`` (handed to the exporter) each node of the exporter's ``decomposed`` program,
    whose names the ONNX values carry, was made from: the nearest ``program`` node in its ``from_node``
    provenance (its own name only where it has none). An op decomposed into several nodes maps each of them
    to the op; the last of them in the graph computes its value."""
    wanted = {node.name for node in program.graph.nodes if node.op == "call_function"}
    names = {}
    for node in decomposed.graph.nodes:
        if node.op != "call_function":
            continue
        sources = node.meta.get("from_node") or []
        origin = None if sources else node.name
        while sources and origin not in wanted:  # each step of provenance names the node it was made from
            origin, sources = sources[0].name, sources[0].from_node
        if origin in wanted:
            names[node.name] = origin
    return names
