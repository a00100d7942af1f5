"""The stages: each builder returns its units, with keys computed now, after the stages before it have finished.

A failed unit stops only what reads its outputs: the other units run, and the
report marks the failure with its one-line reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from difftx_edge.convert import FORMATS, ExportConfig
from difftx_edge.hashing import sha256_tree
from difftx_edge.io import atomic_write_bytes, atomic_write_json
from difftx_edge.pipeline.cache import UNKEYED, digests, settings
from difftx_edge.pipeline.plan import (
    ACCURACY_TOLERANCE,
    BENCH,
    BENCH_FILES,
    BUNDLES,
    CHECKS,
    REPORT,
    RUN,
    RUN_FILES,
    PipelineConfig,
    Plan,
)
from difftx_edge.pipeline.report import plural, render_report
from difftx_edge.quantize import QuantConfig
from difftx_edge.quantize.api import int8_dir
from difftx_edge.runtimes.bench import BenchConfig
from difftx_edge.tasks import TaskConfig
from difftx_edge.train import TrainConfig

# One logger for the whole pipeline: its lines in the stage logs are named difftx_edge.pipeline.
log = logging.getLogger(__package__)


@dataclass
class Unit:
    """One piece of a stage: redone when its key's hash changes or its outputs no longer hash as recorded."""

    name: str
    what: str  # for the progress line
    key: dict
    outputs: list[Path]
    run: Callable[[], None]
    blocked: str | None = None  # why it cannot run: a unit it needs failed (then it is not run, and not recorded)
    discard: bool = False  # its outputs are removed when it fails: an older bundle must not pass for this one


@dataclass
class Context:
    """What every stage's builder reads: the config, its plan, the output directory and the toolchain versions."""

    cfg: PipelineConfig
    plan: Plan
    out: Path
    versions: dict
    progress: bool
    failed: dict[str, str] = field(default_factory=dict)  # unit -> its one-line reason, in this invocation

    @property
    def run(self) -> Path:
        return self.out / RUN

    def blocked(self, needs: Iterable[str]) -> str | None:
        """Why a unit that reads the outputs of ``needs`` cannot run, or None: the first of them that failed."""
        for name in needs:
            if name in self.failed:
                return f"{name} failed"
        return None

    def exported(self, names: Iterable[str]) -> list[str]:
        """The bundles among ``names`` whose export did not fail in this invocation."""
        return [name for name in names if f"export-{name}" not in self.failed]

    def not_exported(self) -> dict[str, str]:
        """Bundle -> why its export failed (or did not run), in this invocation."""
        return {name: self.failed[f"export-{name}"] for name in self.plan.bundle_names
                if f"export-{name}" in self.failed}


def _train_units(ctx: Context) -> list[Unit]:
    from difftx_edge.train import train

    cfg = ctx.cfg
    train_cfg, task_cfg, choices = cfg.train_config(ctx.run), cfg.task_config(), cfg.model_choices()
    task = {**asdict(task_cfg), "data": sha256_tree(Path(cfg.data)) if cfg.data else None}
    key = {"train": settings(train_cfg), "task": task, "model": choices, "versions": ctx.versions}

    def run() -> None:
        resume = _interrupted_training(ctx.run, train_cfg, task_cfg, choices)
        if resume:
            log.info("continuing the interrupted training in %s", ctx.run)
        train(train_cfg, task_cfg, choices, resume=resume, force=not resume, progress=ctx.progress)

    outputs = [ctx.run / name for name in (*RUN_FILES, "metrics.jsonl")]
    return [Unit("train", f"{plural(cfg.epochs, 'epoch')} of {cfg.attention} attention on {cfg.task}", key, outputs,
                 run)]


def _interrupted_training(run: Path, train_cfg: TrainConfig, task_cfg: TaskConfig, choices: dict) -> bool:
    """Whether ``run`` holds a resumable training of these very settings (train's --resume continues it)."""
    try:
        saved = json.loads((run / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not (run / "state.pt").is_file() or not isinstance(saved, dict) or not isinstance(saved.get("train"), dict):
        return False
    saved_train = {k: v for k, v in saved["train"].items() if k not in UNKEYED}
    return (saved_train == settings(train_cfg) and saved.get("task") == asdict(task_cfg)
            and saved.get("model_choices") == choices)


def _quantize_units(ctx: Context) -> list[Unit]:
    from difftx_edge.quantize import quantize
    from difftx_edge.quantize.api import CONFIG, PROGRAM, REPORT

    units = []
    blocked = ctx.blocked(["train"])
    for backend in ctx.plan.backends:
        qdir = int8_dir(ctx.out, backend)
        qcfg = QuantConfig(run=str(ctx.run), out=str(qdir), backend=backend, method="qat", epochs=ctx.cfg.qat_epochs,
                           seed=ctx.cfg.seed, threads=ctx.cfg.threads)
        key = {} if blocked else {"quant": settings(qcfg), "versions": ctx.versions,
                                  "inputs": digests(ctx.out, [f"{RUN}/{n}" for n in RUN_FILES])}
        units.append(Unit(f"quantize-{backend}", backend, key,
                          [qdir / PROGRAM, qdir / CONFIG, qdir / REPORT],
                          lambda qcfg=qcfg: quantize(qcfg, force=True, progress=ctx.progress), blocked=blocked))
    return units


def _export_units(ctx: Context) -> list[Unit]:
    from difftx_edge.convert import export_run

    units = []
    for fmt, precision in ctx.plan.bundles:
        ecfg = ExportConfig(run=str(ctx.run), out=str(ctx.out / BUNDLES), format=fmt, precision=precision,
                            quantized=str(int8_dir(ctx.out)), threads=ctx.cfg.threads)
        reads = [f"{RUN}/{n}" for n in RUN_FILES]
        needs = ["train"]
        if precision == "int8":
            reads += [str(int8_dir("", FORMATS[fmt].quantizer) / n) for n in ("quantized.pt2", "quant_config.json")]
            needs.append(f"quantize-{FORMATS[fmt].quantizer}")
        blocked = ctx.blocked(needs)
        key = {} if blocked else {"export": settings(ecfg), "inputs": digests(ctx.out, reads),
                                  "versions": ctx.versions}
        name = f"{fmt}-{precision}"
        units.append(Unit(f"export-{name}", name, key, [ctx.out / BUNDLES / name],
                          lambda ecfg=ecfg: export_run(ecfg), blocked=blocked, discard=True))
    return units


def _check_units(ctx: Context) -> list[Unit]:
    exported, not_exported = ctx.exported(ctx.plan.bundle_names), ctx.not_exported()
    blocked = None if exported else "no bundle was exported"
    manifests = [f"{BUNDLES}/{name}/manifest.json" for name in exported]
    # The bundles that failed to export are in the key, so that the check runs again once they exist.
    key = {} if blocked else {"accuracy_tolerance": ACCURACY_TOLERANCE, "inputs": digests(ctx.out, manifests),
                              "not_exported": not_exported}
    return [Unit("check", plural(len(manifests), "bundle"), key, [ctx.out / CHECKS], lambda: _check_bundles(ctx),
                 blocked=blocked)]


def _check_bundles(ctx: Context) -> dict:
    """Write ``checks.json``: each bundle's parity and runtime accuracy against PyTorch's.

    A bundle that failed to export has a row that says so; it does not fail
    this unit (its export unit has failed already).

    Raises:
        ValueError: an exported bundle failed parity, or its accuracy in the
            runtime is more than ``ACCURACY_TOLERANCE`` from PyTorch's on the
            same inputs. ``checks.json`` is written first.
    """
    (ctx.out / CHECKS).unlink(missing_ok=True)  # a check that fails half-way must not leave an older one to report
    rows = []
    not_exported = ctx.not_exported()
    for name in ctx.plan.bundle_names:
        if name in not_exported:
            fmt, precision = name.rsplit("-", 1)
            rows.append({"bundle": name, "format": fmt, "precision": precision, "exported": False,
                         "checked_by": None, "parity": None, "accuracy": None, "passed": False,
                         "problems": [f"not exported: {not_exported[name]}"]})
            continue
        manifest = json.loads((ctx.out / BUNDLES / name / "manifest.json").read_text())
        parity, accuracy = manifest["parity"], manifest["accuracy"]
        problems = [] if parity["passed"] else [f"parity failed: {parity.get('failure')}"]
        if accuracy is None:
            problems.append("no accuracy was measured in the runtime")
        elif abs(accuracy["artifact"] - accuracy["pytorch"]) > ACCURACY_TOLERANCE:
            problems.append(f"accuracy in the runtime {accuracy['artifact']:.2%} is more than "
                            f"{ACCURACY_TOLERANCE:.0%} from PyTorch's {accuracy['pytorch']:.2%}")
        rows.append({"bundle": name, "format": manifest["format"], "precision": manifest["precision"],
                     "exported": True, "checked_by": parity["check"], "parity": parity, "accuracy": accuracy,
                     "passed": not problems, "problems": problems})
    checks = {"accuracy_tolerance": ACCURACY_TOLERANCE, "bundles": rows, "passed": all(r["passed"] for r in rows)}
    atomic_write_json(ctx.out / CHECKS, checks)
    failed = [row for row in rows if row["exported"] and not row["passed"]]
    if failed:
        raise ValueError(f"{len(failed)} of {len(rows)} bundles failed their check, first {failed[0]['bundle']}: "
                         f"{failed[0]['problems'][0]}")
    return checks


def _bench_units(ctx: Context) -> list[Unit]:
    if not ctx.plan.benched:
        return []
    from difftx_edge.runtimes.bench import bench, failed_rows

    timed = ctx.exported(ctx.plan.benched)  # a bundle that failed to export has no row: the report says why
    blocked = None if timed else "no bundle to time was exported"
    bcfg = BenchConfig(bundles=[str(ctx.out / BUNDLES / name) for name in timed or ctx.plan.benched],
                       target=ctx.cfg.target, threads=ctx.cfg.bench_threads, runs=ctx.cfg.runs,
                       out=str(ctx.out / BENCH))
    key = {} if blocked else {"bench": settings(bcfg, leave_out=("bundles", "out")),
                              "inputs": digests(ctx.out, [f"{BUNDLES}/{n}" for n in timed]), "machine": _machine(),
                              "versions": ctx.versions}

    def run() -> None:
        # A benchmark that fails before it writes its results must not leave an older run's results to report.
        (ctx.out / BENCH / "results.json").unlink(missing_ok=True)
        results = bench(bcfg, progress=ctx.progress)
        failed = failed_rows(results)
        if failed:
            raise ValueError(f"{len(failed)} of {len(results['rows'])} rows failed, first "
                             f"{Path(failed[0]['source']).name}: {failed[0]['error']}")

    return [Unit("bench", f"{plural(len(timed), 'bundle')} on {ctx.cfg.target}, "
                          f"{plural(ctx.cfg.runs, 'run')} each", key,
                 [ctx.out / BENCH / name for name in BENCH_FILES], run, blocked=blocked)]


def _report_units(ctx: Context) -> list[Unit]:
    blocked = ctx.blocked(["train"])
    # What failed is part of the key: the report marks it. Inputs a failed unit did not write are left out.
    inputs = [name for name in _report_inputs(ctx.plan) if (ctx.out / name).is_file()]
    key = {} if blocked else {"config": asdict(ctx.cfg), "inputs": digests(ctx.out, inputs), "machine": _machine(),
                              "versions": ctx.versions, "failed": dict(ctx.failed)}

    def run() -> None:
        atomic_write_bytes(ctx.out / REPORT, render_report(ctx.out, ctx.cfg, ctx.plan, ctx.failed).encode())

    return [Unit("report", REPORT, key, [ctx.out / REPORT], run, blocked=blocked)]


BUILDERS: dict[str, Callable[[Context], list[Unit]]] = {
    "train": _train_units, "quantize": _quantize_units, "export": _export_units, "check": _check_units,
    "bench": _bench_units, "report": _report_units,
}


def _report_inputs(plan: Plan) -> list[str]:
    return ([f"{RUN}/config.json", f"{RUN}/metrics.jsonl"]
            + [str(int8_dir("", b) / "quant_report.json") for b in plan.backends]
            + [f"{BUNDLES}/{name}/manifest.json" for name in plan.bundle_names] + [CHECKS]
            + ([f"{BENCH}/results.json"] if plan.benched else []))


def _machine() -> dict:
    from difftx_edge.runtimes.measure import describe

    return {k: v for k, v in describe().items() if k != "packages"}
