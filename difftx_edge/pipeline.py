"""``difftx-edge pipeline``: train, quantize, export, check, benchmark and report, resuming where it stopped.

One command fills one directory, stage by stage::

    DIR/run/                           1. train: the fp32 run (model.safetensors, config.json, metrics.jsonl)
    DIR/int8/<backend>/                2. quantize: QAT to int8 with each needed backend's quantizer
    DIR/bundles/<format>-<precision>/  3. export: artifact + manifest, parity and accuracy measured in its runtime
    DIR/checks.json                    4. check: each bundle's parity, and its runtime accuracy against PyTorch's
    DIR/bench/                         5. bench: latency and memory (results.json, .csv, .md) and the plots
    DIR/report.md                      6. report: the tables, plots, machine and versions, from the JSON above
    DIR/pipeline.json                  the last invocation: each stage's status and wall time
    DIR/stages/<unit>.json             one record per finished unit of work
    DIR/logs/<stage>.log               everything the libraries printed while the stage ran

A stage is made of units: one per backend in quantize, one per bundle in
export, one in every other stage. A unit's key holds its settings, the
toolchain versions and the sha256 of every file it reads; its record holds the
key's sha256 and the sha256 of each output. A unit is skipped when its record
names the same key and its outputs still hash to what was recorded. Keys hash
the outputs of earlier units, so redoing one redoes what depends on whatever
changed, and nothing else. A record is deleted before its unit runs and
written, atomically, after the unit's outputs: an interrupted or failed unit
leaves no record and is redone, and an interrupted training run continues from
its last finished epoch. A failed unit stops only what reads its outputs: the
other units run, and the report marks the failure with its one-line reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from difftx_edge.convert import FORMATS, PRECISIONS, ExportConfig
from difftx_edge.convert.api import parse_formats
from difftx_edge.io import atomic_write_bytes, atomic_write_json, require_output_dir
from difftx_edge.model import ModelConfig
from difftx_edge.quantize import QuantConfig
from difftx_edge.quiet import Console, into_log
from difftx_edge.runtimes.bench import DEFAULT_RUNS, BenchConfig
from difftx_edge.tasks import TaskConfig
from difftx_edge.train import TrainConfig

log = logging.getLogger("difftx_edge.pipeline")

STAGES = ("train", "quantize", "export", "check", "bench", "report")
RUN, INT8, BUNDLES, BENCH = "run", "int8", "bundles", "bench"
CHECKS, REPORT, SUMMARY = "checks.json", "report.md", "pipeline.json"
RUN_FILES = ("model.safetensors", "config.json")  # what later stages read from the run
BENCH_FILES = ("results.json", "results.csv", "results.md", "latency_vs_seq_len.png", "fp32_vs_int8.png")
# check: the accuracy measured in the runtime may differ from PyTorch's on the same inputs by at most this
# fraction, the same 1 % that parity's 99 % top-1 agreement allows an int8 artifact.
ACCURACY_TOLERANCE = 0.01
TITLES = {"train": "fp32 training", "quantize": "QAT to int8, per quantizer",
          "export": "export, with parity and accuracy in each runtime", "check": "parity and accuracy against PyTorch",
          "bench": "latency and memory", "report": "tables, plots, machine and versions"}
# These stages' libraries draw useful bars (epochs, QAT steps, benchmark rows); export's toolchains draw one
# for every converter pass, which belongs in the log.
LIBRARY_BARS = ("train", "quantize", "bench")
# Left out of the keys: paths, which the layout of DIR fixes, and settings that change how fast a stage runs
# rather than what it writes (the benchmark's threads, which change its timings, are kept).
UNKEYED = ("out", "run", "quantized", "bundles", "threads", "device")


@dataclass
class PipelineConfig:
    """What ``difftx-edge pipeline`` builds and measures; each field is the flag of the same name.

    Raises:
        ValueError: an unknown task, attention kind, format, precision,
            target or stage setting; a precision none of the formats exports;
            missing data; an output path that is a file.
    """

    out: str = "pipeline-out"
    task: str = "digits"
    data: str | None = None  # the npz and text tasks' data file or folder
    attention: str = "hybrid"  # one kind, or one per layer
    d_model: int | None = None  # None: the model's default
    epochs: int = 150  # fp32 training epochs, as the train verb
    qat_epochs: int = 3  # QAT passes over the training split per backend, as the quantize verb
    formats: str = "all"  # comma-separated formats, or all
    precisions: str = "fp32,int8"
    target: str = "local"  # where bench measures: local, cuda, ssh://user@host[:port], adb://SERIAL
    runs: int = DEFAULT_RUNS  # timed runs per benchmark row
    threads: int | None = None  # training, QAT and export; None: the machine's cores
    bench_threads: int = 1  # threads of the runtime under measurement
    seed: int = 0

    def __post_init__(self) -> None:
        from difftx_edge.runtimes.targets import target_class

        require_output_dir(self.out)
        if self.data is not None and not Path(self.data).exists():
            raise ValueError(f"data {self.data} does not exist: give the task's data file or folder")
        # The stage configs validate the fields they take; the model is checked with a placeholder input,
        # and against the task's sequence length when training builds it.
        self.task_config()
        ModelConfig(input_dim=1, **self.model_choices())
        self.train_config(Path(self.out))
        QuantConfig(run=self.out, epochs=self.qat_epochs, seed=self.seed, threads=self.threads)
        BenchConfig(bundles=[self.out], target=self.target, threads=self.bench_threads, runs=self.runs)
        target_class(self.target)  # raises ValueError for an unknown target
        unknown = [p for p in self.precision_list() if p not in PRECISIONS]
        if unknown:
            raise ValueError(f"unknown precision {unknown[0]!r}: use a comma-separated list of "
                             f"{', '.join(PRECISIONS)}")
        formats = parse_formats(self.formats)
        for precision in self.precision_list():
            if not any(precision in FORMATS[f].precisions for f in formats):
                raise ValueError(f"no format among {', '.join(formats)} exports {precision}: formats with it are "
                                 + ", ".join(f for f in sorted(FORMATS) if precision in FORMATS[f].precisions))

    def precision_list(self) -> list[str]:
        names = list(dict.fromkeys(p.strip() for p in self.precisions.split(",") if p.strip()))
        if not names:
            raise ValueError("no precision given: use --precisions with one or more of " + ", ".join(PRECISIONS))
        return names

    def task_config(self) -> TaskConfig:
        return TaskConfig(name=self.task, seed=self.seed, data=self.data)

    def model_choices(self) -> dict:
        return {"attention": self.attention, **({} if self.d_model is None else {"d_model": self.d_model})}

    def train_config(self, run: Path) -> TrainConfig:
        return TrainConfig(out=str(run), epochs=self.epochs, seed=self.seed, threads=self.threads)


@dataclass
class Plan:
    """What this config builds: the bundles, the quantizers they need, and what can be timed on the target."""

    formats: list[str]
    precisions: list[str]
    bundles: list[tuple[str, str]]  # (format, precision) pairs the formats support
    unsupported: list[tuple[str, str]]
    backends: list[str]  # quantizers of the int8 bundles
    benched: list[str]  # bundle names the target can run
    not_benched: dict[str, str]  # bundle name -> why it is not timed

    @classmethod
    def of(cls, cfg: PipelineConfig) -> Plan:
        formats, precisions = parse_formats(cfg.formats), cfg.precision_list()
        pairs = [(f, p) for f in formats for p in precisions]
        bundles = [(f, p) for f, p in pairs if p in FORMATS[f].precisions]
        backends = sorted({FORMATS[f].quantizer for f, p in bundles if p == "int8"})
        benched, not_benched = [], {}
        for f, p in bundles:
            reason = _why_not_timed(f, cfg.target)
            if reason is None:
                benched.append(f"{f}-{p}")
            else:
                not_benched[f"{f}-{p}"] = reason
        return cls(formats, precisions, bundles, [pair for pair in pairs if pair not in bundles], backends,
                   benched, not_benched)

    @property
    def bundle_names(self) -> list[str]:
        return [f"{f}-{p}" for f, p in self.bundles]

    def require(self) -> None:
        """Raises ValueError, naming the pip extra, for any toolchain the plan needs and lacks."""
        from difftx_edge.extras import require_extra
        from difftx_edge.quantize import get_quantizer_spec

        for f, p in self.bundles:
            FORMATS[f].require(p)  # the exporter and the runtime that checks its artifact
        for backend in self.backends:
            get_quantizer_spec(backend).require()
        if self.benched:
            require_extra("plots", ["matplotlib"], "bench")


def _why_not_timed(fmt: str, target: str) -> str | None:
    """Why the benchmark leaves out bundles of ``fmt`` on ``target``, or None."""
    from difftx_edge.runtimes import runtime_for
    from difftx_edge.runtimes.targets import target_class

    if fmt == "coreml" and not (target == "local" and platform.system() == "Darwin"):
        return ("the Core ML runtime runs on macOS only (the pipeline times it on a local Mac); its bundles are "
                "checked here by reference evaluation of the saved program")
    runtimes = target_class(target).runtimes
    runtime = runtime_for(fmt).name
    if runtimes is not None and runtime not in runtimes:
        return f"target {target} runs {', '.join(runtimes)} only, not {runtime}"
    return None


def parse_stages(text: str) -> tuple[str, ...]:
    """``all`` or comma-separated stage names, validated."""
    names = STAGES if text == "all" else tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise ValueError(f"unknown stage {unknown[0] if unknown else text!r} for --force: use all or "
                         f"comma-separated names from {', '.join(STAGES)}")
    return names


# -----------------------------------------------------------------------------
# Units of work and their records


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


def digest(path: Path) -> str:
    """The sha256 of a file, or of a folder's files: their relative paths and contents, in sorted order."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _digests(root: Path, names: Iterable[str]) -> dict[str, str]:
    return {name: digest(root / name) for name in names}


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _settings(cfg, *, leave_out: tuple[str, ...] = UNKEYED) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in leave_out}


def _record_path(out: Path, unit: str) -> Path:
    return out / "stages" / f"{unit}.json"


def read_record(out: Path, unit: str) -> dict | None:
    """A unit's record, or None when it has none or an unreadable one."""
    try:
        record = json.loads(_record_path(out, unit).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _up_to_date(out: Path, unit: Unit, key_hash: str) -> bool:
    record = read_record(out, unit.name)
    if record is None or record.get("key_sha256") != key_hash:
        return False
    recorded = record.get("outputs")
    if not isinstance(recorded, dict):
        return False
    for path in unit.outputs:
        name = str(path.relative_to(out))
        if not path.exists() or recorded.get(name) != digest(path):
            return False
    return True


# -----------------------------------------------------------------------------
# The stages: each returns its units, with keys computed now, after the stages before it have finished


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
    task = {**asdict(task_cfg), "data": digest(Path(cfg.data)) if cfg.data else None}
    key = {"train": _settings(train_cfg), "task": task, "model": choices, "versions": ctx.versions}

    def run() -> None:
        resume = _interrupted_training(ctx.run, train_cfg, task_cfg, choices)
        if resume:
            log.info("continuing the interrupted training in %s", ctx.run)
        train(train_cfg, task_cfg, choices, resume=resume, force=not resume, progress=ctx.progress)

    outputs = [ctx.run / name for name in (*RUN_FILES, "metrics.jsonl")]
    return [Unit("train", f"{_count(cfg.epochs, 'epoch')} of {cfg.attention} attention on {cfg.task}", key, outputs,
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
    return (saved_train == _settings(train_cfg) and saved.get("task") == asdict(task_cfg)
            and saved.get("model_choices") == choices)


def _quantize_units(ctx: Context) -> list[Unit]:
    from difftx_edge.quantize import quantize
    from difftx_edge.quantize.api import CONFIG, PROGRAM, REPORT

    units = []
    blocked = ctx.blocked(["train"])
    for backend in ctx.plan.backends:
        qdir = ctx.out / INT8 / backend
        qcfg = QuantConfig(run=str(ctx.run), out=str(qdir), backend=backend, method="qat", epochs=ctx.cfg.qat_epochs,
                           seed=ctx.cfg.seed, threads=ctx.cfg.threads)
        key = {} if blocked else {"quant": _settings(qcfg), "versions": ctx.versions,
                                  "inputs": _digests(ctx.out, [f"{RUN}/{n}" for n in RUN_FILES])}
        units.append(Unit(f"quantize-{backend}", backend, key,
                          [qdir / PROGRAM, qdir / CONFIG, qdir / REPORT],
                          lambda qcfg=qcfg: quantize(qcfg, force=True, progress=ctx.progress), blocked=blocked))
    return units


def _export_units(ctx: Context) -> list[Unit]:
    from difftx_edge.convert import export_run

    units = []
    for fmt, precision in ctx.plan.bundles:
        ecfg = ExportConfig(run=str(ctx.run), out=str(ctx.out / BUNDLES), format=fmt, precision=precision,
                            quantized=str(ctx.out / INT8), threads=ctx.cfg.threads)
        reads = [f"{RUN}/{n}" for n in RUN_FILES]
        needs = ["train"]
        if precision == "int8":
            reads += [f"{INT8}/{FORMATS[fmt].quantizer}/{n}" for n in ("quantized.pt2", "quant_config.json")]
            needs.append(f"quantize-{FORMATS[fmt].quantizer}")
        blocked = ctx.blocked(needs)
        key = {} if blocked else {"export": _settings(ecfg), "inputs": _digests(ctx.out, reads),
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
    key = {} if blocked else {"accuracy_tolerance": ACCURACY_TOLERANCE, "inputs": _digests(ctx.out, manifests),
                              "not_exported": not_exported}
    return [Unit("check", _count(len(manifests), "bundle"), key, [ctx.out / CHECKS], lambda: _check_bundles(ctx),
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
    key = {} if blocked else {"bench": _settings(bcfg, leave_out=("bundles", "out")),
                              "inputs": _digests(ctx.out, [f"{BUNDLES}/{n}" for n in timed]), "machine": _machine(),
                              "versions": ctx.versions}

    def run() -> None:
        # A benchmark that fails before it writes its results must not leave an older run's results to report.
        (ctx.out / BENCH / "results.json").unlink(missing_ok=True)
        results = bench(bcfg, progress=ctx.progress)
        failed = failed_rows(results)
        if failed:
            raise ValueError(f"{len(failed)} of {len(results['rows'])} rows failed, first "
                             f"{Path(failed[0]['source']).name}: {failed[0]['error']}")

    return [Unit("bench", f"{_count(len(timed), 'bundle')} on {ctx.cfg.target}, "
                          f"{_count(ctx.cfg.runs, 'run')} each", key,
                 [ctx.out / BENCH / name for name in BENCH_FILES], run, blocked=blocked)]


def _report_units(ctx: Context) -> list[Unit]:
    blocked = ctx.blocked(["train"])
    # What failed is part of the key: the report marks it. Inputs a failed unit did not write are left out.
    inputs = [name for name in _report_inputs(ctx.plan) if (ctx.out / name).is_file()]
    key = {} if blocked else {"config": asdict(ctx.cfg), "inputs": _digests(ctx.out, inputs), "machine": _machine(),
                              "versions": ctx.versions, "failed": dict(ctx.failed)}

    def run() -> None:
        atomic_write_bytes(ctx.out / REPORT, render_report(ctx.out, ctx.cfg, ctx.plan, ctx.failed).encode())

    return [Unit("report", REPORT, key, [ctx.out / REPORT], run, blocked=blocked)]


BUILDERS: dict[str, Callable[[Context], list[Unit]]] = {
    "train": _train_units, "quantize": _quantize_units, "export": _export_units, "check": _check_units,
    "bench": _bench_units, "report": _report_units,
}


def _unit_names(plan: Plan) -> dict[str, list[str]]:
    """The units of each stage but the report, by name (the names ``BUILDERS`` give them)."""
    return {"train": ["train"], "quantize": [f"quantize-{b}" for b in plan.backends],
            "export": [f"export-{name}" for name in plan.bundle_names], "check": ["check"],
            "bench": ["bench"] if plan.benched else []}


def _report_inputs(plan: Plan) -> list[str]:
    return ([f"{RUN}/config.json", f"{RUN}/metrics.jsonl"]
            + [f"{INT8}/{b}/quant_report.json" for b in plan.backends]
            + [f"{BUNDLES}/{name}/manifest.json" for name in plan.bundle_names] + [CHECKS]
            + ([f"{BENCH}/results.json"] if plan.benched else []))


def _machine() -> dict:
    from difftx_edge.runtimes.measure import describe

    return {k: v for k, v in describe().items() if k != "packages"}


# -----------------------------------------------------------------------------
# Running the stages


def pipeline(cfg: PipelineConfig, *, force: Iterable[str] = (), progress: bool = True) -> dict:
    """Run every stage whose outputs are missing or out of date, and write ``report.md``.

    Args:
        cfg: the task, model, formats, precisions, target and schedule.
        force: stages to redo even when their outputs are up to date (later
            stages follow when what they read changes).
        progress: draw progress bars; one line per stage is written either way.

    A unit that fails never stops the others: what needs its outputs is not
    run (a bundle that failed to export is neither checked nor timed), every
    other unit runs, and the report marks each failure with its one-line
    reason. A failed unit leaves no record, so the next run retries it.

    Returns:
        The summary written to ``pipeline.json``: each stage's status (ran,
        skipped, not needed, failed or interrupted), its units and wall times,
        and ``failed``: one ``{"unit", "reason"}`` per unit that failed or could
        not run (empty when all passed).

    Raises:
        ValueError: a bad config or a missing extra, before any work.
    """
    from difftx_edge.quantize.api import versions

    forced = set(force)
    for name in forced:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r} to force: use {', '.join(STAGES)}")
    plan = Plan.of(cfg)
    plan.require()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(cfg, plan, out, versions(None), progress)
    summary = {"config": asdict(cfg), "force": sorted(forced), "stages": [], "failed": [], "seconds": 0.0}
    started = time.perf_counter()
    with Console(progress) as console:
        console.say(f"difftx-edge pipeline: {cfg.task}, {cfg.attention} attention, "
                    f"{', '.join(f'{f} {p}' for f, p in plan.bundles)}, bench on {cfg.target} -> {out}")
        for number, stage in enumerate(STAGES, 1):
            entry = {"stage": stage, "status": "running", "seconds": 0.0, "units": []}
            summary["stages"].append(entry)
            stage_started = time.perf_counter()
            # The report shows every stage's wall time and every failure, so it is rewritten whenever any unit ran
            # or failed.
            redo = stage in forced or (stage == "report" and any(
                unit["status"] != "skipped" for earlier in summary["stages"] for unit in earlier["units"]))
            try:
                _run_stage(ctx, stage, f"[{number}/{len(STAGES)}] {stage}", redo, entry, console)
            finally:
                if entry["status"] == "running":  # stopped by Ctrl-C: its finished units are recorded
                    entry["status"] = "interrupted"
                entry["seconds"] = _seconds(stage_started)
                summary["seconds"] = _seconds(started)
                summary["failed"] = [{"unit": unit, "reason": reason} for unit, reason in ctx.failed.items()]
                atomic_write_json(out / SUMMARY, summary)
        where = f"report in {out / REPORT}" if (out / REPORT).is_file() and "report" not in ctx.failed else \
            "no report"
        if ctx.failed:
            console.say(f"difftx-edge pipeline: {_count(len(ctx.failed), 'unit')} failed or not run "
                        f"({', '.join(ctx.failed)}) in {summary['seconds']:.0f} s; everything else is done; {where}")
        else:
            console.say(f"difftx-edge pipeline: done in {summary['seconds']:.0f} s; {where}")
    return summary


def _run_stage(ctx: Context, stage: str, label: str, forced: bool, entry: dict, console: Console) -> None:
    units = BUILDERS[stage](ctx)
    if not units:
        entry["status"] = "not needed"
        reason = "no int8 precision asked for" if stage == "quantize" else "no bundle can be timed on this target"
        console.say(f"{label}: not needed ({reason})")
        return
    todo = []
    for unit in units:
        key_hash = _key_hash(unit.key)
        if not forced and _up_to_date(ctx.out, unit, key_hash):
            entry["units"].append({"unit": unit.name, "status": "skipped"})
        else:
            todo.append((unit, key_hash))
    if not todo:
        entry["status"] = "skipped"
        console.say(f"{label}: up to date, skipped")
        return
    skipped = len(units) - len(todo)
    console.say(f"{label} ({TITLES[stage]}): {', '.join(unit.what for unit, _ in todo)}"
                + (f" ({skipped} unit(s) up to date)" if skipped else ""))
    log_path = ctx.out / "logs" / f"{stage}.log"
    bar = console.bar(len(todo), stage) if len(todo) > 1 else None
    try:
        for unit, key_hash in todo:
            if bar is not None:
                bar.set_postfix_str(unit.what)
            _record_path(ctx.out, unit.name).unlink(missing_ok=True)  # until it finishes, the unit reads as not done
            started = time.perf_counter()
            reason = None
            if unit.blocked is not None:
                reason = f"not run: {unit.blocked}"
            else:
                with into_log(log_path, unit.name, console, stage in LIBRARY_BARS):
                    try:
                        unit.run()
                    # Whatever a library raises fails this unit only, as one line; its traceback goes to the log.
                    except Exception as err:  # noqa: BLE001
                        log.exception("unit %s failed", unit.name)
                        reason = _first_line(err)
            if reason is not None:
                for path in unit.outputs if unit.discard else ():
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                ctx.failed[unit.name] = reason
                entry["units"].append({"unit": unit.name, "status": "not run" if unit.blocked else "failed",
                                       "reason": reason})
                console.say(f"{label}: {unit.what} {reason}" if unit.blocked else
                            f"{label}: {unit.what} failed: {reason} (log: {log_path})")
                if bar is not None:
                    bar.update(1)
                continue
            seconds = _seconds(started)
            atomic_write_json(_record_path(ctx.out, unit.name), {
                "unit": unit.name, "stage": stage, "key_sha256": key_hash, "key": unit.key, "seconds": seconds,
                "outputs": {str(path.relative_to(ctx.out)): digest(path) for path in unit.outputs}})
            entry["units"].append({"unit": unit.name, "status": "ran", "seconds": seconds})
            console.say(f"{label}: {unit.what} done in {seconds:.1f} s")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    entry["status"] = "failed" if any(unit["status"] in ("failed", "not run") for unit in entry["units"]) else "ran"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _seconds(since: float) -> float:
    return round(time.perf_counter() - since, 3)


# -----------------------------------------------------------------------------
# The report: every number comes from the JSON files the stages wrote


def render_report(out: Path, cfg: PipelineConfig, plan: Plan, failed: dict[str, str] | None = None) -> str:
    """``report.md``: accuracy, export, latency and memory tables, the plots, the stages, machine and versions.

    Args:
        out: the pipeline's folder, whose JSON results the report is made of.
        cfg: the pipeline's config.
        plan: what it builds.
        failed: unit -> the one-line reason it failed or did not run; the
            report lists them first and marks what they left out.
    """
    from difftx_edge.quantize.api import versions
    from difftx_edge.runtimes.measure import describe, int8_features_text

    failed = failed or {}

    def read(path: Path) -> dict | None:  # a unit that failed may have left no file
        return json.loads(path.read_text()) if path.is_file() else None

    run_config = json.loads((out / RUN / "config.json").read_text())
    test = _test_metrics(out / RUN / "metrics.jsonl")
    quant = {b: report for b in plan.backends if (report := read(out / INT8 / b / "quant_report.json"))}
    checks = {row["bundle"]: row for row in (read(out / CHECKS) or {"bundles": []})["bundles"]}
    manifests = {name: manifest for name in plan.bundle_names
                 if f"export-{name}" not in failed and (manifest := read(out / BUNDLES / name / "manifest.json"))}
    # A failed benchmark's rows, each with its status, when it got as far as writing them (it removes older ones
    # first); a benchmark that could not run has none.
    results = None
    if plan.benched and not failed.get("bench", "").startswith("not run"):
        results = read(out / BENCH / "results.json")
    model = run_config["model"]
    examples = next((row["accuracy"]["examples"] for row in checks.values() if row["accuracy"]), None)

    int8 = (f"; int8 by QAT ({_count(cfg.qat_epochs, 'epoch')}) with each format's quantizer" if plan.backends
            else "")
    sources = [f"`{RUN}/metrics.jsonl`", *([f"`{INT8}/*/quant_report.json`"] if plan.backends else []),
               f"`{BUNDLES}/*/manifest.json`", f"`{CHECKS}`", *([f"`{BENCH}/results.json`"] if results else [])]
    lines = ["# difftx-edge pipeline report", "",
             f"Task `{cfg.task}`, {model['attention']} attention, d_model {model['d_model']}, {model['n_layers']} "
             f"layers, {_count(cfg.epochs, 'training epoch')}{int8}; formats {', '.join(plan.formats)} at "
             f"{', '.join(plan.precisions)}; benchmark target `{cfg.target}`. Written by `difftx-edge pipeline` from "
             f"the JSON results in this folder: {', '.join(sources)}.", ""]
    if failed:
        lines += ["## Failures", "",
                  f"{_count(len(failed), 'unit')} failed or could not run; everything else ran, and what they would "
                  "have made is marked below. Each log is in `logs/<stage>.log`; a re-run retries them.", ""]
        lines += [_table(["unit", "reason"], [[unit, reason.replace("|", "\\|")] for unit, reason in failed.items()]),
                  ""]

    lines += ["## Accuracy", "",
              f"Test-split accuracy ({examples or '-'} examples). PyTorch: the fp32 checkpoint"
              + (", and each quantizer's int8 program after PTQ and after QAT" if plan.backends else "")
              + ". In the runtime: the exported artifact, on the same inputs"
              + (" (int8: the shipped program's artifact: QAT's only when it beat PTQ on the validation split)."
                 if plan.backends else "."), ""]
    header = ["format", "quantizer", "fp32 PyTorch", *[f"{p} in the runtime" for p in plan.precisions]]
    if plan.backends:
        header += ["PTQ int8 PyTorch", "QAT int8 PyTorch", "shipped"]
    rows = []
    for fmt in plan.formats:
        spec = FORMATS[fmt]
        row = [fmt, spec.quantizer, _pct(test.get("accuracy"))]
        for p in plan.precisions:
            check = checks.get(f"{fmt}-{p}")
            if (fmt, p) not in plan.bundles:
                row.append("not supported")
            elif f"export-{fmt}-{p}" in failed:
                row.append("not exported")
            elif check and check["accuracy"]:
                row.append(_pct(check["accuracy"]["artifact"]))
            else:
                row.append("-")
        if plan.backends:
            report = quant.get(spec.quantizer)
            row += [_pct(report["test"]["ptq"]["accuracy"]) if report else "-",
                    _pct((report["test"]["qat"] or {}).get("accuracy")) if report else "-",
                    f"{report['shipped'].upper()}: {report['reason']}".replace("|", "\\|") if report else "-"]
        rows.append(row)
    lines += [_table(header, rows), ""]
    if "coreml" in plan.formats:
        lines += ["Core ML's accuracy and parity are measured by reference evaluation of the saved program's ops "
                  "with coremltools (labelled below), not by the Core ML runtime, which runs on macOS only.", ""]

    lines += ["## Export", "",
              f"Each bundle's parity against PyTorch on held-out test inputs (float: max abs error on the logits; "
              f"int8: output quantization steps), and the check of its runtime accuracy against PyTorch's on the "
              f"same inputs (tolerance {ACCURACY_TOLERANCE:.0%}).", ""]
    rows = []
    for name in plan.bundle_names:
        manifest, check = manifests.get(name), checks.get(name)
        if manifest is None:
            reason = failed.get(f"export-{name}", "no manifest")
            rows.append([name, "-", "-", "-", "-", f"not exported: {reason}".replace("|", "\\|"), "-", "-", "-"])
            continue
        accuracy = check["accuracy"] if check else None
        if check is None:
            verdict = "not checked" + (f": {failed['check']}" if "check" in failed else "")
        else:
            verdict = "passed" if check["passed"] else f"failed: {'; '.join(check['problems'])}"
        rows.append([name, f"{manifest['artifact_bytes'] / 1024:.1f}", _parity(manifest["parity"]),
                     _pct(manifest["parity"]["top1_agreement"]),
                     f"{_pct(accuracy['artifact'])} ({_pct(accuracy['pytorch'])})" if accuracy else "-",
                     verdict.replace("|", "\\|"), _checked_by(manifest), _delegation(manifest),
                     f"{manifest['export_seconds']:.1f}"])
    header = ["bundle", "size (KB)", "parity vs PyTorch (max)", "top-1 agreement", "accuracy in the runtime (PyTorch)",
              "check", "checked by", "delegation", "conversion (s)"]
    lines += [_table(header, rows), ""]
    if plan.unsupported:
        lines += ["Not exported (the format lacks the precision): "
                  + ", ".join(f"{f} {p}" for f, p in plan.unsupported) + ".", ""]

    lines += ["## Latency and memory", ""]
    if "bench" in failed:
        lines += [f"The benchmark failed: {failed['bench']} (log: `logs/bench.log`).", ""]
    if results:
        target = results["target"]
        lines += [f"Batch 1 at the exported sequence length, {results['config']['runs']} timed runs after "
                  f"{results['config']['warmup']} warm-up runs, each bundle in a fresh process on target "
                  f"`{target['url']}` ({target.get('cpu')}, {target.get('cores')} cores), "
                  f"{results['config']['threads']} thread(s). Peak RSS is the measuring process's peak; the import "
                  "baseline is its peak after importing the runtime, before loading the model.", ""]
        rows = [[Path(row["source"]).name, row["runner"], str(row["seq_len"] or "-"), _num(row.get("p50_ms"), 3),
                 _num(row.get("p90_ms"), 3), _num(row.get("peak_rss_mb"), 1), _num(row.get("import_baseline_mb"), 1),
                 f"{row['artifact_bytes'] / 1024:.1f}", row["status"]] for row in results["rows"]]
        lines += [_table(["bundle", "runner", "N", "p50 ms", "p90 ms", "peak RSS MB", "import baseline MB",
                          "size (KB)", "status"], rows), ""]
        if target.get("emulated"):
            lines += ["The target is an emulated board: its outputs are real, its timings are an emulator's.", ""]
        lines += [f"![p50 latency against sequence length]({BENCH}/latency_vs_seq_len.png)", "",
                  f"![fp32 against int8 per format]({BENCH}/fp32_vs_int8.png)", ""]
    elif "bench" not in failed:
        lines += ["Nothing was benchmarked: " + ("no bundle can run on this target." if not plan.benched else
                                                 "no bundle to time was exported."), ""]
    not_benched = {**plan.not_benched, **{name: "its export failed (see Failures)" for name in plan.benched
                                          if f"export-{name}" in failed}}
    for reason in dict.fromkeys(not_benched.values()):
        names = [name for name, why in not_benched.items() if why == reason]
        lines += [f"Not benchmarked: {', '.join(names)}: {reason}.", ""]

    lines += ["## Stages", "",
              "Wall time of the run that wrote each stage's outputs (a stage skipped as up to date keeps its "
              f"earlier time); `{SUMMARY}` holds the last invocation's.", ""]
    rows = []
    for stage, units in _unit_names(plan).items():
        records = [read_record(out, unit) or {} for unit in units]
        seconds = [r.get("seconds") for r in records]
        total = sum(s for s in seconds if s is not None) if units and None not in seconds else None
        rows.append([stage, ", ".join(u.split("-", 1)[-1] if "-" in u else u for u in units) or "not needed",
                     _num(total, 1)])
    lines += [_table(["stage", "units", "wall time (s)"], rows), ""]

    machine = describe()
    lines += ["## Machine", "",
              f"- Host (training, QAT, export, checks): {machine['cpu']} ({machine['machine']}, {machine['cores']} "
              f"cores; {int8_features_text(machine['cpu_features'])}), {machine['os']}, Python {machine['python']}; "
              f"{cfg.threads or machine['cores']} thread(s)."]
    if results:
        target = results["target"]
        lines.append(f"- Benchmark target `{target['url']}`: {target.get('cpu')} ({target.get('machine')}, "
                     f"{target.get('cores')} cores; {int8_features_text(target.get('cpu_features'))}), "
                     f"{target.get('os')}, {results['config']['threads']} thread(s).")
    lines += ["", "## Versions", ""]
    found = {**machine["packages"], **versions(None)}
    lines += [_table(["package", "version"], [[name, found[name]] for name in sorted(found)]), ""]
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _checked_by(manifest: dict) -> str:
    return "reference evaluation" if FORMATS[manifest["format"]].check == "reference" else manifest["parity"]["check"]


def _test_metrics(metrics: Path) -> dict:
    """The test-split line of a run's metrics.jsonl."""
    for line in reversed(metrics.read_text().splitlines()):
        if line.strip():
            record = json.loads(line)
            if record.get("split") == "test":
                return record
    return {}


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _parity(parity: dict) -> str:
    if parity.get("output_step"):
        return f"{parity['max_steps']:.2f} output steps"
    return f"{parity['max_abs_error']:.1e}"


def _delegation(manifest: dict) -> str:
    """The delegation figures of an ExecuTorch or LiteRT bundle, or a Core ML program's stored weight types."""
    delegation = manifest.get("delegation")
    if delegation:
        unit = "subgraph" if manifest["format"] == "executorch" else "partition"
        return (f"{delegation['partitions']} XNNPACK {unit}(s), {delegation['delegated_ops']}/"
                f"{delegation['total_ops']} ops")
    weights = (manifest.get("program") or {}).get("weights")
    if weights:
        return "stored weights: " + ", ".join(f"{dtype} {count}" for dtype, count in sorted(weights.items()))
    return "-"
