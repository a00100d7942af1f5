"""Export to bundles: the artifact, checked against PyTorch in its runtime, plus ``manifest.json``.

A bundle is ``OUT/<format>-<precision>/`` holding the artifact and its
manifest. It is built in a hidden staging directory beside it and renamed into
place only after parity passed, so a failed or interrupted export leaves no
bundle, and an existing bundle is replaced in one step.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from difftx_edge.convert.registry import FORMATS, FormatSpec
from difftx_edge.hashing import sha256_tree
from difftx_edge.io import make_dirs, make_stage_dir, remove_empty_dirs, remove_stale_stages
from difftx_edge.runtimes.measure import accuracy as task_accuracy

# Parity tolerances: fp32 in absolute logits; int8 in output quantization steps, plus top-1 agreement.
FP32_ATOL = 1e-4
FP16_ATOL = 5e-2
INT8_MAX_STEPS = 2.0
INT8_MIN_AGREEMENT = 0.99
MANIFEST = "manifest.json"
# What a parity failure line says to try next. The int8 artifact is held to the converted int8 program, so
# a gap is the runtime's integer kernels rounding differently: they pick their code path by CPU feature (an
# int8 dot product or not: parity.machine) and split work by thread count; QAT and PTQ give different weights
# and scales, so the other method's program can fall on the kernels' safe side.
INT8_NEXT = ("try: export again with --threads 1; quantize with the other --method (ptq or qat) and export again; "
             "else report it with the quantized.pt2 and this line (the manifest's parity.machine names the CPU)")
FLOAT_NEXT = ("an error this size means the runtime computes some op differently from PyTorch, not rounding: try "
              "--threads 1, else report it with the model (.pt2 or run) and this line")


def build_bundle(spec: FormatSpec, program: torch.export.ExportedProgram, precision: str, *, out: Path,
                 reference, parity_inputs: list, output_step: float | None, meta: dict,
                 accuracy_split=None, options: dict | None = None, threads: int = 1,
                 report: Callable[[list[list[np.ndarray]], dict], dict] | None = None) -> dict:
    """Export one artifact, check it in its runtime, and move the bundle into ``out``.

    Args:
        spec: the format.
        program: a static-shape ExportedProgram (fp32 model, or the converted int8 program).
        precision: fp32, fp16, int8 or int8-dynamic.
        out: the directory that receives ``<format>-<precision>/``.
        reference: ``reference(*args: np.ndarray) -> np.ndarray``, PyTorch's first output for one sample.
        parity_inputs: held-out samples, each one array (a program of one input) or a tuple of arrays, one per
            program input in its order, of the exported shapes.
        output_step: the int8 output quantization step (int8; int8-dynamic when its output has one).
        meta: task, labels, source checkpoint, versions... copied into the manifest.
        accuracy_split: ``(inputs, targets)`` batches for the task accuracy in the runtime, or None.
        options: exporter options (example inputs, deployment target).
        threads: runtime threads.
        report: ``report(outputs, parity) -> dict`` of more manifest entries, called once parity passed, with
            the artifact's outputs (all of them, a list per sample) on ``parity_inputs`` and the parity result.

    Returns:
        The manifest.

    Raises:
        ValueError: the export failed (naming the op where the toolchain does) or parity failed.
    """
    out, meta = Path(out), dict(meta)
    name = f"{spec.name}-{precision}"
    # OUT is made here, not by the caller, and removed again if this bundle fails and it is left empty:
    # a failed export leaves no new folder. Staging a kill left behind is removed before a new one starts.
    created = make_dirs(out)
    remove_stale_stages(out, f".{name}.")
    stage = make_stage_dir(out, f".{name}.")
    try:
        artifact = stage / spec.filename
        started = time.perf_counter()
        facts = spec.export(program, artifact, precision, dict(options or {}))
        export_seconds = time.perf_counter() - started
        run = _runner(spec, artifact, threads, facts)
        runtime_all = [run(*_args(x)) for x in parity_inputs]
        runtime_out = [outputs[0] for outputs in runtime_all]
        torch_out = [reference(*_args(x)) for x in parity_inputs]
        parity = compare(runtime_out, torch_out, precision, output_step)
        parity["check"] = spec.reference_name if spec.check == "reference" else f"{spec.name} runtime"
        parity["machine"] = checked_on()
        if not parity["passed"]:
            raise ValueError(f"{name} failed parity against PyTorch: {parity['failure']}; no bundle written")
        accuracy = None
        if accuracy_split is not None:
            inputs, targets = accuracy_split
            accuracy = {"artifact": task_accuracy([run(*_args(x))[0] for x in inputs], targets),
                        "pytorch": task_accuracy([reference(*_args(x)) for x in inputs], targets),
                        "examples": int(sum(len(t) for t in targets)), "measured_by": parity["check"]}
        manifest = {
            "format": spec.name, "precision": precision, "artifact": spec.filename,
            "artifact_bytes": _size(artifact), "artifact_sha256": sha256_tree(artifact),
            **artifact_io(spec, artifact, facts, meta.pop("inputs"), meta.pop("outputs")),
            **meta, **facts, "parity": parity, "accuracy": accuracy,
            **(report(runtime_all, parity) if report is not None else {}),
            "export_seconds": round(export_seconds, 3),
        }
        validate_manifest(manifest)
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_in(stage, out / name)
        return manifest
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        remove_empty_dirs(created)
        raise


def artifact_io(spec: FormatSpec, artifact: Path, facts: dict, inputs: list[dict], outputs: list[dict]) -> dict:
    """The I/O the artifact itself declares, which is what an app must feed and read.

    ``inputs`` and ``outputs`` describe the exported program. A file may
    name its tensors itself, take another dtype or declare int8 tensors with a
    scale and zero point; its format's ``artifact_io`` reads them. A format
    without one (a .pte stores no names) keeps the program's.
    """
    if spec.artifact_io is None:
        return {"inputs": inputs, "outputs": outputs}
    return spec.artifact_io(artifact, facts, inputs, outputs)


def compare(runtime_out: list[np.ndarray], torch_out: list[np.ndarray], precision: str,
            output_step: float | None) -> dict:
    """Max and mean absolute error and top-1 agreement, judged by the precision's tolerance."""
    a = np.concatenate([np.asarray(x, np.float64).reshape(len(x), -1) for x in runtime_out])
    b = np.concatenate([np.asarray(x, np.float64).reshape(len(x), -1) for x in torch_out])
    if a.shape != b.shape:
        return {"passed": False, "failure": f"output shape {a.shape} differs from PyTorch's {b.shape}"}
    classes = torch_out[0].shape[-1]
    diff = np.abs(a - b)
    top_a = a.reshape(-1, classes).argmax(-1)
    top_b = b.reshape(-1, classes).argmax(-1)
    result = {"max_abs_error": float(diff.max()), "mean_abs_error": float(diff.mean()),
              "top1_agreement": float((top_a == top_b).mean()), "samples": int(len(a))}
    if precision.startswith("int8"):  # int8-dynamic's step: what a per-tensor int8 output would have
        steps = result["max_abs_error"] / output_step if output_step else float("inf")
        result.update(output_step=output_step, max_steps=steps,
                      tolerance=f"<= {INT8_MAX_STEPS:g} output steps and >= {INT8_MIN_AGREEMENT:.0%} top-1 agreement")
        # Both sides dequantize integers with float32 scales: 2 steps can read 2.0000026.
        ok = steps <= INT8_MAX_STEPS + 1e-3 and result["top1_agreement"] >= INT8_MIN_AGREEMENT
        within = float((diff <= INT8_MAX_STEPS * output_step).mean()) if output_step else 0.0
        if output_step:
            failure = (f"{steps:.2f} output steps apart at most ({result['mean_abs_error'] / output_step:.2f} on "
                       f"average, {within:.2%} of logits within {INT8_MAX_STEPS:g}), top-1 agreement "
                       f"{result['top1_agreement']:.2%}; {INT8_NEXT}")
        else:
            failure = "no output quantization step to compare in: export int8 from a program of difftx-edge quantize"
    else:
        atol = FP32_ATOL if precision == "fp32" else FP16_ATOL
        result["tolerance"] = f"max abs error <= {atol:g}"
        ok = result["max_abs_error"] <= atol
        failure = (f"max abs error {result['max_abs_error']:.3g} > {atol:g}, the {precision} tolerance on the logits; "
                   + FLOAT_NEXT)
    result["passed"] = bool(ok)
    if not ok:
        result["failure"] = failure
    return result


def sqnr_db(reference: list[np.ndarray], test: list[np.ndarray]) -> float | None:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``, in dB, over all samples.

    ``10 log10(sum(reference^2) / sum((reference - test)^2))``: 20 dB is an error a tenth of the signal's
    amplitude, 40 dB a hundredth. None when the two are identical (no noise).
    """
    ref = np.concatenate([np.asarray(x, np.float64).ravel() for x in reference])
    noise = float(np.square(ref - np.concatenate([np.asarray(x, np.float64).ravel() for x in test])).sum())
    if noise == 0.0:
        return None
    return round(10 * float(np.log10(max(float(np.square(ref).sum()), 1e-300) / noise)), 2)


def top1_agreement(reference: list[np.ndarray], test: list[np.ndarray]) -> float | None:
    """How often the two agree on the largest entry of the last axis, or None where the output does not look like
    logits (not float, or a last axis of 1)."""
    first = np.asarray(reference[0])
    if first.dtype.kind != "f" or first.ndim == 0 or first.shape[-1] < 2:
        return None
    classes = first.shape[-1]
    ref = np.concatenate([np.asarray(x).reshape(-1, classes) for x in reference]).argmax(-1)
    got = np.concatenate([np.asarray(x).reshape(-1, classes) for x in test]).argmax(-1)
    return round(float((ref == got).mean()), 4)


# -----------------------------------------------------------------------------
# The manifest's schema: every bundle's manifest is checked against it before it is written.

MANIFEST_SCHEMA = {
    "format": str, "precision": str, "artifact": str, "artifact_bytes": int, "artifact_sha256": str,
    "inputs": list, "outputs": list, "task": (dict, type(None)), "source": dict, "versions": dict,
    "parity": dict, "accuracy": (dict, type(None)), "export_seconds": float,
}
TENSOR_SCHEMA = {"name": str, "shape": list, "dtype": str}
PARITY_SCHEMA = {"max_abs_error": float, "mean_abs_error": float, "top1_agreement": float, "samples": int,
                 "passed": bool, "tolerance": str, "check": str, "machine": dict}
# "quantization" is optional: convert writes it for an int8 bundle of a program it quantized itself.
QUANTIZATION_SCHEMA = {"quantizer": str, "scheme": str, "calibration": dict, "sqnr_db": list,
                       "top1_agreement_fp32": list, "vs_pytorch_int8": dict}


def validate_manifest(manifest: dict) -> None:
    """Raises ValueError naming the first field that is missing or of the wrong type."""
    def check(obj: dict, schema: dict, where: str) -> None:
        for key, kind in schema.items():
            if key not in obj:
                raise ValueError(f"manifest{where} lacks {key!r}")
            if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
                raise ValueError(f"manifest{where}[{key!r}] is {type(obj[key]).__name__}, expected {kind}")

    check(manifest, MANIFEST_SCHEMA, "")
    for side in ("inputs", "outputs"):
        for i, tensor in enumerate(manifest[side]):
            check(tensor, TENSOR_SCHEMA, f"[{side!r}][{i}]")
    check(manifest["parity"], PARITY_SCHEMA, "['parity']")
    if manifest.get("quantization") is not None:
        check(manifest["quantization"], QUANTIZATION_SCHEMA, "['quantization']")
    spec = FORMATS.get(manifest["format"])
    for key, holds in spec.manifest_keys if spec is not None else ():
        if key not in manifest:
            raise ValueError(f"the manifest of this {spec.name} bundle lacks {key!r} ({holds})")


def checked_on() -> dict:
    """The machine parity ran on: integer kernels differ by CPU feature, so a parity result is read against it."""
    from difftx_edge.runtimes.measure import describe

    machine = describe()
    return {key: machine[key] for key in ("machine", "cpu", "cpu_features")}


def _args(sample) -> tuple[np.ndarray, ...]:
    """One sample as the program's positional inputs: a lone array is a program of one input."""
    return tuple(sample) if isinstance(sample, (tuple, list)) else (sample,)


def _runner(spec: FormatSpec, artifact: Path, threads: int, facts: dict):
    """``run(*args) -> list of outputs`` of the artifact: every output in its runtime, the first by reference."""
    if spec.check == "reference":
        first = spec.reference(artifact, facts)
        return lambda *args: [first(*args)]
    from difftx_edge.runtimes import runtime_for

    runner = runtime_for(spec.name).load(artifact, threads)
    return lambda *args: runner.run(list(args))


def _swap_in(stage: Path, target: Path) -> None:
    """Rename the finished bundle into place; an older bundle is replaced, never merged."""
    old = None
    if target.exists():
        # Named like a stage, so a kill between the two renames leaves nothing the next run keeps.
        old = make_stage_dir(target.parent, f".{target.name}.")
        os.replace(target, old / target.name)
    os.replace(stage, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
