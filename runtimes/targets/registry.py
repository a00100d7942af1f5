"""Where the benchmark harness measures: one target per URL scheme, each in its own module.

A target runs one :class:`Job` (a bundle, or a run directory, at one setting)
and returns its measurement. Every target subclasses :class:`Target`, which
declares all that the harness reads of one. The local, CUDA and SSH targets share
:class:`CommandTarget`: each measurement is a fresh process, either the
``measure`` module (Python runtimes) or the native ExecuTorch runner, started
here or on a board; only how files get there and how a command starts differ.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from difftx_edge.runtimes import native
from difftx_edge.runtimes.measure import accuracy, summarize
from difftx_edge.runtimes.registry import example_tensor


@dataclass
class Job:
    """One row to measure.

    Attributes:
        source: the bundle directory, or the run directory for the torch runtime.
        manifest: the bundle's manifest (None for a run directory).
        runtime: the registered runtime's name.
        runner: "python" (the runtime's Python package) or "native" (ExecuTorch's C++ runner).
        inputs: the input tensors' specs (name, shape, dtype).
        model: the model config (the token inputs' vocabulary size).
        data: an .npz of ``inputs`` (K, *input) and ``targets`` for task accuracy, or None.
        return_outputs: with ``data``, the row also carries the runtime's outputs (for parity across machines).
    """

    source: Path
    manifest: dict | None
    runtime: str
    runner: str
    format: str
    precision: str
    seq_len: int
    batch: int
    threads: int
    warmup: int
    runs: int | None
    seconds: float | None
    device: str = "cpu"
    inputs: list[dict] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    data: Path | None = None
    return_outputs: bool = False
    progress: Callable[[int, int], None] | None = None

    @property
    def bundle(self) -> Path:
        return self.source


class Target:
    """Everything the harness reads of a target; each registered target subclasses it.

    The class attributes are read before a target is made (the bench and
    pipeline configs check them), so a subclass sets them on the class.

    Attributes:
        url: the URL the target was made from, as rows and errors name it.
        timeout: seconds one command or row may take.
        emulated: the board is an emulator, so timings are not the board's (set once ``describe`` has run).
        device: the runtimes' device path that rows ask for: "cpu" or "cuda".
        runtimes: the runtimes whose rows it runs; None: all.
        measures_accuracy: it can run the task's test inputs for ``--accuracy``. A phone's benchmark
            binaries feed their own inputs, so the adb target cannot.
    """

    emulated = False
    device = "cpu"
    runtimes: tuple[str, ...] | None = None
    measures_accuracy = True

    def __init__(self, url: str, timeout: float = 600.0):
        self.url, self.timeout = url, timeout

    def describe(self) -> dict:
        """The machine the rows run on, for the results' ``target``."""
        raise NotImplementedError

    def run(self, job: Job) -> dict:
        """Measures one row; raises ValueError (one line) when it fails."""
        raise NotImplementedError

    def close(self) -> None:
        """Remove what this target put on the device."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


TARGETS: dict[str, type[Target]] = {}


def register_target(scheme: str):
    """Register a target class for URLs ``scheme://...`` (or the bare word); returns the class unchanged."""

    def wrap(cls: type[Target]) -> type[Target]:
        if not issubclass(cls, Target):
            raise TypeError(f"target {cls.__name__} must subclass Target: the harness reads what Target declares")
        TARGETS[scheme] = cls
        return cls

    return wrap


def target_class(url: str) -> type[Target]:
    """The registered class for ``url``, found without making a target (nothing connects)."""
    scheme = url.split("://", 1)[0] if "://" in url else url
    if scheme not in TARGETS:
        raise ValueError(f"unknown target {url!r}: use local, cuda, ssh://user@host[:port] or adb://SERIAL")
    return TARGETS[scheme]


def make_target(url: str, **options) -> Target:
    """The target for ``url`` ("local", "cuda", "ssh://user@host:port", "adb://SERIAL").

    Each target takes the ``options`` its constructor names (``ssh_config``,
    ``benchmark_model``, ``timeout``...) and ignores the rest.
    """
    cls = target_class(url)
    accepted = inspect.signature(cls).parameters
    return cls(url, **{k: v for k, v in options.items() if k in accepted and v is not None})


class CommandTarget(Target):
    """A target that runs each measurement as a command: here (local, cuda) or on a board (ssh).

    Subclasses say how a file reaches the command (``stage``), how the command
    starts (``command``), and how a file comes back (``fetch``).
    """

    # Subclass hooks -------------------------------------------------------------------------------------------
    def stage(self, files: dict[str, Path], outputs: tuple[str, ...] = ()) -> dict[str, str]:
        """Make local files available to commands, and name files they will write.

        Returns each name's path as a command on the target sees it.
        """
        raise NotImplementedError

    def command(self, argv: list[str], env: dict[str, str]) -> list[str]:
        """The local argv that runs ``argv`` with ``env`` on the target."""
        raise NotImplementedError

    def fetch(self, path: str) -> bytes:
        raise NotImplementedError

    def python(self, runtime: str) -> list[str]:
        """The argv prefix that runs the measure module for ``runtime``."""
        raise NotImplementedError

    def native_dir(self) -> str:
        """Where the native ExecuTorch runner is, built for this target's CPU."""
        raise NotImplementedError

    def describe(self) -> dict:
        return json.loads(self.execute([*self.python("describe"), "--describe"], {}, None, "describe"))

    # Shared -----------------------------------------------------------------------------------------------------
    def run(self, job: Job) -> dict:
        if job.runner == "native":
            return self._run_native(job)
        files = {"source": job.source}
        if job.data is not None:
            files["data.npz"] = job.data
        staged = self.stage(files)
        argv = [*self.python(job.runtime), staged["source"], "--runtime", job.runtime, "--device", job.device,
                "--threads", str(job.threads), "--warmup", str(job.warmup), "--batch", str(job.batch),
                "--seq-len", str(job.seq_len)]
        argv += ["--runs", str(job.runs)] if job.runs is not None else ["--seconds", str(job.seconds)]
        if job.data is not None:
            argv += ["--data", staged["data.npz"]] + (["--return-outputs"] if job.return_outputs else [])
        return json.loads(self.execute(argv, thread_env(job.threads), job.progress, f"{job.runtime} row"))

    def _run_native(self, job: Job) -> dict:
        with tempfile.TemporaryDirectory(prefix="difftx-native-") as scratch:
            data = np.load(job.data, allow_pickle=False) if job.data is not None else None
            batches = data["inputs"] if data is not None else [example_tensor(job.inputs[0], job.model)]
            dtype = np.dtype(job.inputs[0]["dtype"])
            inputs = Path(scratch) / "inputs.bin"
            inputs.write_bytes(b"".join(np.ascontiguousarray(b, dtype=dtype).tobytes() for b in batches))
            staged = self.stage({"model.pte": job.source / job.manifest["artifact"], "inputs.bin": inputs},
                                outputs=("outputs.bin",))
            argv = native.command(self.native_dir(), staged["model.pte"], threads=job.threads, warmup=job.warmup,
                                  runs=job.runs, seconds=None if job.runs is not None else job.seconds,
                                  input_file=staged["inputs.bin"],
                                  output_file=staged["outputs.bin"] if data is not None else None, progress=True)
            result = native.read_report(self.execute(argv, {}, job.progress, "native ExecuTorch runner"))
        row = {"load_ms": result["load_ms"], "first_inference_ms": result["first_inference_ms"],
               "latency_ms": summarize(result["times_ms"]), "runs": len(result["times_ms"]),
               "times_ms": result["times_ms"], "peak_rss_mb": result["peak_rss_kb"] / 1024,
               "import_baseline_mb": result["baseline_rss_kb"] / 1024,
               "input_shape": result["inputs"][0]["shape"], "planned_activation_mb": result["planned_bytes"] / 2**20,
               "info": {"runtime": "executorch", "runner": "native", "threads": result["threads"]}}
        if data is not None:
            shape = [len(batches), *result["outputs"][0]["shape"]]
            outputs = np.frombuffer(self.fetch(staged["outputs.bin"]), dtype=np.float32).reshape(shape)
            row["accuracy"] = accuracy(list(outputs), data["targets"])
            if job.return_outputs:
                row["outputs"] = outputs.tolist()
        return row

    def execute(self, argv: list[str], env: dict[str, str], progress, what: str) -> str:
        """Run ``argv`` on the target; returns its stdout, streaming its progress lines to ``progress``.

        Raises:
            ValueError: one line: the command's own last error line, or the timeout.
        """
        with tempfile.TemporaryFile() as stdout:
            proc = subprocess.Popen(self.command(argv, env), stdout=stdout, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, text=True, env={**os.environ, **env})
            timed_out = threading.Event()

            def kill() -> None:
                timed_out.set()
                proc.kill()

            timer = threading.Timer(self.timeout, kill)
            timer.start()
            errors: list[str] = []
            try:
                for line in proc.stderr:
                    if line.startswith('{"progress"'):
                        if progress is not None:
                            update = json.loads(line)
                            progress(update["progress"], update["of"])
                    elif line.strip():
                        errors.append(line.strip())
                proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if timed_out.is_set():
                raise ValueError(f"{what} on {self.url} timed out after {self.timeout:g} s")
            if proc.returncode != 0:
                raise ValueError(self.failure(proc.returncode, errors, what))
            stdout.seek(0)
            return stdout.read().decode()

    def failure(self, returncode: int, errors: list[str], what: str) -> str:
        """The one line that says why a command failed: its own last error line."""
        if not errors:
            return f"{what} on {self.url} failed with exit code {returncode} and no message"
        return errors[-1].split(": error: ", 1)[-1]


def thread_env(threads: int) -> dict[str, str]:
    """Caps every native thread pool at ``threads``: oversubscribed threads on 2 cores slowed runs by 20x."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
