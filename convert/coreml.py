"""Core ML: an .mlpackage mlprogram (iOS 17 by default), fp32, fp16, or int8 from the Core ML quantizer."""

from __future__ import annotations

from pathlib import Path

from difftx_edge.convert.registry import register_format

TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")


@register_format("coreml", filename="model.mlpackage", precisions=("fp32", "fp16", "int8"), quantizer="coreml",
                 extra="coreml", requires=("coremltools",), check="reference")
def export(program, path: Path, precision: str, options: dict) -> dict:
    import coremltools as ct

    target = options.get("deployment_target") or "iOS17"
    if target not in TARGETS:
        raise ValueError(f"unknown Core ML deployment target {target!r}: use one of {', '.join(TARGETS)}")
    # run_decompositions({}) turns the training IR into the ATen IR ct.convert reads.
    model = ct.convert(program.run_decompositions({}), convert_to="mlprogram",
                       minimum_deployment_target=getattr(ct.target, target),
                       compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                       skip_model_load=True)
    model.save(str(path))
    return {"deployment_target": target, "program": structure(path, precision)}


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
