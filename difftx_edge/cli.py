"""The ``difftx-edge`` command line: one entry point, one verb per stage.

Flags are generated from the config dataclasses, so each flag has its field's
name (``--d-model`` is ``ModelConfig.d_model``) and the same validation. Bad
input is reported once, here, as one line and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import MISSING, fields

from difftx_edge import __version__
from difftx_edge.model import ModelConfig
from difftx_edge.tasks import TASKS, TaskConfig
from difftx_edge.train import MODEL_CHOICES, TrainConfig

EXIT_USAGE = 2
EXIT_ROWS_FAILED = 1  # bench: some rows failed; the results, with each row's error, are written
TASK_FLAGS = [f.name for f in fields(TaskConfig) if f.name not in ("name", "seed")]

_TYPES = {"int": int, "float": float, "str": str}


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

    from difftx_edge.convert import ExportConfig

    export = verbs.add_parser("export", help="export a run to bundles (artifact + manifest), checked in each runtime")
    add_fields(export, ExportConfig, keep_defaults=True, choices={"precision": ("fp32", "fp16", "int8")})
    export.set_defaults(handler=_export)

    convert = verbs.add_parser("convert", help="convert any torch.export.save file to bundles, checked in each runtime")
    convert.add_argument("model", help="a .pt2 file written by torch.export.save")
    convert.add_argument("--format", default="all", help="comma-separated formats, or all")
    convert.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    convert.add_argument("--out", required=True)
    convert.add_argument("--deployment-target", default="iOS17")
    convert.add_argument("--threads", type=int, default=1)
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


def _export(args: argparse.Namespace) -> None:
    from difftx_edge.convert import ExportConfig, export_run

    for manifest in export_run(ExportConfig(**pick(args, ExportConfig, drop_none=False))):
        print(json.dumps(_bundle_line(args.out, manifest)))


def _convert(args: argparse.Namespace) -> None:
    from difftx_edge.convert import convert_pt2

    for manifest in convert_pt2(args.model, args.out, args.format, args.precision, args.deployment_target,
                                threads=args.threads):
        print(json.dumps(_bundle_line(args.out, manifest)))


def _bundle_line(out: str, manifest: dict) -> dict:
    return {"bundle": f"{out}/{manifest['format']}-{manifest['precision']}", "bytes": manifest["artifact_bytes"],
            "max_abs_error": manifest["parity"]["max_abs_error"], "check": manifest["parity"]["check"],
            "accuracy": manifest["accuracy"]}


def _bench(args: argparse.Namespace) -> int:
    from difftx_edge.runtimes.bench import BenchConfig, bench, summary_line, table

    cfg = BenchConfig(**pick(args, BenchConfig, drop_none=False))
    results = bench(cfg, progress=sys.stderr.isatty())
    print(table(results))
    print(f"{summary_line(results)}; results in {cfg.out}", file=sys.stderr)
    return EXIT_ROWS_FAILED if any(row["status"] != "ok" for row in results["rows"]) else 0


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
                      "stages": {entry["stage"]: entry["status"] for entry in summary["stages"]}}))
    return 0


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
    try:
        code = args.handler(args)
    except (ValueError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"difftx-edge {args.verb}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"difftx-edge {args.verb}: interrupted; finished epochs are saved", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
