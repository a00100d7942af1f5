"""Core ML: an .mlpackage mlprogram (iOS 17 by default), fp32, fp16, or int8 from the Core ML quantizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difftx_edge.convert.registry import register_format

TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")


def artifact_io(artifact: Path, facts: dict, inputs: list[dict], outputs: list[dict]) -> dict:
    """The tensor names, shapes and dtypes of the saved program, which the exporter described already."""
    return {side: [{"name": t["name"], "shape": list(t["shape"]), "dtype": t["dtype"]}
                   for t in facts["program"][side]] for side in ("inputs", "outputs")}


def reference(artifact: Path, facts: dict):
    """``run(x)``: the saved program's first output for one input batch, by reference evaluation.

    Core ML cannot run on Linux; coreml_reference evaluates each op with coremltools' own numpy code.
    """
    from difftx_edge.convert.coreml_reference import reference_predict

    # The exporter already described the saved program; loading it again for its input name is slow.
    (first_input,) = (tensor["name"] for tensor in facts["program"]["inputs"])

    def run(x: np.ndarray) -> np.ndarray:
        outputs = reference_predict(artifact, {first_input: x})
        return np.asarray(next(iter(outputs.values())))

    return run


@register_format("coreml", filename="model.mlpackage", precisions=("fp32", "fp16", "int8"), quantizer="coreml",
                 extra="coreml", requires=("coremltools",), check="reference", reference=reference,
                 reference_name="reference evaluation of the saved program with coremltools' per-op numpy code "
                                "(not the Core ML runtime)",
                 artifact_io=artifact_io, manifest_keys={"program": "its ops, I/O and weight dtypes"})
def export(program, path: Path, precision: str, options: dict) -> dict:
    import coremltools as ct

    target = options.get("deployment_target") or "iOS17"
    if target not in TARGETS:
        raise ValueError(f"unknown Core ML deployment target {target!r}: use one of {', '.join(TARGETS)}")
    model = ct.convert(aten_program(program), convert_to="mlprogram",
                       minimum_deployment_target=getattr(ct.target, target),
                       compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                       skip_model_load=True)
    model.save(str(path))
    return {"deployment_target": target, "program": structure(path, precision)}


def aten_program(program):
    """The ATen IR that ``ct.convert`` reads, with recurrent layers unrolled into ops it converts.

    ``run_decompositions`` turns the training IR into ATen IR. coremltools 9.0's ExportedProgram
    frontend has no converter for ``aten.gru``/``lstm``/``rnn_tanh``/``rnn_relu`` (``Unsupported fx
    node gru``), so torch's own decompositions of those unroll each layer over the exported (static)
    sequence length into linear, sigmoid, tanh and elementwise ops; every other op stays as
    ``run_decompositions({})`` leaves it.
    """
    import torch
    from torch._decomp import get_decompositions

    aten = torch.ops.aten
    recurrent = [getattr(op, form) for op in (aten.gru, aten.lstm, aten.rnn_tanh, aten.rnn_relu)
                 for form in ("input", "data")]
    return program.run_decompositions(get_decompositions(recurrent))


def structure(path: Path, precision: str) -> dict:
    """The saved program's ops, I/O and stored weight dtypes; int8 must really store its weights as int8.

    Core ML cannot run on Linux, so this structural check comes before the
    reference evaluation of the numbers.
    """
    from difftx_edge.convert.coreml_reference import describe

    found = describe(path)
    if precision == "int8" and not found["weights"].get("int8"):
        raise ValueError(f"the int8 Core ML program stores no int8 weights ({found['weights']}): "
                         "quantize with --backend coreml and export again")
    return found
