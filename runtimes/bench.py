"""The benchmark harness: ``difftx-edge bench BUNDLE... [--target T]``.

Each row (one bundle, or one run directory at one sequence length) is
measured in a fresh process on the target, so its peak memory is its own:
the ``measure`` module for the Python runtimes, the native runner for .pte
files wherever it builds, the official binaries on a phone. A row that fails
is recorded with its status and error; the others still run.

Outputs in ``--out`` (written by ``difftx_edge.runtimes.results``):
``results.json`` (machine, versions, every row), ``results.csv``,
``results.md`` (the table printed in the terminal), and PNG plots: p50 latency
against sequence length per format, and fp32 against int8 per format.
"""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from difftx_edge.io import require_output_dir
from difftx_edge.runtimes.measure import latency_columns
from difftx_edge.runtimes.registry import MANIFEST, RUNTIMES, Bundle, runner_dtype, runtime_for
from difftx_edge.runtimes.results import FAILED, NOT_RUN_MACOS, OK, write_results
from difftx_edge.runtimes.targets import Job, make_target, target_class

RUNNERS = ("auto", "native", "python")
DEFAULT_RUNS = 50


@dataclass
class BenchConfig:
    """What ``difftx-edge bench`` measures, where, and how long; each field is the flag of the same name."""

    bundles: list[str] = field(default_factory=list)  # bundle directories, or run directories (eager torch)
    target: str = "local"  # local, cuda, ssh://user@host[:port], adb://SERIAL
    threads: int = 1
    runs: int | None = None  # timed runs per row; default 50 unless --seconds is given
    seconds: float | None = None  # time each row for this long instead (at least 3 runs)
    warmup: int = 5
    seq_lens: str | None = None  # comma-separated lengths for run directories; bundles have their exported length
    batch: int = 1  # run directories only: bundles have their exported batch
    runner: str = "auto"  # .pte: native (C++, wherever it builds), python (pybindings), or auto
    accuracy: bool = False  # also measure task accuracy in the runtime on the test split
    plots: bool = True
    out: str = "bench-results"
    timeout: float = 600.0  # seconds per command on the target
    ssh_config: str | None = None  # an ssh_config file for ssh:// targets (keys, known hosts)
    remote_python: str = "python3"  # ssh: the board's Python 3 with numpy and the runtimes (a venv's python)
    benchmark_model: str | None = None  # adb: LiteRT's benchmark_model binary for the phone
    executorch_runner: str | None = None  # adb: ExecuTorch's executor_runner binary for the phone
    gpu: bool = False  # adb: run benchmark_model with its GPU delegate

    def __post_init__(self) -> None:
        if not self.bundles:
            raise ValueError("give at least one bundle (difftx-edge export) or run directory (difftx-edge train)")
        if self.runs is not None and self.seconds is not None:
            raise ValueError("give --runs or --seconds, not both")
        if self.runs is None and self.seconds is None:
            self.runs = DEFAULT_RUNS
        for name in ("threads", "batch") + (("runs",) if self.runs is not None else ()):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be 0 or more, got {self.warmup}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"seconds must be positive, got {self.seconds}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if self.runner not in RUNNERS:
            raise ValueError(f"unknown runner {self.runner!r}: use one of {', '.join(RUNNERS)}")
        # Here, before any target is made: a refusal costs no connection, and needs no adb or board.
        if self.accuracy and not target_class(self.target).measures_accuracy:
            raise ValueError(f"target {self.target} does not measure accuracy: its benchmark binaries feed their own "
                             "inputs, not the task's test split; drop --accuracy, or measure accuracy on this "
                             "machine (--target local) or an ssh:// board")
        self.lengths()

    def lengths(self) -> list[int] | None:
        if self.seq_lens is None:
            return None
        try:
            lengths = [int(part) for part in self.seq_lens.split(",") if part.strip()]
        except ValueError:
            lengths = []
        if not lengths or min(lengths) < 1:
            raise ValueError(f"bad --seq-lens {self.seq_lens!r}: give positive integers separated by commas")
        return lengths


def bench(cfg: BenchConfig, *, progress: bool = True) -> dict:
    """Measure every row on the target and write the results; returns them.

    Raises:
        ValueError: a bad config, target or path (before anything is measured);
            a failing row is recorded in the results instead.
    """
    if cfg.plots:
        from difftx_edge.extras import require_extra

        require_extra("plots", ["matplotlib"], "bench")
    out = require_output_dir(cfg.out)
    for path in cfg.bundles:
        if not Path(path).is_dir():
            raise ValueError(f"{path} is not a directory: give bundle directories (difftx-edge export) or run "
                             "directories (difftx-edge train)")
        if (Path(path) / MANIFEST).is_file():
            Bundle.open(path)  # a hostile or damaged bundle is refused before the target is contacted at all
    target = make_target(cfg.target, ssh_config=cfg.ssh_config, remote_python=cfg.remote_python, timeout=cfg.timeout,
                         benchmark_model=cfg.benchmark_model, executorch_runner=cfg.executorch_runner, gpu=cfg.gpu)
    started = time.time()
    with target, tempfile.TemporaryDirectory(prefix="difftx-bench-data-") as scratch:
        device = target.describe()
        runs = _runs_by_checkpoint(cfg.bundles)
        plans = [plan for path in cfg.bundles
                 for plan in _plan(cfg, Path(path), target, device, Path(scratch), runs)]
        rows = []
        bar = _progress_bar(len(plans)) if progress else None
        for job, failure in plans:
            label = f"{_name(job.source)} N={job.seq_len}" if job.seq_len else _name(job.source)
            if bar is not None:
                bar.set_description(label)
                job.progress = lambda done, of, bar=bar: bar.set_postfix_str(f"{done}/{of}" if of else f"{done} runs")
            rows.append(_measure(job, failure, target, cfg))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    results = {"host": _host(), "target": {"url": cfg.target, **device, "emulated": target.emulated},
               "config": {k: v for k, v in asdict(cfg).items() if k != "bundles"}, "rows": rows,
               "seconds": round(time.time() - started, 1)}
    write_results(results, out, plots=cfg.plots)
    return results


def _plan(cfg: BenchConfig, path: Path, target, device: dict, scratch: Path,
          runs: dict[str, Path]) -> list[tuple[Job, str | None]]:
    """The rows of one path: a bundle gives one, a run directory one per sequence length.

    Each row comes with the reason it cannot run on this target, or None.
    ``runs`` are the run directories given, by their checkpoint's sha256 (for ``--accuracy``).
    """
    common = {"threads": cfg.threads, "warmup": cfg.warmup, "runs": cfg.runs, "seconds": cfg.seconds,
              "device": target.device}
    if (path / MANIFEST).is_file():
        bundle = Bundle.open(path)
        manifest = bundle.manifest
        spec = runtime_for(manifest["format"])
        job = Job(source=path, manifest=manifest, runtime=spec.name, runner=_runner(cfg, spec.name, target, device),
                  format=manifest["format"], precision=manifest["precision"], seq_len=_sequence_length(manifest),
                  batch=int(manifest["inputs"][0]["shape"][0]), inputs=manifest["inputs"],
                  model=manifest.get("model") or {}, **common)
        failure = _unavailable(job, target, device)
        lengths = cfg.lengths()
        if failure is None and lengths is not None and job.seq_len not in lengths:
            failure = (f"this bundle is exported for sequence length {job.seq_len}, not {cfg.seq_lens}: export one "
                       "bundle per length with difftx-edge export --seq-len")
        if failure is None and cfg.accuracy:  # a target that cannot measure it was refused by BenchConfig
            job.data, failure = _accuracy_data(_find_run(manifest, path, runs), job, scratch)
        return [(job, failure)]
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} holds neither a bundle's {MANIFEST} nor a run's config.json: give bundle folders "
                         "(difftx-edge export) or run folders (difftx-edge train)")
    from difftx_edge.io import read_config

    config = read_config(path)  # a run directory: eager torch at each length
    jobs = []
    for seq_len in cfg.lengths() or [config["task"].get("seq_len") or config["model"]["max_len"]]:
        job = Job(source=path, manifest=None, runtime="torch", runner="python", format="torch", precision="fp32",
                  seq_len=seq_len, batch=cfg.batch, model=config["model"], **common)
        failure = _unavailable(job, target, device)
        if failure is None and cfg.accuracy:
            job.data, failure = _accuracy_data((path, None), job, scratch)
        jobs.append((job, failure))
    return jobs


def _runner(cfg: BenchConfig, runtime: str, target, device: dict) -> str:
    """ExecuTorch's runner: native wherever it builds (honest memory), else the Python runtime."""
    if runtime != "executorch":
        return "python"
    if cfg.runner != "auto" or "machine" not in device:  # a phone runs the official binaries it was given
        return "native" if cfg.runner == "auto" else cfg.runner
    from difftx_edge.runtimes.native import problem

    arch = "host" if device["machine"] == platform.machine() else device["machine"]
    return "native" if problem(arch) is None else "python"


def _sequence_length(manifest: dict) -> int:
    """The bundle's sequence length when it takes a sequence; else 0.

    A task names its length; a difftx-edge model (a ``model`` config, as the
    benchmarks' untrained bundles carry without a task) always takes
    ``(batch, N, ...)``. A model from ``convert`` has neither, and its input's
    dimension 1 may be anything: a CNN's channels, a feature vector.
    """
    task, model, shape = manifest.get("task"), manifest.get("model"), manifest["inputs"][0]["shape"]
    if isinstance(task, dict) and task.get("seq_len"):
        return int(task["seq_len"])
    if isinstance(model, dict) and "max_len" in model and len(shape) > 1:
        return int(shape[1])
    return 0


def _name(path: Path) -> str:
    """A row's name: the bundle's folder and its parent's, so that two models' ``onnx-fp32`` rows differ."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _runs_by_checkpoint(paths: list[str]) -> dict[str, Path]:
    """The run directories among ``paths``, by their checkpoint's sha256 (what a bundle's manifest names)."""
    from difftx_edge.hashing import sha256_file  # what export names the checkpoint by

    return {sha256_file(Path(p) / "model.safetensors"): Path(p) for p in paths
            if not (Path(p) / MANIFEST).is_file() and (Path(p) / "model.safetensors").is_file()}


def _find_run(manifest: dict, bundle: Path, runs: dict[str, Path]) -> tuple[Path | None, str | None]:
    """The run a bundle was exported from, for its task's test data: ``(run, None)`` or ``(None, why not)``.

    Manifests name their run by folder name and checkpoint sha256 only (they
    ship inside apps), so the run is one given on the command line with that
    checkpoint, or else the folder of that name beside the bundle's folder
    (``DIR/run`` for ``DIR/bundles/x``, as the pipeline lays them out); an
    older manifest's absolute path is tried too. The checkpoint must match.
    """
    from difftx_edge.hashing import sha256_file

    source = manifest.get("source") or {}
    name, sha = source.get("run"), source.get("sha256")
    if sha in runs:
        return runs[sha], None
    if name:
        for candidate in (Path(name), bundle.parent.parent / Path(name).name):
            weights = candidate / "model.safetensors"
            if weights.is_file() and (candidate / "config.json").is_file() and sha256_file(weights) == sha:
                return candidate, None
    return None, (f"--accuracy needs the run this bundle came from (folder {name!r}, checkpoint sha256 "
                  f"{str(sha)[:12]}...): give its run directory on the command line too")


def _unavailable(job: Job, target, device: dict) -> str | None:
    """Why ``target`` cannot run this row, or None."""
    if job.runtime == "coreml" and not str(device.get("os", "")).startswith("Darwin"):
        return NOT_RUN_MACOS
    if target.runtimes is not None and job.runtime not in target.runtimes:
        return f"target {target.url} runs {' and '.join(target.runtimes)} rows only, not {job.runtime}"
    if job.device not in RUNTIMES[job.runtime].devices:
        return f"runtime {job.runtime} has no {job.device} path"
    return None


def _accuracy_data(found: tuple[Path | None, str | None], job: Job, scratch: Path) -> tuple[Path | None, str | None]:
    """An .npz of the task's test batches at this row's shape, or the reason there is none.

    ``found`` is the run the row's model came from, or why it was not found (:func:`_find_run`).
    """
    from difftx_edge.io import read_config
    from difftx_edge.tasks import TaskConfig, load_task

    run, why_not = found
    if run is None:
        return None, why_not
    config = read_config(run)
    task = load_task(TaskConfig(**config["task"]))
    if task.seq_len != job.seq_len:
        return None, f"--accuracy needs the task's length {task.seq_len}; this row is {job.seq_len} long"
    B = job.batch
    usable = len(task.test.inputs) // B * B
    x = task.test.inputs[:usable].reshape(usable // B, B, *task.test.inputs.shape[1:])
    y = task.test.targets[:usable].reshape(usable // B, B, *task.test.targets.shape[1:])
    dtype = runner_dtype(job.inputs[0]) if job.inputs else np.dtype(
        "int64" if config["model"].get("vocab_size") else "float32")
    path = scratch / f"data-{abs(hash((str(job.source), job.seq_len)))}.npz"
    np.savez(path, inputs=x.numpy().astype(dtype), targets=y.numpy())
    return path, None


def _measure(job: Job, failure: str | None, target, cfg: BenchConfig) -> dict:
    row = {"source": str(job.source), "bundle": _name(job.source), "attention": job.model.get("attention"),
           "format": job.format, "precision": job.precision, "runtime": job.runtime,
           "runner": job.runner, "target": cfg.target, "emulated": target.emulated, "device": job.device,
           "threads": job.threads, "batch": job.batch, "seq_len": job.seq_len or None,
           "input_shape": list(job.inputs[0]["shape"]) if job.inputs else None, "status": FAILED, "error": failure,
           "artifact_bytes": _artifact_bytes(job)}
    if failure == NOT_RUN_MACOS:  # no failure: such a bundle is checked by reference evaluation at export
        row.update(status=NOT_RUN_MACOS, error=None)
        return row
    if failure is not None:
        return row
    try:
        measured = target.run(job)
    except ValueError as err:
        row["error"] = " ".join(str(err).split())
        return row
    latency = measured.pop("latency_ms")
    row.update(status=OK, error=None, **measured, **latency_columns(latency))
    row["runner"] = measured.get("runner") or (measured.get("info") or {}).get("runner") or job.runner
    mean = latency.get("mean") or latency.get("p50")
    row["throughput_per_s"] = job.batch * 1e3 / mean if mean else None
    return row


def _artifact_bytes(job: Job) -> int:
    if job.manifest is not None:
        return int(job.manifest.get("artifact_bytes") or 0)
    return (job.source / "model.safetensors").stat().st_size


def _host() -> dict:
    from difftx_edge.runtimes.measure import describe

    return describe()


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="row", dynamic_ncols=True, leave=False)


def failed_rows(results: dict) -> list[dict]:
    """The rows that failed; a row that cannot run on such a target at all (Core ML off macOS) is no failure."""
    return [row for row in results["rows"] if row["status"] == FAILED]


def summary_line(results: dict) -> str:
    failed = failed_rows(results)
    measured = sum(row["status"] == OK for row in results["rows"])
    not_run = len(results["rows"]) - measured - len(failed)
    return f"{measured} of {len(results['rows'])} rows measured" + (
        f"; {len(failed)} failed (see results.json)" if failed else "") + (
        f"; {not_run} not run (macOS only)" if not_run else "")

