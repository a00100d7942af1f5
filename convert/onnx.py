"""ONNX: one self-contained opset-18 file from the dynamo exporter, checked with onnx's full checker."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difftx_edge.convert.registry import register_format

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
    # 1 kB a node, a quarter of a small int8 file, and the trace names this machine's source paths.
    for node in onnx_program.model.graph.all_nodes():
        node.metadata_props.clear()
    onnx_program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"opset": OPSET, "ops": dict(sorted(ops.items()))}
