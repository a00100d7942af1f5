"""The ``difftx-edge`` command line: one entry point, one verb per stage.

Flags are generated from the config dataclasses, so each flag has its field's
name (``--d-model`` is ``ModelConfig.d_model``) and the same validation. Bad
input is reported once, here, as one line and a non-zero exit code.

Exit codes: 0 success; 1 some bench rows or bundles failed (the others are
written); 2 any error, with one line on stderr and no traceback: bad input,
and also an unexpected failure inside a library, whose line names a log file
holding the full traceback; 130 interrupted. A failed command removes the
output folders it created, when they are still empty.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import MISSING, fields
from pathlib import Path

from difftx_edge import __version__
from difftx_edge.model import ModelConfig
from difftx_edge.tasks import TASKS, TaskConfig
from difftx_edge.train import MODEL_CHOICES, TrainConfig

EXIT_USAGE = 2
EXIT_ROWS_FAILED = 1  # bench: some rows failed; the results, with each row's error, are written
TASK_FLAGS = [f.name for f in fields(TaskConfig) if f.name not in ("name", "seed")]


def finite_float(text: str) -> float:
    """argparse's type for float flags: nan and inf are no setting of any of ours."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number: give a real value such as 0.001")
    return value


_TYPES = {"int": int, "float": finite_float, "str": str}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_fields(parser: argparse.ArgumentParser, cls, names=None, *, keep_defaults: bool, rename=None,
               choices=None) -> None:
    """One flag per dataclass field; ``keep_defaults=False`` leaves unset flags out of the config.

    With ``keep_defaults``, a field without a default is a required flag.
    """
    rename, choices = rename or {}, choices or {}
    for f in fields(cls):
        if names is not None and f.name not in names:
            continue
        type_name = str(f.type).replace(" | None", "")
        default = f.default if keep_defaults and f.default is not MISSING else None
        kwargs = {"dest": f.name, "default": default}
        if type_name == "bool":
            parser.add_argument(_flag(rename.get(f.name, f.name)), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        help_text = f"default: {f.default}" if f.default is not MISSING else None
        if f.name in choices:
            kwargs["choices"] = choices[f.name]
        parser.add_argument(_flag(rename.get(f.name, f.name)), type=_TYPES[type_name], help=help_text,
                            required=keep_defaults and f.default is MISSING, **kwargs)


def pick(args: argparse.Namespace, cls, names=None, *, drop_none: bool) -> dict:
    values = {f.name: getattr(args, f.name) for f in fields(cls) if names is None or f.name in names}
    return {k: v for k, v in values.items() if not (drop_none and v is None)}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="difftx-edge", description="Train compact Transformers for edge devices.")
    parser.add_argument("--version", action="version", version=f"difftx-edge {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = verbs.add_parser("train", help="train a model on a task and write a run directory")
    task = train.add_argument_group("task")
    task.add_argument("--task", dest="name", choices=sorted(TASKS), default="digits")
    # --seed (TrainConfig) seeds the task's split and generation too.
    add_fields(task, TaskConfig, TASK_FLAGS, keep_defaults=False)
    add_fields(train.add_argument_group("model"), ModelConfig, MODEL_CHOICES, keep_defaults=False)
    add_fields(train.add_argument_group("training"), TrainConfig, keep_defaults=True)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    train.add_argument("--force", action="store_true", help="start over in an --out that already holds a run")
    train.set_defaults(handler=_train)

    evaluate = verbs.add_parser("evaluate", help="measure a run's best checkpoint on one split")
    evaluate.add_argument("--run", required=True, help="run directory written by train")
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test")
    evaluate.add_argument("--threads", type=int, default=None)
    evaluate.set_defaults(handler=_evaluate)

    from difftx_edge.quantize import METHODS, QUANTIZERS, QuantConfig

    quantize = verbs.add_parser("quantize", help="QAT or PTQ of a trained run to an int8 program for one backend")
    add_fields(quantize, QuantConfig, keep_defaults=True,
               choices={"backend": sorted(QUANTIZERS), "method": METHODS})
    quantize.add_argument("--force", action="store_true", help="replace another run's results in --out")
    quantize.set_defaults(handler=_quantize)

    from difftx_edge.convert import PRECISIONS, ExportConfig
    from difftx_edge.convert.api import EXPORT_PRECISIONS

    export = verbs.add_parser("export", help="export a run to bundles (artifact + manifest), checked in each runtime")
    add_fields(export, ExportConfig, keep_defaults=True, choices={"precision": EXPORT_PRECISIONS})
    export.set_defaults(handler=_export)

    convert = verbs.add_parser("convert", help="convert any torch.export.save file to bundles, checked in each runtime")
    convert.add_argument("model", help="a .pt2 file written by torch.export.save")
    convert.add_argument("--format", default="all", help="comma-separated formats, or all")
    convert.add_argument("--precision", default="fp32", choices=PRECISIONS,
                         help="int8 and int8-dynamic (int8 weights, activations quantized at run time; the "
                              "formats that take it: difftx-edge formats) quantize a float program here, PT2E "
                              "post-training quantization with each format's quantizer; a program quantized already "
                              "with PT2E converts as int8 whatever this says (fp16 is refused)")
    convert.add_argument("--out", required=True)
    convert.add_argument("--deployment-target", default="iOS17")
    convert.add_argument("--threads", type=int, default=1)
    convert.add_argument("--inputs", default=None, metavar="FILE.npz",
                         help="real parity inputs instead of random ones: an .npz with one array per program input, "
                              "named after it (e.g. x for forward(self, x)), of shape (S, *input shape), S samples "
                              "of the program's example shapes; the first 8 are checked (int8 of a float program "
                              "without --calibration: they join its random calibration samples)")
    convert.add_argument("--calibration", default=None, metavar="FILE.npz",
                         help="int8: samples of real data to calibrate with, laid out like --inputs (hundreds are "
                              "better than a few); the last 20%% (at least 1) are held back to check the artifact "
                              "against PyTorch. Without it, random samples calibrate: weak, and the manifest says so")
    convert.add_argument("--no-rewrite", dest="rewrite", action="store_false",
                         help="convert the program as saved: skip the mobile rewrites that put patterns XNNPACK "
                              "refuses (attention masks, layer_norm, mean, select, split) into forms it delegates; "
                              "the manifest's rewrites lists what they changed")
    convert.add_argument("--preprocess-note", default=None, metavar="TEXT",
                         help="how an app turns its raw input into the model's input (scaling, layout, "
                              "tokenizer); each manifest carries it as preprocessing")
    convert.set_defaults(handler=_convert)

    from difftx_edge.runtimes.bench import RUNNERS, BenchConfig

    bench = verbs.add_parser("bench", help="measure latency, memory and accuracy of bundles on a target")
    bench.add_argument("bundles", nargs="+", metavar="BUNDLE",
                       help="bundle directories (difftx-edge export), or run directories for eager torch")
    add_fields(bench, BenchConfig, [f.name for f in fields(BenchConfig) if f.name != "bundles"],
               keep_defaults=True, choices={"runner": RUNNERS})
    bench.set_defaults(handler=_bench)

    from difftx_edge.pipeline import STAGES, PipelineConfig

    pipeline = verbs.add_parser("pipeline", help="train, quantize, export, check, benchmark and report in one command; "
                                "a re-run resumes where the last one stopped")
    add_fields(pipeline, PipelineConfig, keep_defaults=True, choices={"task": sorted(TASKS)})
    pipeline.add_argument("--force", nargs="?", const="all", default=None, metavar="STAGES",
                          help="redo stages even when their outputs are up to date: all (without a value) or "
                               f"comma-separated names from {', '.join(STAGES)}")
    pipeline.set_defaults(handler=_pipeline)

    from difftx_edge.runtimes.onnxruntime import OPTIMIZATION

    diff = verbs.add_parser("diff", help="compare a bundle's intermediate tensors with PyTorch, node by node, and "
                            "name the first that leaves tolerance (exit 1 when one does)")
    diff.add_argument("bundle", metavar="BUNDLE", help="a bundle directory written by export")
    diff.add_argument("--source", default=None, metavar="RUN",
                      help="the run the bundle was exported from (default: the manifest's run, found in the working "
                           "directory or beside the bundle)")
    diff.add_argument("--inputs", default=None, metavar="FILE.npz",
                      help="inputs named as in the bundle's manifest, (S, *shape); the first sample runs (default: "
                           "the manifest's example inputs)")
    diff.add_argument("--optimization", choices=OPTIMIZATION, default="all",
                      help="ONNX Runtime's graph optimisation level for the run compared (onnx bundles)")
    diff.add_argument("--against", choices=OPTIMIZATION, default=None, metavar="OPTIMIZATION",
                      help="compare with the same .onnx run at this optimisation level instead of PyTorch: "
                           f"{', '.join(OPTIMIZATION)}")
    diff.add_argument("--tolerance", type=float, default=None,
                      help="the largest error relative to a tensor's largest magnitude (default by precision: "
                           "1e-4 fp32, 1e-2 fp16, 0.02 for float tensors of int8; int8 tensors: 2 steps)")
    diff.add_argument("--threads", type=int, default=1)
    diff.add_argument("--out", default=None, help="where diff.json, diff.md and diff.png go (default: BUNDLE.diff)")
    diff.set_defaults(handler=_diff)

    formats = verbs.add_parser("formats", help="list the export formats, their precisions and extras")
    formats.set_defaults(handler=_formats)
    return parser


def _train(args: argparse.Namespace) -> None:
    from difftx_edge.train import train

    task_cfg = TaskConfig(name=args.name, seed=args.seed, **pick(args, TaskConfig, TASK_FLAGS, drop_none=True))
    train_cfg = TrainConfig(**pick(args, TrainConfig, drop_none=False))
    result = train(train_cfg, task_cfg, pick(args, ModelConfig, MODEL_CHOICES, drop_none=True),
                   resume=args.resume, force=args.force)
    print(json.dumps({"run": train_cfg.out, "test": result}))


def _evaluate(args: argparse.Namespace) -> None:
    from difftx_edge.io import load_run
    from difftx_edge.tasks import load_task
    from difftx_edge.train import evaluate, set_threads

    set_threads(args.threads, 1)
    model, config = load_run(args.run)
    task = load_task(TaskConfig(**config["task"]))
    split = getattr(task, args.split)
    print(json.dumps({"run": args.run, "split": args.split, **evaluate(model, split.inputs, split.targets)}))


def _quantize(args: argparse.Namespace) -> None:
    from difftx_edge.quantize import QuantConfig, quantize

    cfg = QuantConfig(**pick(args, QuantConfig, drop_none=False))
    report = quantize(cfg, force=args.force)
    summary = {name: (m or {}).get("accuracy") for name, m in report["test"].items()}
    print(json.dumps({"out": cfg.out, "backend": report["backend"], "method": report["method"],
                      "test_accuracy": summary, "int8_linear_layers": report["int8_linear_layers"],
                      "seconds": report["seconds"]["total"]}))


def _export(args: argparse.Namespace) -> int:
    from difftx_edge.convert import ExportConfig, export_run
    from difftx_edge.quiet import build_quietly

    cfg = ExportConfig(**pick(args, ExportConfig, drop_none=False))
    # A failed format is one line and exit 1; every other one is written. Bad input is exit 2 (main).
    return build_quietly("export", args.out, lambda **hooks: export_run(cfg, **hooks),
                         lambda manifest: _bundle_line(args.out, manifest))


def _convert(args: argparse.Namespace) -> int:
    from difftx_edge.convert import convert_pt2
    from difftx_edge.quiet import build_quietly

    return build_quietly("convert", args.out, lambda **hooks: convert_pt2(
        args.model, args.out, args.format, args.precision, args.deployment_target, threads=args.threads,
        inputs=args.inputs, calibration=args.calibration, rewrite=args.rewrite,
        preprocess_note=args.preprocess_note, **hooks),
        lambda manifest: _bundle_line(args.out, manifest))


def _diff(args: argparse.Namespace) -> int:
    from difftx_edge.pipeline.diff import diff_bundle, summary_line, write_report
    from difftx_edge.quiet import Console, into_log, log_beside

    if args.tolerance is not None and not args.tolerance > 0:
        raise ValueError(f"--tolerance {args.tolerance} must be a positive relative error, such as 1e-4")
    out = Path(args.out) if args.out else Path(f"{Path(args.bundle)}.diff")
    log_path = log_beside(out, "diff")
    with Console() as console:
        def quiet(title: str):
            return into_log(log_path, title, console)

        report = diff_bundle(args.bundle, source=args.source, inputs=args.inputs, tolerance=args.tolerance,
                             threads=args.threads,
                             options={} if args.optimization == "all" else {"optimization": args.optimization},
                             against=None if args.against is None else {"optimization": args.against}, quiet=quiet)
        with quiet("diff report"):
            written = write_report(report, out)
        first = report.first_divergence
        console.result(json.dumps({"bundle": args.bundle, "first_divergence": None if first is None else {
            "node": first.node, "module": first.module, "op": first.op, "max_abs_error": first.max_abs_error,
            "steps": first.steps, "sqnr_db": first.sqnr_db}, "coverage": round(report.coverage, 4),
            **{kind: str(path) for kind, path in written.items()}}))
        console.say(f"difftx-edge diff: {summary_line(report)}; the table is in {written['md']}")
    return 1 if first is not None else 0


def _bundle_line(out: str, manifest: dict) -> dict:
    return {"bundle": f"{out}/{manifest['format']}-{manifest['precision']}", "bytes": manifest["artifact_bytes"],
            "max_abs_error": manifest["parity"]["max_abs_error"], "check": manifest["parity"]["check"],
            "accuracy": manifest["accuracy"]}


def _bench(args: argparse.Namespace) -> int:
    from difftx_edge.runtimes.bench import BenchConfig, bench, failed_rows, summary_line
    from difftx_edge.runtimes.results import table

    cfg = BenchConfig(**pick(args, BenchConfig, drop_none=False))
    results = bench(cfg, progress=sys.stderr.isatty())
    print(table(results))
    print(f"{summary_line(results)}; results in {cfg.out}", file=sys.stderr)
    return EXIT_ROWS_FAILED if failed_rows(results) else 0  # Core ML's "not run (macOS only)" is no failure


def _pipeline(args: argparse.Namespace) -> int:
    from difftx_edge.pipeline import PipelineConfig, parse_stages, pipeline

    cfg = PipelineConfig(**pick(args, PipelineConfig, drop_none=False))
    force = parse_stages(args.force) if args.force is not None else ()
    try:
        summary = pipeline(cfg, force=force, progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        print("difftx-edge pipeline: interrupted; finished stages are kept, run it again to resume", file=sys.stderr)
        return 130
    print(json.dumps({"report": f"{cfg.out}/report.md", "seconds": summary["seconds"],
                      "stages": {entry["stage"]: entry["status"] for entry in summary["stages"]},
                      "failed": {failure["unit"]: failure["reason"] for failure in summary["failed"]}}))
    # A failed unit never stops the others: everything else is written, and the exit code says something failed.
    return EXIT_ROWS_FAILED if summary["failed"] else 0


def _formats(args: argparse.Namespace) -> None:
    from difftx_edge.convert import formats_table

    print(formats_table())


def _drop_missing_cuda_kernels(record: logging.LogRecord) -> bool:
    # torchao's CPU install logs one "Failed to load <cuda kernel>.so" line per CUDA-only kernel at import.
    return not record.getMessage().startswith("Failed to load")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("torchao").addFilter(_drop_missing_cuda_kernels)
    args = build_parser().parse_args(argv)
    verb = args.verb
    created: list[Path] = []
    try:
        _check_threads(args)
        if getattr(args, "out", None):
            from difftx_edge.io import missing_dirs, require_output_dir

            require_output_dir(args.out)  # before any work: a bad --out costs no training or QAT
            created = missing_dirs(args.out)
        code = args.handler(args)
    except KeyboardInterrupt:
        _remove_created(created)
        kept = "finished epochs are saved, --resume continues" if verb == "train" else "nothing half-written is kept"
        print(f"difftx-edge {verb}: interrupted; {kept}", file=sys.stderr)
        return 130
    # Anything else is one line too: ours (ValueError, OSError) as it is, a library's failure with a log.
    except Exception as err:  # noqa: BLE001
        _remove_created(created)
        print(f"difftx-edge {verb}: error: {_one_line(err, verb, argv)}", file=sys.stderr)
        return EXIT_USAGE
    return code or 0


def _check_threads(args: argparse.Namespace) -> None:
    from difftx_edge.train import check_threads

    for name in ("threads", "bench_threads"):
        value = getattr(args, name, None)
        if value is not None:
            check_threads(value, _flag(name))


def _remove_created(created: list[Path]) -> None:
    from difftx_edge.io import remove_empty_dirs

    remove_empty_dirs(created)


_MEMORY_ADVICE = ("lower --batch-size, --seq-len or the model size (--d-model, --n-layers), or use a linear-cost "
                  "--attention (local, linear, hybrid)")


def _one_line(err: BaseException, verb: str, argv: list[str] | None) -> str:
    """What went wrong, in one line: our own errors as they are, anything else with a log of its traceback."""
    if isinstance(err, OSError) and err.filename is not None:  # a raw errno names no remedy
        return f"{err.strerror or type(err).__name__}: {err.filename}: check the path, its permissions and free space"
    if isinstance(err, (ValueError, OSError)) and not _out_of_memory(err):
        return " ".join(str(err).split()) or type(err).__name__
    log_path = _traceback_log(err, verb, sys.argv[1:] if argv is None else argv)
    where = f"; full traceback in {log_path}" if log_path else ""
    if _out_of_memory(err):
        return f"out of memory ({_first_line(err)}): {_MEMORY_ADVICE}{where}"
    return (f"unexpected {type(err).__name__}: {_first_line(err)}{where} (please report it with the log, "
            "it is a bug)")


def _out_of_memory(err: BaseException) -> bool:
    # torch reports a failed allocation as RuntimeError ("DefaultCPUAllocator: can't allocate memory",
    # "CUDA out of memory"), numpy as MemoryError or numpy._core._exceptions._ArrayMemoryError.
    text = str(err)
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()))


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _traceback_log(err: BaseException, verb: str, argv: list[str]) -> str | None:
    """Write the full traceback to a new log file in the temporary folder; its path, or None if that failed.

    Not into --out: a failed command leaves no new file there.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        fd, path = tempfile.mkstemp(prefix=f"difftx-edge-{verb}-{stamp}-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"difftx-edge {' '.join(argv)}\n")
            traceback.print_exception(type(err), err, err.__traceback__, file=f)
    except OSError:
        return None
    return path


if __name__ == "__main__":
    sys.exit(main())
