"""``export`` (a trained run, fp32 or its int8 programs) and ``convert`` (any ``torch.export.save`` file) to bundles."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

import numpy as np
import torch

from difftx_edge.convert.bundle import build_bundle, sqnr_db, top1_agreement
from difftx_edge.convert.inputs import calibration_args, example_args, npz_args, user_inputs
from difftx_edge.convert.registry import FORMATS, PRECISIONS, FormatSpec, get_format
from difftx_edge.io import require_input_file, require_output_dir

log = logging.getLogger("difftx_edge.convert")


def parse_formats(formats: str) -> list[str]:
    names = sorted(FORMATS) if formats == "all" else [f.strip() for f in formats.split(",") if f.strip()]
    for name in names:
        get_format(name)
    if not names:
        raise ValueError("no format given: use --format with one or more of " + ", ".join(sorted(FORMATS)))
    return names


class ExportFailed(ValueError):
    """Some formats failed to build; every other one was built, checked and written.

    Attributes:
        manifests: the manifests of the bundles that were written.
        failures: one ``{"bundle": "<format>-<precision>", "reason": "<one line>"}`` per failed format.
    """

    def __init__(self, manifests: list[dict], failures: list[dict]):
        self.manifests, self.failures = manifests, failures
        first = failures[0]
        message = first["reason"] if not manifests and len(failures) == 1 else (
            f"{len(failures)} of {len(manifests) + len(failures)} bundles failed, first {first['reason']}")
        super().__init__(message)


# on_result(bundle, manifest, reason): called once per format as it finishes, with its manifest or the
# one-line reason it failed. quiet(title): a context manager the format is built under (the CLI's log).
OnResult = Callable[[str, "dict | None", "str | None"], None]
Quiet = Callable[[str], ContextManager]


def _each_format(names: list[str], build: Callable[[str], dict], failure: Callable[[str, Exception], str], *,
                 on_result: OnResult | None, quiet: Quiet | None) -> list[dict]:
    """Build every bundle in ``names``; one that fails never stops the others.

    Raises:
        ExportFailed: after all of them, when any failed.
    """
    manifests, failures = [], []
    for name in names:
        reason = None
        with quiet(name) if quiet is not None else contextlib.nullcontext():
            try:
                manifests.append(build(name))
            except ValueError as err:  # ours: parity, a length, a missing program, each one line already
                log.info("%s failed", name, exc_info=True)
                reason = _first_line(err)
            # A toolchain raises what it likes; it becomes this bundle's one line, its traceback goes to the log.
            except Exception as err:  # noqa: BLE001
                log.exception("%s failed", name)
                reason = failure(name, err)
        if reason is not None:
            # One line that names the bundle once: parity's own message starts with it already.
            reason = reason if reason.startswith(f"{name} ") else f"{name}: {reason}"
            failures.append({"bundle": name, "reason": reason})
        if on_result is not None:
            on_result(name, manifests[-1] if reason is None else None, reason)
    if failures:
        raise ExportFailed(manifests, failures)
    return manifests


EXPORT_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class ExportConfig:
    """What to export from a run. Every field is also a ``difftx-edge export`` flag."""

    run: str
    out: str
    format: str = "all"  # comma-separated formats, or "all"
    precision: str = "fp32"
    seq_len: int | None = None  # None: the task's; int8 programs keep the length they were quantized at
    batch: int = 1
    quantized: str | None = None  # folder of quantize outputs, one per backend; None: RUN/int8
    deployment_target: str = "iOS17"  # Core ML minimum deployment target
    parity_batches: int = 16
    accuracy: bool = True  # also measure task accuracy in the runtime on the whole test split
    threads: int | None = None

    def __post_init__(self) -> None:
        parse_formats(self.format)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.precision not in EXPORT_PRECISIONS:  # a run's int8 comes from difftx-edge quantize, static
            raise ValueError(f"export takes precision {', '.join(EXPORT_PRECISIONS)}, not {self.precision}: "
                             "convert a .pt2 for int8-dynamic")
        for name in parse_formats(self.format):
            FORMATS[name].supports(self.precision)
        if self.batch < 1 or self.parity_batches < 1:
            raise ValueError("batch and parity_batches must be at least 1")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {self.seq_len}")


def export_run(cfg: ExportConfig, *, on_result: OnResult | None = None, quiet: Quiet | None = None) -> list[dict]:
    """Export a trained run to one bundle per format, each checked in its runtime.

    A format that fails (its toolchain, or parity) never stops the others.

    Args:
        cfg: the run, formats, precision and output folder.
        on_result: ``on_result(bundle, manifest, reason)``, called as each format finishes.
        quiet: ``quiet(bundle)``, a context manager each format is built under (the CLI sends the
            toolchains' output to a log with it).

    Returns:
        The manifests written.

    Raises:
        ValueError: before anything is built: bad config, a length the model
            cannot serve, a missing extra or int8 program.
        ExportFailed: (a ValueError) after every format was tried, when any failed.
    """
    from difftx_edge.extras import versions
    from difftx_edge.hashing import sha256_file
    from difftx_edge.io import load_run
    from difftx_edge.tasks import TaskConfig, load_task
    from difftx_edge.train import set_threads

    out = require_output_dir(cfg.out)
    threads = set_threads(cfg.threads, 1)
    specs = {spec.name: spec for spec in (get_format(name) for name in parse_formats(cfg.format))}
    for spec in specs.values():
        spec.require(cfg.precision)
    model, run_config = load_run(cfg.run)
    task = load_task(TaskConfig(**run_config["task"]))
    N = cfg.seq_len or task.seq_len
    limit = model.cfg.max_serving_len()
    if limit is not None and N > limit:
        raise ValueError(f"sequence length {N} is longer than this model can serve ({limit}: its learned position "
                         "table or low-rank projection): choose --seq-len <= " + str(limit))
    # Each int8 program is read before anything is built. A missing one, one of another length, or one that could
    # run code (Refused) is bad input: one line, exit 2, nothing written. One that is corrupt or incomplete (an
    # interrupted quantize) fails its own format only, since each backend's quantizer writes its own program.
    int8_programs: dict = {}
    if cfg.precision == "int8":
        from difftx_edge.untrusted import Refused

        for name, spec in specs.items():
            quant_dir = _int8_dir(cfg, spec, N)
            try:
                int8_programs[name] = (quant_dir, *_int8_program(quant_dir, cfg.batch))
            except Refused:
                raise
            except ValueError as err:
                int8_programs[name] = err
    test_x, test_y = _fit_length(task.test.inputs, N), task.test.targets
    same_length = N == task.seq_len
    # Only the run's folder name: manifests ship inside apps, and a build machine's paths are no app's business.
    # The checkpoint's sha256 identifies the run (bench --accuracy finds it by that).
    source = {"run": Path(cfg.run).resolve().name, "sha256": sha256_file(Path(cfg.run) / "model.safetensors")}
    info = run_config.get("task_info") or {}
    example = test_x[:cfg.batch]
    batches = [test_x[i:i + cfg.batch] for i in range(0, len(test_x) - cfg.batch + 1, cfg.batch)]
    labels = [test_y[i:i + cfg.batch] for i in range(0, len(test_x) - cfg.batch + 1, cfg.batch)]
    parity_inputs = [b.numpy() for b in batches[:cfg.parity_batches]]
    accuracy_split = None
    if cfg.accuracy and same_length:  # another length has no labelled data
        accuracy_split = ([b.numpy() for b in batches], [y.numpy() for y in labels])

    def build(name: str) -> dict:
        spec = specs[name.rsplit("-", 1)[0]]
        if cfg.precision == "int8":
            loaded = int8_programs[spec.name]
            if isinstance(loaded, ValueError):
                raise loaded
            quant_dir, program, step, reference_module = loaded
        else:
            # Exported afresh for each format: an exporter may rewrite the program's lifted constants in place.
            reference_module = model
            program = run_program(model, (example,))
            quant_dir, step = None, None

        def reference(x: np.ndarray, module=reference_module) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(x)).numpy()

        out_shape = list(reference(example.numpy()).shape)
        meta = {
            "inputs": [{"name": "x", "shape": list(example.shape), "dtype": _dtype_name(example.dtype, spec)}],
            "outputs": [{"name": "logits", "shape": out_shape, "dtype": "float32"}],
            "task": {"name": task.name, "objective": task.objective, "metric": task.metric, "seq_len": N,
                     "label_names": info.get("label_names"), "vocab": info.get("vocab"),
                     "input_kind": "tokens" if model.cfg.vocab_size is not None else "features"},
            "preprocessing": task.preprocessing or None,
            "model": run_config["model"], "source": source, "versions": versions(),
            # RUN/int8/<backend> by convention: the last two folder names say which program, without the path.
            "quantized_from": f"{quant_dir.parent.name}/{quant_dir.name}" if quant_dir else None,
        }
        log.info("exporting %s %s", spec.name, cfg.precision)
        return build_bundle(
            spec, program, cfg.precision, out=out, reference=reference, parity_inputs=parity_inputs,
            output_step=step, meta=meta, accuracy_split=accuracy_split, threads=threads,
            options={"example": (example,), "deployment_target": cfg.deployment_target})

    return _each_format([f"{name}-{cfg.precision}" for name in specs], build,
                        lambda name, err: f"{type(err).__name__}: {_first_line(err)}", on_result=on_result,
                        quiet=quiet)


def run_program(model: torch.nn.Module, example: tuple) -> torch.export.ExportedProgram:
    """The fp32 program ``export`` hands every format's exporter: the model in eval mode at ``example``. Its node
    names are what ``diff`` aligns an artifact's tensors by, so both make it here."""
    return torch.export.export(model.eval(), example)


def source_program_of_run(run: Path, precision: str, quantized_from: object, example: tuple
                          ) -> torch.export.ExportedProgram:
    """The program ``export`` made a bundle of ``precision`` from: the run's model (fp32), or the int8 program
    in ``run / quantized_from`` (a manifest's ``RUN/int8/<backend>`` tail), each at ``example``'s shapes.

    Raises:
        ValueError: one line, when the run or its int8 program cannot be read.
    """
    if precision.startswith("int8"):
        from difftx_edge.runtimes.registry import inside

        if not isinstance(quantized_from, str):
            raise ValueError(f"the bundle does not say which int8 program of {run} it was exported from "
                             "(no quantized_from in its manifest): export it again")
        quant_dir = inside(run, quantized_from, "int8 program folder")
        program, _, _ = _int8_program(quant_dir, int(example[0].shape[0]))
        return program
    from difftx_edge.io import load_run

    model, _ = load_run(run)
    return run_program(model, example)


def _int8_dir(cfg: ExportConfig, spec, N: int) -> Path:
    """The backend's quantize output folder; raises ValueError when it has no program of length ``N``."""
    from difftx_edge.quantize.api import int8_dir

    quant_dir = Path(cfg.quantized) / spec.quantizer if cfg.quantized else int8_dir(cfg.run, spec.quantizer)
    try:
        quantized_len = json.loads((quant_dir / "quant_config.json").read_text())["input"]["shape"][1]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise ValueError(f"no int8 program for {spec.name} in {quant_dir}: run difftx-edge quantize --run {cfg.run} "
                         f"--backend {spec.quantizer} --out {quant_dir} first") from None
    if N != quantized_len:
        raise ValueError(f"the int8 program in {quant_dir} was quantized at sequence length {quantized_len}: "
                         f"export int8 with --seq-len {quantized_len}, or quantize again at {N}")
    return quant_dir


def _int8_program(quant_dir: Path, batch: int):
    """The quantized program in ``quant_dir``, re-exported with a static batch: ``(program, output_step, module)``."""
    from difftx_edge.quantize import load_quantized
    from difftx_edge.quantize.pt2e import output_step

    program, qconfig = load_quantized(quant_dir)
    module = program.module()
    shape = [batch, *qconfig["input"]["shape"][1:]]
    example = torch.zeros(shape, dtype=getattr(torch, qconfig["input"]["dtype"]))
    static = torch.export.export(module, (example,))
    return static, output_step(module), module


def convert_pt2(path: str | os.PathLike, out: str | os.PathLike, formats: str = "all", precision: str = "fp32",
                deployment_target: str = "iOS17", parity_batches: int = 8, threads: int = 1,
                seed: int = 0, inputs: str | os.PathLike | None = None, calibration: str | os.PathLike | None = None,
                rewrite: bool = True,
                preprocess_note: str | None = None, on_result: OnResult | None = None,
                quiet: Quiet | None = None) -> list[dict]:
    """Convert any model saved with ``torch.export.save`` to bundles, checked on example inputs.

    A program of several tensor inputs converts too: every sample is one array per input, in the program's
    order. A format that fails (an op it cannot lower, its toolchain, parity) never stops the others;
    ``on_result`` and ``quiet`` are as in :func:`export_run`.

    int8 (or int8-dynamic) of a float program quantizes it here, once per format with that format's quantizer
    (PT2E post-training quantization). The calibration samples come from ``calibration``; the last 20% of
    them (at least one) are held back from the observers and are the parity inputs, so the int8 artifact is
    measured on samples its scales were not fitted to: parity in output steps against the PyTorch int8
    program, and its SQNR and top-1 agreement against the fp32 program (the manifest's ``quantization``).
    A program quantized already with PT2E converts as int8 whatever ``precision`` says (except fp16,
    refused).

    Args:
        inputs: an ``.npz`` of real parity inputs, or None for random ones. It holds one array per program
            input, named after it (the input's name in the exported graph, e.g. ``x`` for ``forward(self, x)``;
            no other names, and every input), of shape ``(samples, *input shape)``: sample ``i`` is row ``i``
            of every array, one call of the program with its example shapes. The first ``parity_batches``
            samples are checked. Random inputs follow each input's dtype: floats from a standard normal,
            integer ids below the smallest vocabulary of the embeddings they index (else in [0, 16) and below
            any other index bound the program shows).
        calibration: int8 only: an ``.npz`` laid out like ``inputs`` whose samples calibrate the observers
            (all but the last 20%) and check the artifact (the last 20%). None: the program's saved example
            inputs, the ``inputs`` samples and 32 random samples stand in, a weak calibration that is logged
            once and recorded as ``quantization.calibration.weak``.
        seed: the seed of the random inputs.
        preprocess_note: how an app turns its raw input into the program's input, in words; the manifest
            carries it as ``preprocessing`` (None when not given: difftx-edge cannot know it).

    Returns:
        The manifests written. Each records where its parity inputs came from under ``parity_inputs``, and an
        int8 bundle of a program quantized here its quantizer, calibration and error under ``quantization``.

    Raises:
        ValueError: before anything is built: a corrupt file, a missing extra, a bad format or precision,
            an ``inputs`` or ``calibration`` file that does not fit the program (named, with what to give
            instead), ``calibration`` for a precision or program that has nothing to calibrate.
        ExportFailed: (a ValueError) after every format was tried, when any failed: an unsupported op
            (named), a toolchain error, a quantizer error or a parity failure, one line each.
    """
    from difftx_edge.extras import versions
    from difftx_edge.hashing import sha256_file

    path = require_input_file(path, "model", "give a file written by torch.export.save")
    if preprocess_note is not None and not preprocess_note.strip():
        raise ValueError("--preprocess-note is empty: say how an app turns its raw input into the model's input, "
                         "or leave the flag out")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if inputs is not None:
        inputs = require_input_file(inputs, "inputs", "give an .npz written by numpy.savez")
    if calibration is not None:
        if not precision.startswith("int8"):
            raise ValueError(f"--calibration calibrates int8, but --precision is {precision}: give --precision int8 "
                             "(or int8-dynamic), or leave --calibration out")
        if inputs is not None:
            raise ValueError("give --calibration or --inputs, not both: an int8 bundle is checked on the held-back "
                             "last 20% of the --calibration samples")
        calibration = require_input_file(calibration, "calibration", "give an .npz written by numpy.savez")
    out = require_output_dir(out)
    specs = [get_format(name) for name in parse_formats(formats)]
    for spec in specs:
        spec.require(precision)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable torch.export file (not a .pt2 archive): re-save it with "
                         "torch.export.save")
    from difftx_edge.untrusted import load_exported_program

    program = load_exported_program(path)  # never torch.export.load: it can unpickle, and so run, the file's code
    module = program.module()
    precision, step, quantize = _program_precision(module, precision)
    if calibration is not None and not quantize:
        raise ValueError("this program is quantized already (it holds PT2E quantize/dequantize ops), so "
                         "--calibration has nothing to calibrate: leave it out")
    for spec in specs:
        spec.require(precision)  # again: a quantized program converts at int8, whatever was asked
    # The XNNPACK formats get the rewritten program, the float one rewritten once; parity holds it to the module.
    float_rewritten = functools.cache(lambda: _rewrite(program, rewrite))
    names = [name for name, _ in user_inputs(program)]
    given = npz_args(program, inputs, parity_batches) if inputs is not None else None
    if quantize:
        observed, args, calibration_source = calibration_args(
            program, calibration, given=given[0] if given is not None else None, seed=seed)
        calibration_source["weak"] = calibration_source["weak"] and precision == "int8"
        if calibration_source["weak"]:  # int8-dynamic's activation scales come from each call, not calibration
            log.warning("difftx-edge convert: warning: no --calibration, so int8 scales come from %d random or "
                        "example samples: a weak calibration; give --calibration FILE.npz with samples of real data",
                        calibration_source["observed"])
        parity_source = {"from": "calibration", "held_back": len(args)}
        calibration_samples = [tuple(torch.from_numpy(a) for a in sample) for sample in observed]
        fp32_out = [_outputs(module, sample) for sample in args]  # before any quantizer touches the program
    else:
        args, parity_source = given if given is not None else example_args(program, seed, parity_batches)
    specs_by_bundle = {f"{spec.name}-{precision}": spec for spec in specs}
    # The file's name only: manifests ship inside apps; the sha256 identifies the program.
    source = {"pt2": path.name, "sha256": sha256_file(path)}

    def build(name: str) -> dict:
        spec = specs_by_bundle[name]
        if spec.check == "reference" and len(names) > 1:
            raise ValueError(f"{spec.name}'s reference evaluation feeds one input, and this program has "
                             f"{len(names)}: convert it to the other formats")
        converted, reference_module, output_step, report = program, module, step, None
        if quantize:
            from difftx_edge.quantize.program import quantize_program

            quantized = quantize_program(program, spec.quantizer, calibration_samples,
                                         dynamic=precision == "int8-dynamic")
            converted, reference_module = quantized.program, quantized.module
            output_step = quantized.output_step
            report = functools.partial(_quantization_report, spec=spec, precision=precision,
                                       calibration=calibration_source, fp32_out=fp32_out, facts=quantized.facts)

        rewrites = _NOT_REWRITTEN
        if spec.rewrites:
            # After quantizing, so that the quantizer sees the program's own patterns: a rewritten LayerNorm's
            # mean, sub and mul took int8 annotations, and the .pte drifted 4 output steps from its PyTorch int8
            # program (1 step when rewritten after; zoo encoder, XNNPACK).
            converted, rewrites = _rewrite(converted, rewrite) if quantize else float_rewritten()

        def reference(*x: np.ndarray) -> np.ndarray:
            return _outputs(reference_module, x)[0]

        out_shape = list(reference(*args[0]).shape)
        meta = {"inputs": [{"name": input_name, "shape": list(x.shape),
                            "dtype": _dtype_name(torch.from_numpy(x).dtype, spec)}
                           for input_name, x in zip(names, args[0], strict=True)],
                "outputs": [{"name": "output", "shape": out_shape, "dtype": "float32"}],
                "task": None, "preprocessing": preprocess_note, "source": source, "parity_inputs": parity_source,
                "versions": versions(), "rewrites": rewrites,
                "quantization": None}  # int8 quantized here: report() fills it in
        return build_bundle(spec, converted, precision, out=out, reference=reference, parity_inputs=args,
                            output_step=output_step, meta=meta, threads=threads, report=report,
                            options={"example": tuple(torch.from_numpy(x) for x in args[0]),
                                     "deployment_target": deployment_target})

    # A toolchain's failure becomes one line, naming the op where it can.
    return _each_format(list(specs_by_bundle), build,
                        lambda name, err: _conversion_failure(specs_by_bundle[name].name, path.name, err, program),
                        on_result=on_result, quiet=quiet)


_NOT_REWRITTEN = {"enabled": False, "reason": "the mobile rewrites are for XNNPACK (ExecuTorch, LiteRT); this "
                  "format's converter and runtime take the program's own patterns", "applied": []}


def _rewrite(program, enabled: bool) -> tuple[torch.export.ExportedProgram, dict]:
    """The program after the mobile rewrites (``convert/rewrites.py``), and the manifest's ``rewrites``."""
    if not enabled:
        return program, {"enabled": False, "reason": "--no-rewrite", "applied": []}
    if any(not all(isinstance(d, int) for d in fake.shape) for _, fake in user_inputs(program)):
        # Each rewrite re-exports the module with static example inputs; a dynamic program keeps its graph.
        log.info("dynamic input shapes: the mobile rewrites were not applied")
        return program, {"enabled": False, "reason": "the program has dynamic input shapes; the rewrites take "
                                                     "static ones", "applied": []}
    from difftx_edge.convert.rewrites import apply_rewrites

    rewritten, applied = apply_rewrites(program)
    log.info("rewrites applied: %s", ", ".join(f"{r['name']} x{r['count']}" for r in applied) or "none")
    return rewritten, {"enabled": True, "applied": applied}


def _outputs(module, args) -> list[np.ndarray]:
    """Every output of ``module`` for one sample (a tuple of arrays), in the program's output order."""
    with torch.no_grad():
        result = module(*(torch.from_numpy(x) for x in args))
    return [leaf.numpy() for leaf in torch.utils._pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]


def _quantization_report(outputs: list[list[np.ndarray]], parity: dict, *, spec: FormatSpec, precision: str,
                         calibration: dict, fp32_out: list[list[np.ndarray]], facts: dict) -> dict:
    """The manifest's ``quantization``: how the program was quantized, and the int8 artifact's error on the
    held-back samples, against fp32 PyTorch (SQNR and top-1 agreement, one entry per output) and against the
    PyTorch int8 program (parity, in output steps)."""
    # A format checked by reference evaluation gives only the first output: the entries follow what ran.
    count = min(len(outputs[0]), len(fp32_out[0]))
    per_output = [([sample[i] for sample in fp32_out], [sample[i] for sample in outputs]) for i in range(count)]
    return {"quantization": {
        **facts,  # the quantizer's own account: weights, activations, ops kept in float, op counts
        "quantizer": spec.quantizer,
        "scheme": "dynamic" if precision == "int8-dynamic" else "static",
        "calibration": calibration,
        "sqnr_db": [sqnr_db(fp32, artifact) for fp32, artifact in per_output],
        "top1_agreement_fp32": [top1_agreement(fp32, artifact) for fp32, artifact in per_output],
        "vs_pytorch_int8": {key: parity.get(key) for key in ("output_step", "max_steps", "max_abs_error",
                                                              "top1_agreement", "samples")},
    }}


def _program_precision(module: torch.fx.GraphModule, asked: str) -> tuple[str, float | None, bool]:
    """The precision a program converts at, its int8 output step, and whether convert quantizes it.

    A float program asked for int8 or int8-dynamic is quantized here. A program quantized already with PT2E
    (quantize and dequantize ops in its graph) is int8, its parity counted in output steps like export's.

    Raises:
        ValueError: fp16 asked of a quantized program, or a quantized program whose output has no step to
            count parity in.
    """
    from difftx_edge.quantize.pt2e import is_quantized, output_step

    if not is_quantized(module):
        return asked, None, asked.startswith("int8")
    if asked == "fp16":
        raise ValueError("this program is quantized already (it holds PT2E quantize/dequantize ops): convert it "
                         "as int8 (--precision int8, or leave --precision out), not fp16")
    step = output_step(module)
    if step is None:
        raise ValueError("this program is quantized, but its output does not come straight from a per-tensor "
                         "dequantize, so int8 parity has no output step to count in: let the quantizer quantize "
                         "the output too (the backend quantizers do by default) and save it again")
    return "int8", step, False


def _conversion_failure(fmt: str, name: str, err: BaseException, program) -> str:
    """One line for a toolchain that failed: the op it names, or else the ops outside core ATen.

    Toolchains name an unsupported op in different places: ExecuTorch and
    ONNX deep in the exception chain, LiteRT not at all. An op outside the core
    ATen opset is what no toolchain is obliged to lower.
    """
    causes, seen = [], err
    while seen is not None and len(causes) < 16:
        causes.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"aten\.(\w+)", "\n".join(causes))
    if found:
        return f"{fmt} cannot convert {name}: op aten.{found.group(1)} is not supported ({_first_line(err)})"
    outside = _outside_core_aten(program)
    hint = f"; ops outside core ATen, which {fmt} need not lower: {', '.join(outside)}" if outside else ""
    return f"{fmt} cannot convert {name}: {_first_line(err)}{hint}"


def _outside_core_aten(program) -> list[str]:
    ops = {node.target for node in program.run_decompositions().graph.nodes
           if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)}
    return sorted(f"{op.namespace}.{op._opname}" for op in ops
                  if op.namespace == "aten" and torch.Tag.core not in op.tags)


def _fit_length(x: torch.Tensor, N: int) -> torch.Tensor:
    """Test inputs cut or tiled along the sequence to length N (for a serving length other than the task's)."""
    if x.shape[1] >= N:
        return x[:, :N].contiguous()
    reps = -(-N // x.shape[1])
    return x.repeat(1, reps, *([1] * (x.dim() - 2)))[:, :N].contiguous()


def _dtype_name(dtype: torch.dtype, spec: FormatSpec) -> str:
    name = str(dtype).removeprefix("torch.")
    return spec.token_dtype if name == "int64" else name


def _first_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # some toolchains colour their messages
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
