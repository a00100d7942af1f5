"""The benchmark binaries a phone runs, LiteRT's ``benchmark_model`` and ExecuTorch's ``executor_runner``:
their command lines, and rows read from what they print. Pure functions: no adb, no phone.

The output formats parsed here, with the public samples they are tested on in
tests/data/adb/:

- LiteRT (and TFLite) ``benchmark_model``, tflite/tools/benchmark/benchmark_model.cc:
  a ``count=... first=... curr=... min=... max=... avg=... std=...`` line per
  phase (warm-up, then measured; current builds append ``p5=... median=...
  p95=...``), then ``Inference timings in us: Init: ..., First inference: ...,
  Warmup (avg): ..., Inference (avg): ...`` and, with
  ``--report_peak_memory_footprint=true``, ``Overall peak memory footprint (MB)
  via periodic monitoring: ...``. Older builds print ``Average inference timings
  in us: Warmup: ..., Init: ..., Inference: ...`` instead.
- LiteRT's CompiledModel ``benchmark_model``, litert/tools/benchmark_litert_model.h:
  a ``BENCHMARK RESULTS`` block in milliseconds.
- ExecuTorch's ``executor_runner``, examples/portable/executor_runner/executor_runner.cpp:
  ``Model executed successfully N time(s) in X ms.``, and in current builds
  ``Model loaded in X ms.`` and one ``Iteration i of N: X ms`` line per execution.
"""

from __future__ import annotations

import re
from pathlib import Path

from difftx_edge.runtimes.measure import summarize

RAW_LINES = 40

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"

# benchmark_model -------------------------------------------------------------------------------------------------
_TIMINGS = re.compile(rf"Inference timings in us: Init: ({_NUM}), First inference: ({_NUM}), "
                      rf"Warmup \(avg\): [^,]+, Inference \(avg\): ({_NUM})")
_OLD_TIMINGS = re.compile(rf"Average inference timings in us: Warmup: [^,]+, Init: ({_NUM}), "
                          rf"(?:Inference|no stats): ({_NUM})")
_PEAK = re.compile(rf"Overall peak memory footprint \(MB\) via periodic monitoring: ({_NUM})")
# The CompiledModel tool's results block, in ms (BenchmarkLoggingListener in benchmark_litert_model.h).
_LITERT_INIT = re.compile(rf"^Model initialization:\s+({_NUM}) ms", re.M)
_LITERT_FIRST = re.compile(rf"^Warmup \(first\):\s+({_NUM}) ms", re.M)
_LITERT_MEAN = re.compile(rf"^Inference \(avg\):\s+({_NUM}) ms \((\d+) runs\)", re.M)
_LITERT_MIN = re.compile(rf"^Inference \(min\):\s+({_NUM}) ms", re.M)
_LITERT_STD = re.compile(rf"^Inference \(std\):\s+({_NUM})", re.M)
_LITERT_PEAK = re.compile(rf"^Peak memory:\s+({_NUM}) MB", re.M)
# Prefixes a line may carry before the tool's message: logcat's (the benchmark app logs there), the
# severity that TFLITE_LOG and LITERT_LOG print, and LITERT_LOG's [file:line].
_LOG_PREFIXES = (re.compile(r"(?:\d\d-\d\d\s+\d\d:\d\d:\d\d\.\d+\s+\d+\s+\d+\s+)?[VDIWEF]\s+tflite\s*:\s"),
                 re.compile(r"(?:INFO|WARNING|WARN|ERROR|VERBOSE): "),
                 re.compile(r"\[[\w.]+:\d+\] "))
_STAT_KEYS = {"count", "first", "curr", "min", "max", "avg", "std", "p5", "median", "p95"}
_GPU_USED = re.compile(r"Created TensorFlow Lite delegate for GPU|Explicitly applied GPU delegate|\(LITERT_CL\)")
_GPU_REFUSED = re.compile(r"GPU acceleration is unsupported on this platform|Though GPU delegate is explicitly "
                          r"applied, the model graph will not be executed by the delegate")
_NNAPI_USED = re.compile(r"Explicitly applied NNAPI delegate")
_XNNPACK_USED = re.compile(r"XNNPACK delegate|TfLiteXNNPackDelegate")

# executor_runner -------------------------------------------------------------------------------------------------
_EXECUTED = re.compile(rf"Model executed successfully (\d+) time\(s\) in ({_NUM}) ms\.")
_LOADED = re.compile(rf"Model loaded in ({_NUM}) ms\.")
_ITERATION = re.compile(rf"Iteration \d+ of \d+: ({_NUM}) ms")


# Command lines ------------------------------------------------------------------------------------------------------
def benchmark_model_argv(binary: str, graph: str, *, threads: int, warmup: int, runs: int | None,
                         seconds: float | None, max_secs: float, gpu: bool) -> list[str]:
    """benchmark_model's command line: exactly ``warmup`` warm-up runs, then ``runs`` runs and/or ``seconds``.

    The tool keeps running each phase until it has both the runs and the seconds
    asked for (``--warmup_min_secs`` defaults to 0.5 s and ``--min_secs`` to 1 s),
    so both minimums are set explicitly; ``--max_secs`` (150 s by default) would
    end a slow model's runs early, so it is this target's timeout. CPU runs leave
    the delegate to the tool, which applies XNNPACK by default and says so.
    """
    argv = [binary, f"--graph={graph}", f"--num_threads={threads}", f"--warmup_runs={warmup}",
            "--warmup_min_secs=0", f"--num_runs={runs or 1}", f"--min_secs={seconds or 0:g}",
            f"--max_secs={max_secs:g}", "--report_peak_memory_footprint=true"]
    if gpu:
        argv.append("--use_gpu=true")
    return argv


def executor_runner_argv(binary: str, model: str, *, threads: int, executions: int) -> list[str]:
    """executor_runner's command line: ``executions`` runs (warm-up included) on ``threads`` threads."""
    return [binary, f"--model_path={model}", f"--num_executions={executions}", f"--cpu_threads={threads}"]


# Parsers ------------------------------------------------------------------------------------------------------------
def parse_benchmark_model(text: str) -> dict:
    """A row from ``benchmark_model``'s output (LiteRT or TFLite, the Interpreter or the CompiledModel tool).

    Times are in ms. ``latency_ms`` takes min and std from the measured phase's
    ``count=`` line, p50 from its ``median=`` where the build prints one; p90
    and p99 are None, since the tool reports no such percentiles. ``delegate``
    is the one the log names, or None when it names none.

    Raises:
        ValueError: one line, when the text has no timing summary.
    """
    messages = [_message(line) for line in text.splitlines()]
    joined = "\n".join(messages)
    # Each benchmark prints one count= line for its warm-up phase, then one for its measured phase
    # (BenchmarkModel::Run); the op profiler's "Timings (microseconds): count=..." lines are not among them.
    stats = [s for s in map(_stat_line, messages) if s is not None]
    warm, measured = (stats[-2], stats[-1]) if len(stats) >= 2 else (None, None)
    least = median = std = None
    if measured is not None and measured["count"] > 0:
        # "count=N curr=X" is Stat::OutputToStream's form for runs that all took the same time.
        least, std = measured.get("min", measured["curr"]), measured.get("std", 0.0)
        median = measured.get("median", None if "min" in measured else measured["curr"])

    if (init := _last(_LITERT_INIT, joined)) is not None:
        mean, runs = _last(_LITERT_MEAN, joined, groups=2) or (None, None)
        if mean is None:
            raise ValueError("benchmark_model printed a results block without 'Inference (avg): X ms (N runs)'")
        load_ms, first_ms, mean_ms, runs = init, _last(_LITERT_FIRST, joined), mean, int(runs)
        least_ms, std_ms = _last(_LITERT_MIN, joined), _last(_LITERT_STD, joined)
        peak = _last(_LITERT_PEAK, joined)
    elif (timings := _last(_TIMINGS, joined, groups=3)) is not None:
        init_us, first_us, mean_us = timings
        load_ms, first_ms, mean_ms = init_us / 1e3, first_us / 1e3, mean_us / 1e3
        runs = int(measured["count"]) if measured is not None else None
        least_ms, std_ms = _ms(least), _ms(std)
        peak = _last(_PEAK, joined)
    elif (timings := _last(_OLD_TIMINGS, joined, groups=2)) is not None:
        init_us, mean_us = timings
        load_ms, first_ms, mean_ms = init_us / 1e3, None, mean_us / 1e3
        runs = int(measured["count"]) if measured is not None else None
        least_ms, std_ms = _ms(least), _ms(std)
        peak = None
    else:
        raise ValueError("no timing summary in benchmark_model's output ('Inference timings in us: ...' or a "
                         f"'BENCHMARK RESULTS' block); its last line: {last_line(text)!r}")
    if first_ms == 0 and warm is not None and warm["count"] == 0 and measured is not None:
        # With no warm-up runs the tool reports the first of none as 0: the first measured run is the first.
        first_ms = measured.get("first", measured["curr"]) / 1e3
    return {"runner": "benchmark_model", "delegate": _delegate_in_log(joined), "load_ms": load_ms,
            "first_inference_ms": first_ms,
            "latency_ms": {"min": least_ms, "p50": _ms(median), "p90": None, "p99": None, "mean": mean_ms,
                           "std": std_ms},
            "runs": runs, "peak_rss_mb": peak, "import_baseline_mb": None, "raw": _raw(text)}


def parse_executor_runner(text: str, *, warmup: int = 0) -> dict:
    """A row from ``executor_runner``'s log (times in ms), for its last run when the text holds several.

    With per-execution lines (current builds) the first ``warmup`` executions
    are left out of ``latency_ms``, which then has every statistic. Older builds
    print only the total over all executions: for several executions
    ``latency_ms`` then has just the mean, warm-up included, and ``runs`` counts
    every execution.

    Raises:
        ValueError: one line, when the text has no timed success line.
    """
    done = list(_EXECUTED.finditer(text))
    if not done:
        raise ValueError(_no_executor_timing(text))
    run = text[done[-2].end() if len(done) > 1 else 0:done[-1].end()]
    executions, total_ms = int(done[-1][1]), float(done[-1][2])
    loaded = [float(m[1]) for m in _LOADED.finditer(run)]
    times = [float(m[1]) for m in _ITERATION.finditer(run)]
    if not times and executions == 1:
        times = [total_ms]  # one execution: the total is its time
    if times:
        if len(times) <= warmup:
            raise ValueError(f"executor_runner ran {len(times)} time(s), all of them warm-up ({warmup}): "
                             "raise --runs")
        latency, first_ms, runs = summarize(times[warmup:]), times[0], len(times) - warmup
    else:
        latency = {"min": None, "p50": None, "p90": None, "p99": None, "mean": total_ms / executions, "std": None}
        first_ms, runs = None, executions
    return {"runner": "executor_runner", "delegate": None, "load_ms": loaded[-1] if loaded else None,
            "first_inference_ms": first_ms, "latency_ms": latency, "runs": runs, "peak_rss_mb": None,
            "import_baseline_mb": None, "raw": _raw(text)}


def benchmark_model_delegate(text: str, *, gpu: bool) -> str:
    """The delegate a benchmark_model run used: the one its log names, else the one asked for.

    Raises:
        ValueError: one line, when the GPU was asked for and the log says the tool did not use it.
    """
    if gpu:
        refused = _GPU_REFUSED.search(text)
        if refused:
            raise ValueError(f"--gpu: benchmark_model did not use the GPU delegate: {refused[0]}")
        return "gpu"
    return _delegate_in_log(text) or "cpu"


def pte_delegate(path: Path) -> str:
    """The backend a .pte program delegates to: "gpu" (Vulkan), "xnnpack", or "cpu" (portable kernels).

    executor_runner names no backend in its log at the Info level, but a program
    stores each delegate's backend id as a string, so the artifact says it.
    """
    data = Path(path).read_bytes()
    if b"VulkanBackend" in data:
        return "gpu"
    return "xnnpack" if b"XnnpackBackend" in data else "cpu"


# Helpers ------------------------------------------------------------------------------------------------------------
def _message(line: str) -> str:
    """A log line without its logcat, severity and [file:line] prefixes."""
    for prefix in _LOG_PREFIXES:
        match = prefix.match(line)
        if match:
            line = line[match.end():]
    return line.strip()


def _stat_line(message: str) -> dict | None:
    """The numbers of a ``count=...`` statistics line, or None for any other line."""
    words = message.replace("(all same)", "").split()
    pairs = [word.partition("=") for word in words]
    if not pairs or any(sep != "=" or key not in _STAT_KEYS for key, sep, _ in pairs):
        return None
    stats = {key: float(value) for key, _, value in pairs}
    return stats if "count" in stats else None


def _last(pattern: re.Pattern, text: str, groups: int = 1):
    """The last match's first ``groups`` groups as floats (one float when groups is 1), or None."""
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    values = tuple(float(matches[-1][i]) for i in range(1, groups + 1))
    return values[0] if groups == 1 else values


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1e3


def _delegate_in_log(text: str) -> str | None:
    if _GPU_USED.search(text) and not _GPU_REFUSED.search(text):
        return "gpu"
    if _NNAPI_USED.search(text):
        return "nnapi"
    return "xnnpack" if _XNNPACK_USED.search(text) else None


def _no_executor_timing(text: str) -> str:
    if "Model executed successfully." in text:
        return ("executor_runner logged success without a time: it predates the 'N time(s) in X ms' line; "
                "build it from a current ExecuTorch release")
    if "executorch:" not in text:
        return ("no ExecuTorch log lines in executor_runner's output: build it with -DEXECUTORCH_ENABLE_LOGGING=ON "
                "and -DEXECUTORCH_PAL_DEFAULT=posix (the android PAL logs to logcat, not stdout); its last line: "
                f"{last_line(text)!r}")
    return ("no 'Model executed successfully N time(s) in X ms.' line in executor_runner's output; its last line: "
            f"{last_line(text)!r}")


def last_line(text: str) -> str:
    """The last non-blank line of a command's output, cut to 200 characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _raw(text: str) -> str:
    return "\n".join(text.splitlines()[-RAW_LINES:])
