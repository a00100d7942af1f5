"""What a pipeline builds: its config, the plan drawn from it, and the layout of its folder.

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
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from difftx_edge.convert import FORMATS
from difftx_edge.convert.api import EXPORT_PRECISIONS, parse_formats
from difftx_edge.io import require_output_dir
from difftx_edge.model import ModelConfig
from difftx_edge.quantize import QuantConfig
from difftx_edge.runtimes.bench import DEFAULT_RUNS, BenchConfig
from difftx_edge.tasks import TaskConfig
from difftx_edge.train import TrainConfig

STAGES = ("train", "quantize", "export", "check", "bench", "report")
RUN, BUNDLES, BENCH = "run", "bundles", "bench"
CHECKS, REPORT, SUMMARY = "checks.json", "report.md", "pipeline.json"
RUN_FILES = ("model.safetensors", "config.json")  # what later stages read from the run
BENCH_FILES = ("results.json", "results.csv", "results.md", "latency_vs_seq_len.png", "fp32_vs_int8.png")
# check: the accuracy measured in the runtime may differ from PyTorch's on the same inputs by at most this
# fraction, the same 1 % that parity's 99 % top-1 agreement allows an int8 artifact.
ACCURACY_TOLERANCE = 0.01


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
        # The pipeline exports its own runs: int8 from quantize; int8-dynamic is convert's, for other models.
        unknown = [p for p in self.precision_list() if p not in EXPORT_PRECISIONS]
        if unknown:
            raise ValueError(f"unknown precision {unknown[0]!r}: use a comma-separated list of "
                             f"{', '.join(EXPORT_PRECISIONS)}")
        formats = parse_formats(self.formats)
        for precision in self.precision_list():
            if not any(precision in FORMATS[f].precisions for f in formats):
                raise ValueError(f"no format among {', '.join(formats)} exports {precision}: formats with it are "
                                 + ", ".join(f for f in sorted(FORMATS) if precision in FORMATS[f].precisions))

    def precision_list(self) -> list[str]:
        names = list(dict.fromkeys(p.strip() for p in self.precisions.split(",") if p.strip()))
        if not names:
            raise ValueError("no precision given: use --precisions with one or more of " + ", ".join(EXPORT_PRECISIONS))
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


def unit_names(plan: Plan) -> dict[str, list[str]]:
    """The units of each stage but the report, by name (the names ``stages.BUILDERS`` give them)."""
    return {"train": ["train"], "quantize": [f"quantize-{b}" for b in plan.backends],
            "export": [f"export-{name}" for name in plan.bundle_names], "check": ["check"],
            "bench": ["bench"] if plan.benched else []}


def parse_stages(text: str) -> tuple[str, ...]:
    """``all`` or comma-separated stage names, validated."""
    names = STAGES if text == "all" else tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise ValueError(f"unknown stage {unknown[0] if unknown else text!r} for --force: use all or "
                         f"comma-separated names from {', '.join(STAGES)}")
    return names
