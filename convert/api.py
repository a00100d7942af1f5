"""``export`` (a trained run, fp32 or its int8 programs) and ``convert`` (any ``torch.export.save`` file) to bundles."""

from __future__ import annotations

import contextlib
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

from difftx_edge.convert.bundle import build_bundle
from difftx_edge.convert.inputs import example_args, npz_args
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
            program = torch.export.export(model.eval(), (example,))
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
                seed: int = 0, inputs: str | os.PathLike | None = None, preprocess_note: str | None = None,
                on_result: OnResult | None = None, quiet: Quiet | None = None) -> list[dict]:
    """Convert any model saved with ``torch.export.save`` to bundles, checked on example inputs.

    A format that fails (an op it cannot lower, its toolchain, parity) never
    stops the others; ``on_result`` and ``quiet`` are as in :func:`export_run`.

    Args:
        inputs: an ``.npz`` of real parity inputs, or None for random ones. It holds one array per program
            input, named after it (the input's name in the exported graph, e.g. ``x`` for ``forward(self, x)``;
            no other names), of shape ``(samples, *input shape)``: each sample is one call of the program with
            its example shape. The first ``parity_batches`` samples are checked. Random inputs follow each
            input's dtype: floats from a standard normal, integer ids below the smallest vocabulary of the
            embeddings they index (else in [0, 16) and below any other index bound the program shows).
        seed: the seed of the random inputs.
        preprocess_note: how an app turns its raw input into the program's input, in words; the manifest
            carries it as ``preprocessing`` (None when not given: difftx-edge cannot know it).

    Returns:
        The manifests written. Each records where its parity inputs came from under ``parity_inputs``.

    Raises:
        ValueError: before anything is built: a corrupt file, a missing extra, a bad format or precision,
            an ``inputs`` file that does not fit the program (named, with what to give instead).
        ExportFailed: (a ValueError) after every format was tried, when any failed: an unsupported op
            (named), a toolchain error or a parity failure, one line each.
    """
    from difftx_edge.extras import versions
    from difftx_edge.hashing import sha256_file

    path = require_input_file(path, "model", "give a file written by torch.export.save")
    if preprocess_note is not None and not preprocess_note.strip():
        raise ValueError("--preprocess-note is empty: say how an app turns its raw input into the model's input, "
                         "or leave the flag out")
    if inputs is not None:
        inputs = require_input_file(inputs, "inputs", "give an .npz written by numpy.savez")
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
    precision, step = _program_precision(module, precision)
    for spec in specs:
        spec.require(precision)  # again: a quantized program converts at int8, whatever was asked
    if inputs is None:
        args, parity_source = example_args(program, seed, parity_batches)
    else:
        args, parity_source = npz_args(program, inputs, parity_batches)
    specs_by_name = {spec.name: spec for spec in specs}
    # The file's name only: manifests ship inside apps; the sha256 identifies the program.
    source = {"pt2": path.name, "sha256": sha256_file(path)}

    def build(name: str) -> dict:
        spec = specs_by_name[name.rsplit("-", 1)[0]]

        def reference(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                y = module(torch.from_numpy(x))
            return (y[0] if isinstance(y, (tuple, list)) else y).numpy()

        out_shape = list(reference(args[0]).shape)
        meta = {"inputs": [{"name": "x", "shape": list(args[0].shape), "dtype": _dtype_name(
                    torch.from_numpy(args[0]).dtype, spec)}],
                "outputs": [{"name": "output", "shape": out_shape, "dtype": "float32"}],
                "task": None, "preprocessing": preprocess_note, "source": source, "parity_inputs": parity_source,
                "versions": versions()}
        return build_bundle(spec, program, precision, out=out, reference=reference, parity_inputs=args,
                            output_step=step, meta=meta, threads=threads,
                            options={"example": (torch.from_numpy(args[0]),), "deployment_target": deployment_target})

    # A toolchain's failure becomes one line, naming the op where it can.
    return _each_format([f"{spec.name}-{precision}" for spec in specs], build,
                        lambda name, err: _conversion_failure(name.rsplit("-", 1)[0], path.name, err, program),
                        on_result=on_result, quiet=quiet)


def _program_precision(module: torch.fx.GraphModule, asked: str) -> tuple[str, float | None]:
    """The precision a program converts at, and its int8 output step: a program quantized already with PT2E
    (quantize and dequantize ops in its graph) is int8, its parity counted in output steps like export's.

    Raises:
        ValueError: int8 asked of a float program, fp16 of a quantized one, or a quantized program whose
            output has no step to count parity in.
    """
    from difftx_edge.quantize.pt2e import is_quantized, output_step

    if not is_quantized(module):
        if asked == "int8":
            raise ValueError("this program is not quantized: convert --precision int8 takes a program quantized "
                             "with PT2E (prepare_pt2e, calibrate, convert_pt2e, then torch.export.save); "
                             "quantizing a float .pt2 in convert is not built yet; for difftx-edge's own models "
                             "use difftx-edge quantize, then export --precision int8")
        return asked, None
    if asked == "fp16":
        raise ValueError("this program is quantized already (it holds PT2E quantize/dequantize ops): convert it "
                         "as int8 (--precision int8, or leave --precision out), not fp16")
    step = output_step(module)
    if step is None:
        raise ValueError("this program is quantized, but its output does not come straight from a per-tensor "
                         "dequantize, so int8 parity has no output step to count in: let the quantizer quantize "
                         "the output too (the backend quantizers do by default) and save it again")
    return "int8", step


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
