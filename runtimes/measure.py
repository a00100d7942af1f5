"""One measurement in a fresh process: load an artifact in its runtime, time it, read the process's peak memory.

The benchmark harness starts this module once per row, so that each row's
memory is its own: ``python -m difftx_edge.runtimes.measure`` here, and the
zipapp built by :func:`device_runner` on a board over SSH. On a board there
is only Python 3, numpy and the runtime's own package, so this module, like
the runtime registry, imports nothing else at the top: no torch, and no
difftx-edge beyond ``difftx_edge.runtimes`` and the standard-library helpers
``difftx_edge.extras``, ``hashing`` and ``threads``.

It prints progress lines ``{"progress": done, "of": total}`` on stderr while it
times, and the row as one JSON object on stdout. A failure is one line on
stderr, ``measure: error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

EXIT_FAILED = 2
# A board built by benchmarks/arm64_board carries this file: its timings are an emulator's, not a CPU's.
EMULATED_MARKER = Path("/etc/difftx-edge/emulated-board")
PROGRESS_UPDATES = 20  # progress lines per timed loop: enough for a bar, few enough not to perturb the timing
# The host's harness and its results writer: they need torch and the rest of difftx-edge, so the device runner
# leaves them out.
HOST_ONLY = ("bench.py", "results.py")


def summarize(times_ms: list[float]) -> dict:
    """min, p50, p90, p99, mean and std of per-call times (ms)."""
    t = np.asarray(times_ms, dtype=np.float64)
    return {"min": float(t.min()), "p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90)),
            "p99": float(np.percentile(t, 99)), "mean": float(t.mean()), "std": float(t.std())}


def latency_columns(latency: dict) -> dict:
    """A :func:`summarize` summary as results columns: ``min_ms``, ``p50_ms``, ``p90_ms``, ``p99_ms``, ..."""
    return {f"{key}_ms": value for key, value in latency.items()}


def memory_mb() -> tuple[float, float]:
    """(resident now, peak resident) of this process in MB: VmRSS and VmHWM on Linux, ru_maxrss elsewhere."""
    status = Path("/proc/self/status")
    if status.exists():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere
    return peak_mb, peak_mb


def timed_loop(call, *, runs: int | None, seconds: float | None, warmup: int = 0, progress=None) -> list[float]:
    """Per-call wall times (ms) of ``call``, after ``warmup`` untimed calls: exactly ``runs`` calls, or calls until
    ``seconds`` of them have passed (at least 3). ``progress(done, total)``, when given, hears about 20 times.

    Every latency we report, the harness's rows and the benchmark scripts' alike, comes from this loop and
    :func:`summarize`.
    """
    for _ in range(warmup):
        call()
    progress = progress or (lambda done, total: None)
    times: list[float] = []
    every = max(1, (runs or 0) // PROGRESS_UPDATES)
    last_report = time.perf_counter()
    total = 0.0
    while True:
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
        times.append(elapsed * 1e3)
        total += elapsed
        if runs is not None:
            if len(times) % every == 0 or len(times) == runs:
                progress(len(times), runs)
            if len(times) >= runs:
                return times
        else:
            now = time.perf_counter()
            if now - last_report >= seconds / PROGRESS_UPDATES:
                progress(min(int(total * 1e3), int(seconds * 1e3)), int(seconds * 1e3))
                last_report = now
            if total >= seconds and len(times) >= 3:
                progress(int(seconds * 1e3), int(seconds * 1e3))
                return times


def accuracy(outputs: list[np.ndarray], targets) -> float:
    """Top-1 accuracy of per-batch logits against their per-batch targets (per example, or per token)."""
    correct = sum(int((np.asarray(o).argmax(-1) == t).sum()) for o, t in zip(outputs, targets, strict=True))
    return correct / sum(np.size(t) for t in targets)


def measure(args: argparse.Namespace, progress) -> dict:
    from difftx_edge.runtimes import RUNTIMES, Bundle
    from difftx_edge.runtimes.registry import example_tensor

    spec = RUNTIMES[args.runtime]
    spec.require()
    spec.runner.import_runtime()
    _, baseline = memory_mb()  # the peak so far: Python, numpy and the runtime's imports

    started = time.perf_counter()
    if spec.name == "torch":
        runner = spec.load(args.source, args.threads, args.device)
        specs, model = runner.input_specs(args.seq_len, args.batch), runner.config["model"]
    else:
        bundle = Bundle.open(args.source)
        runner = spec.load(bundle, args.threads, args.device)
        specs, model = bundle.manifest["inputs"], bundle.manifest.get("model") or {}
    load_ms = (time.perf_counter() - started) * 1e3

    data = np.load(args.data, allow_pickle=False) if args.data else None
    inputs = [data["inputs"][0]] if data is not None else [example_tensor(s, model) for s in specs]
    started = time.perf_counter()
    runner.run(inputs)
    first_ms = (time.perf_counter() - started) * 1e3
    times = timed_loop(lambda: runner.run(inputs), runs=args.runs, seconds=args.seconds, warmup=args.warmup,
                       progress=progress)
    _, peak = memory_mb()

    row = {"load_ms": load_ms, "first_inference_ms": first_ms, "latency_ms": summarize(times), "runs": len(times),
           "times_ms": times, "peak_rss_mb": peak, "import_baseline_mb": baseline, "info": runner.info(),
           "input_shape": list(inputs[0].shape)}
    if hasattr(runner, "peak_device_memory_mb"):
        row["gpu_peak_mb"] = runner.peak_device_memory_mb()
    if data is not None:
        outputs = [runner.run([x])[0] for x in data["inputs"]]
        row["accuracy"] = accuracy(outputs, data["targets"])
        if args.return_outputs:  # float32 values survive JSON exactly: each becomes the double it is
            row["outputs"] = np.stack(outputs).astype(np.float32).tolist()
    return row


# The CPU features integer kernels pick their code paths by (/proc/cpuinfo flag names). Without an int8 dot
# product (x86 VNNI, Arm dotprod) int8 GEMMs fall back to 16-bit multiply-adds, which decide both their speed
# and, in ONNX Runtime's u8s8 kernels, whether 8-bit weights can saturate an int16 sum.
INT8_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "sve")


def _cpuinfo() -> dict[str, str]:
    """The first value of every key in /proc/cpuinfo, keys lower-cased; empty where there is none."""
    found: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        key, _, value = line.partition(":")
        found.setdefault(key.strip().lower(), value.strip())
    return found


def cpu_features() -> dict:
    """Which of ``INT8_FEATURES`` this CPU has, plus whether it has an int8 dot product at all.

    x86 lists its features under "flags", Arm under "Features". Every results
    file and manifest records this, so that a speed or an int8 number can be
    read against the kernels it ran on.
    """
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("features") or "").split())
    present = [name for name in INT8_FEATURES if name in flags]
    return {"int8": present, "int8_dot_product": bool({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"} & flags)}


def int8_features_text(features: dict | None) -> str:
    """``cpu_features()`` in words, for results tables: "int8 features: avx2, avx512_vnni; with an int8 dot product"."""
    features = features or {}
    named = ", ".join(features.get("int8", [])) or "none"
    return f"int8 features: {named}; {'with' if features.get('int8_dot_product') else 'without'} an int8 dot product"


def describe() -> dict:
    """The machine this runs on and the runtime packages it has, for the results' header."""
    from difftx_edge.extras import versions

    cpu = platform.processor() or platform.machine()
    found = _cpuinfo()
    # x86 names its CPU in "model name"; a Raspberry Pi's kernel gives the board in "Model", others "Hardware".
    for key in ("model name", "model", "hardware"):
        if found.get(key) and not found[key].isdigit():
            cpu = found[key]
            break
    return {"machine": platform.machine(), "cpu": cpu, "cpu_features": cpu_features(), "cores": os.cpu_count(),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "packages": versions(), "emulated": EMULATED_MARKER.exists()}


def device_runner(path: str | os.PathLike) -> Path:
    """Write the zipapp that runs this module on a board: ``python3 runner.pyz ARGS`` (Python 3, numpy, a runtime).

    It holds ``difftx_edge.runtimes`` (the registry, every runner and this
    module) and the standard-library helpers they import (``extras``,
    ``hashing``, ``threads``), in a ``difftx_edge`` package that holds only
    its version: the real ``__init__`` would import torch.
    """
    from difftx_edge import __version__, extras, hashing, runtimes, threads

    package = Path(runtimes.__file__).parent
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("difftx_edge/__init__.py",
                         f'"""The device runner\'s part of difftx-edge."""\n\n__version__ = {__version__!r}\n')
        for helper in (extras, hashing, threads):
            archive.write(helper.__file__, f"difftx_edge/{Path(helper.__file__).name}")
        for module in sorted(package.glob("*.py")):
            if module.name in HOST_ONLY:
                continue
            archive.write(module, f"difftx_edge/runtimes/{module.name}")
        archive.writestr("__main__.py", "import sys\n\nfrom difftx_edge.runtimes.measure import main\n\n"
                                        "sys.exit(main())\n")
    path = Path(path)
    path.write_bytes(buffer.getvalue())
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="measure", description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", help="a bundle directory, or a run directory for the torch runtime")
    p.add_argument("--runtime", help="the registered runtime that runs it")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="torch runs only: the input length")
    p.add_argument("--batch", type=int, default=1, help="torch runs only: the batch size")
    p.add_argument("--data", default=None, help="an .npz of inputs (K, *input) and targets, for accuracy")
    p.add_argument("--return-outputs", action="store_true", help="with --data: add the outputs to the row")
    p.add_argument("--describe", action="store_true", help="print the machine and its runtime packages, and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def progress(done: int, total: int) -> None:
        print(json.dumps({"progress": done, "of": total}), file=sys.stderr, flush=True)

    try:
        if args.describe:
            row = describe()
        else:
            if args.source is None or args.runtime is None:
                raise ValueError("give a bundle (or run directory) and --runtime")
            if (args.runs is None) == (args.seconds is None):
                raise ValueError("give exactly one of --runs and --seconds")
            row = measure(args, progress)
    # A runtime raises what it likes (RuntimeError from pybind, onnxruntime's own errors): whatever it is,
    # the harness records it as this row's one-line error.
    except Exception as err:  # noqa: BLE001
        message = " ".join(str(err).split()) or type(err).__name__
        if not isinstance(err, ValueError):  # ours say what is wrong already; name the kind of anything else
            message = f"{type(err).__name__}: {message}"
        print(f"measure: error: {message}"[:2000], file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
