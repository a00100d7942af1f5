"""The adb target: its parsers on public outputs of the real binaries, and the checks it makes before adb runs.

Each file in tests/runtimes/targets/data/adb/ is an output copied from a public issue thread or
document, whose address is on its first line. No phone is needed: nothing here
runs adb, and nothing stands in for it.
"""

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from difftx_edge.runtimes.measure import summarize
from difftx_edge.runtimes.targets import make_target
from difftx_edge.runtimes.targets.adb import AdbTarget, device_command, parse_adb_url
from difftx_edge.runtimes.targets.android_binaries import (
    benchmark_model_argv,
    benchmark_model_delegate,
    executor_runner_argv,
    parse_benchmark_model,
    parse_executor_runner,
    pte_delegate,
)

DATA = Path(__file__).parent / "data" / "adb"


def sample(name: str) -> str:
    return (DATA / name).read_text()


def assert_row(row: dict, expected: dict) -> None:
    """Every field but ``raw`` as expected; floats to pytest's default tolerance."""
    flat = {k: v for k, v in row.items() if k not in ("raw", "latency_ms")}
    assert flat == pytest.approx({k: v for k, v in expected.items() if k != "latency_ms"})
    assert row["latency_ms"] == pytest.approx(expected["latency_ms"])


def no_percentiles(mean, least, std):
    return {"min": least, "p50": None, "p90": None, "p99": None, "mean": mean, "std": std}


# benchmark_model --------------------------------------------------------------------------------------------------
BENCHMARK_MODEL = {
    # TF 2.x on CPU, with the memory line's old name ("Peak memory footprint (MB)", a delta, not a peak RSS).
    "benchmark_model_cpu_tf2.txt": dict(
        delegate=None, load_ms=2.725, first_inference_ms=228.120, runs=50, peak_rss_mb=None,
        latency_ms=no_percentiles(mean=211.509, least=210.383, std=0.760)),
    # The GPU delegate on Android.
    "benchmark_model_gpu_android.txt": dict(
        delegate="gpu", load_ms=870.557, first_inference_ms=130.565, runs=50, peak_rss_mb=None,
        latency_ms=no_percentiles(mean=119.375, least=113.737, std=1.948)),
    # The benchmark app read through logcat: every line carries logcat's prefix.
    "benchmark_model_nnapi_logcat.txt": dict(
        delegate="nnapi", load_ms=126.059, first_inference_ms=32.942, runs=75, peak_rss_mb=None,
        latency_ms=no_percentiles(mean=12.1676, least=11.787, std=0.325)),
    # Scientific notation, an all-same warm-up line ("count=1 curr=..."), and the op profiler's own
    # "Timings (microseconds): count=..." lines after the summary, which are not the measured runs.
    "benchmark_model_op_profiling_riscv.txt": dict(
        delegate=None, load_ms=17.187, first_inference_ms=3512.391, runs=50, peak_rss_mb=None,
        latency_ms=no_percentiles(mean=2950.34, least=2727.568, std=109.798)),
    # Only the summary: no count= lines, so no min, std or run count.
    "benchmark_model_summary_only.txt": dict(
        delegate=None, load_ms=58.937, first_inference_ms=28950.882, runs=None, peak_rss_mb=None,
        latency_ms=no_percentiles(mean=30249.6, least=None, std=None)),
    # An older build's "Average inference timings in us" summary, after profiler lines only.
    "benchmark_model_readme_old_summary.txt": dict(
        delegate=None, load_ms=38.467, first_inference_ms=None, runs=None, peak_rss_mb=None,
        latency_ms=no_percentiles(mean=79.7609, least=None, std=None)),
    # LiteRT's CompiledModel tool: a results block in ms, with LITERT_LOG's prefixes.
    "litert_compiled_model_gpu.txt": dict(
        delegate=None, load_ms=23744.73, first_inference_ms=7441.04, runs=10, peak_rss_mb=None,
        latency_ms=no_percentiles(mean=7430.20, least=7416.40, std=9.92)),
}


@pytest.mark.parametrize("name", sorted(BENCHMARK_MODEL))
def test_parse_benchmark_model(name):
    row = parse_benchmark_model(sample(name))
    assert_row(row, {"runner": "benchmark_model", "import_baseline_mb": None, **BENCHMARK_MODEL[name]})
    assert row["raw"].splitlines()[-1] == sample(name).splitlines()[-1]


def test_benchmark_model_percentiles_come_from_the_measured_line():
    """Current builds append " p5= median= p95=" to each count= line: the measured line's median is p50."""
    row = parse_benchmark_model(sample("benchmark_model_percentiles_logcat.txt"))
    assert row["runs"] == 25
    assert row["delegate"] == "xnnpack"
    assert row["latency_ms"] == pytest.approx({"min": 140.071, "p50": 141.253, "p90": None, "p99": None,
                                               "mean": 145.528, "std": 13.583})


def test_benchmark_model_peak_memory():
    """The periodic monitor's line, in the words of BenchmarkLoggingListener::OnBenchmarkEnd
    (tflite/tools/benchmark/benchmark_model.cc), appended to a real CPU output."""
    text = sample("benchmark_model_cpu_tf2.txt") + \
        "Overall peak memory footprint (MB) via periodic monitoring: 41.2344\n"
    assert parse_benchmark_model(text)["peak_rss_mb"] == pytest.approx(41.2344)


def test_benchmark_model_without_warmup_takes_the_first_measured_run():
    """With --warmup_runs=0 the warm-up phase prints "count=0" and the summary's first inference is 0
    (benchmark_model.cc reports warmup_us.first()): the real CPU output, edited to that case."""
    text = (sample("benchmark_model_cpu_tf2.txt")
            .replace("count=3 first=228120 curr=210386 min=210386 max=228120 avg=216727 std=8073", "count=0")
            .replace("First inference: 228120, Warmup (avg): 216727", "First inference: 0, Warmup (avg): nan"))
    assert parse_benchmark_model(text)["first_inference_ms"] == pytest.approx(212.029)


@pytest.mark.parametrize("text", [
    "",
    "STARTING!\nLoaded model /data/local/tmp/x/model.tflite\nERROR: Didn't find op for builtin opcode 'GELU'\n",
    sample("benchmark_model_cpu_tf2.txt").split("Inference timings")[0],
])
def test_benchmark_model_without_timings_is_one_line_error(text):
    with pytest.raises(ValueError, match="no timing summary") as err:
        parse_benchmark_model(text)
    assert "\n" not in str(err.value)


def test_gpu_delegate_is_confirmed_or_refused():
    assert benchmark_model_delegate(sample("benchmark_model_gpu_android.txt"), gpu=True) == "gpu"
    assert benchmark_model_delegate(sample("benchmark_model_percentiles_logcat.txt"), gpu=False) == "xnnpack"
    assert benchmark_model_delegate(sample("benchmark_model_cpu_tf2.txt"), gpu=False) == "cpu"
    # The warning the GPU delegate provider logs when it cannot create the delegate (tflite/tools/delegates).
    refused = sample("benchmark_model_cpu_tf2.txt") + "WARN: GPU acceleration is unsupported on this platform.\n"
    with pytest.raises(ValueError, match="did not use the GPU"):
        benchmark_model_delegate(refused, gpu=True)


# executor_runner ---------------------------------------------------------------------------------------------------
def test_parse_executor_runner_docs_sample():
    """The documented output has only the total line: one execution, so one sample."""
    row = parse_executor_runner(sample("executor_runner_docs.txt"))
    assert_row(row, {
        "runner": "executor_runner", "delegate": None, "load_ms": None, "first_inference_ms": 15.013292,
        "latency_ms": summarize([15.013292]), "runs": 1, "peak_rss_mb": None, "import_baseline_mb": None})


def test_parse_executor_runner_with_threadpool_and_debug_lines():
    row = parse_executor_runner(sample("executor_runner_threadpool.txt"))
    assert row["latency_ms"]["mean"] == pytest.approx(2.904883)
    assert row["runs"] == 1 and row["load_ms"] is None


def test_parse_executor_runner_reads_the_last_run():
    """Two runs in one text (add_mul then mv2): the row is mv2's, with its load time and iteration."""
    row = parse_executor_runner(sample("executor_runner_iterations.txt"))
    assert row["load_ms"] == pytest.approx(29.49)
    assert row["first_inference_ms"] == pytest.approx(49252.00)
    assert row["runs"] == 1
    assert row["latency_ms"] == pytest.approx(summarize([49252.00]))


def test_parse_executor_runner_drops_warmup_iterations():
    """Several executions, printed with executor_runner.cpp's own format strings
    ("Model loaded in %f ms.", "Iteration %u of %u: %f ms", "Model executed successfully %u time(s) in %f ms.")."""
    times = [31.5, 12.25, 10.5, 10.0, 11.0, 10.75]
    lines = ["I 00:00:00.120000 executorch:executor_runner.cpp:740] Model loaded in 84.125000 ms."]
    lines += [f"I 00:00:00.200000 executorch:executor_runner.cpp:901] Iteration {i} of {len(times)}: {t:f} ms"
              for i, t in enumerate(times, 1)]
    lines.append(f"I 00:00:00.300000 executorch:executor_runner.cpp:910] Model executed successfully {len(times)} "
                 f"time(s) in {sum(times):f} ms.")
    row = parse_executor_runner("\n".join(lines), warmup=2)
    assert row["load_ms"] == pytest.approx(84.125)
    assert row["first_inference_ms"] == pytest.approx(31.5)
    assert row["runs"] == 4
    assert row["latency_ms"] == pytest.approx(summarize([10.5, 10.0, 11.0, 10.75]))
    with pytest.raises(ValueError, match="all of them warm-up"):
        parse_executor_runner("\n".join(lines), warmup=6)


def test_executor_runner_total_only_gives_the_mean():
    """Builds without per-execution lines print one total over every execution, warm-up included."""
    text = "I 00:00:00.091459 executorch:executor_runner.cpp:340] Model executed successfully 4 time(s) in 10.0 ms."
    row = parse_executor_runner(text, warmup=1)
    assert row["runs"] == 4 and row["first_inference_ms"] is None
    assert row["latency_ms"] == {"min": None, "p50": None, "p90": None, "p99": None, "mean": 2.5, "std": None}


@pytest.mark.parametrize("name, reason", [
    ("executor_runner_untimed_2023.txt", "without a time"),
    ("xnn_executor_runner_android_no_log.txt", "EXECUTORCH_PAL_DEFAULT=posix"),
])
def test_executor_runner_without_timings_is_one_line_error(name, reason):
    with pytest.raises(ValueError, match=reason) as err:
        parse_executor_runner(sample(name))
    assert "\n" not in str(err.value)


def test_pte_delegate_reads_the_backend_id(tmp_path):
    for content, delegate in [(b"\x00XnnpackBackend\x00", "xnnpack"), (b"\x00VulkanBackend\x00", "gpu"),
                              (b"\x00portable only\x00", "cpu")]:
        (tmp_path / "model.pte").write_bytes(content)
        assert pte_delegate(tmp_path / "model.pte") == delegate


# Device commands ----------------------------------------------------------------------------------------------------
def test_device_commands():
    remote = "/data/local/tmp/difftx.a1B2c3D4e5"
    argv = benchmark_model_argv(f"{remote}/benchmark_model", f"{remote}/model.tflite", threads=4, warmup=3,
                                runs=50, seconds=None, max_secs=600.0, gpu=True)
    assert argv == [f"{remote}/benchmark_model", f"--graph={remote}/model.tflite", "--num_threads=4",
                    "--warmup_runs=3", "--warmup_min_secs=0", "--num_runs=50", "--min_secs=0", "--max_secs=600",
                    "--report_peak_memory_footprint=true", "--use_gpu=true"]
    timed = benchmark_model_argv("b", "g", threads=1, warmup=1, runs=None, seconds=2.5, max_secs=60, gpu=False)
    assert "--num_runs=1" in timed and "--min_secs=2.5" in timed and not any("gpu" in w for w in timed)
    assert executor_runner_argv(f"{remote}/executor_runner", f"{remote}/model.pte", threads=2, executions=13) == [
        f"{remote}/executor_runner", f"--model_path={remote}/model.pte", "--num_executions=13", "--cpu_threads=2"]


def test_device_command_quotes_every_word():
    argv = ["/data/local/tmp/x/bin", "--graph=/a b/$(reboot);rm -rf /", "it's"]
    assert shlex.split(device_command(argv)) == argv


# The target's checks before adb -------------------------------------------------------------------------------------
@pytest.mark.parametrize("url, serial", [("adb://emulator-5554", "emulator-5554"),
                                         ("adb://192.168.1.20:5555", "192.168.1.20:5555"),
                                         ("adb://R58M12ABCDE", "R58M12ABCDE"),
                                         ("adb://adb-2B1_x._adb-tls-connect._tcp", "adb-2B1_x._adb-tls-connect._tcp")])
def test_serials_accepted(url, serial):
    assert parse_adb_url(url) == serial


@pytest.mark.parametrize("url", ["adb://-s evil", "adb://x;rm -rf /", "adb://", "adb://-x", "adb://$(reboot)",
                                 "adb://a b", "adb://x\nreboot", "adb://x`id`", "ssh://host", "R58M12ABCDE"])
def test_injection_refused(url):
    with pytest.raises(ValueError, match="bad adb target") as err:
        AdbTarget(url)
    assert "\n" not in str(err.value)


def make_bundle(root: Path, fmt: str) -> Path:
    artifact = {"litert": "model.tflite", "executorch": "model.pte", "coreml": "model.mlpackage"}[fmt]
    bundle = root / fmt
    bundle.mkdir()
    (bundle / artifact).write_bytes(b"\x00XnnpackBackend\x00")
    manifest = {"format": fmt, "precision": "fp32", "artifact": artifact, "artifact_bytes": 16,
                "inputs": [{"name": "x", "shape": [1, 8], "dtype": "int64"}], "outputs": []}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def make_job(bundle: Path, *, runs: int | None = 20, seconds: float | None = None):
    manifest = json.loads((bundle / "manifest.json").read_text())
    return SimpleNamespace(bundle=bundle, manifest=manifest, threads=1, warmup=2, runs=runs, seconds=seconds,
                           progress=None)


@pytest.fixture
def binary(tmp_path):
    path = tmp_path / "benchmark_model"
    path.write_bytes(b"\x7fELF")
    return path


def test_missing_adb(tmp_path, binary, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    target = AdbTarget("adb://emulator-5554", benchmark_model=str(binary))
    for call in (lambda: target.run(make_job(make_bundle(tmp_path, "litert"))), target.describe):
        with pytest.raises(ValueError, match="install Android platform-tools") as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("fmt, flag", [("litert", "--benchmark-model"), ("executorch", "--executorch-runner")])
def test_missing_binary_flag(tmp_path, fmt, flag):
    with pytest.raises(ValueError, match=flag) as err:
        AdbTarget("adb://emulator-5554").run(make_job(make_bundle(tmp_path, fmt)))
    assert "\n" not in str(err.value)


def test_other_formats_refused(tmp_path, binary):
    with pytest.raises(ValueError, match="runs litert and executorch bundles"):
        AdbTarget("adb://emulator-5554", benchmark_model=str(binary)).run(make_job(make_bundle(tmp_path, "coreml")))


def test_executor_runner_needs_runs(tmp_path, binary):
    target = AdbTarget("adb://emulator-5554", executorch_runner=str(binary))
    with pytest.raises(ValueError, match="pass --runs"):
        target.run(make_job(make_bundle(tmp_path, "executorch"), runs=None, seconds=5.0))


def test_binary_must_exist(tmp_path):
    with pytest.raises(ValueError, match="--executorch-runner .* is not a file"):
        AdbTarget("adb://emulator-5554", executorch_runner=str(tmp_path / "missing"))


def test_make_target_passes_the_options(binary):
    target = make_target("adb://emulator-5554", benchmark_model=str(binary), gpu=True, timeout=30.0,
                         ssh_config="ignored")
    assert isinstance(target, AdbTarget)
    assert (target.serial, target.gpu, target.timeout, target.binaries["litert"]) == (
        "emulator-5554", True, 30.0, binary)


def test_accuracy_is_refused_in_one_line_before_any_device_work(tmp_path, binary, monkeypatch, capfd):
    """The phone's binaries feed their own inputs, so --accuracy is bad input: exit 2 and one line, before the
    target is made (no adb is looked for, no phone is contacted). It once ended in an AttributeError traceback."""
    import difftx_edge.runtimes.bench as harness
    from difftx_edge.cli import main

    monkeypatch.setattr(harness, "make_target", lambda *a, **k: pytest.fail("the target was made first"))
    out = tmp_path / "results"
    code = main(["bench", str(make_bundle(tmp_path, "litert")), "--target", "adb://emulator-5554",
                 "--benchmark-model", str(binary), "--accuracy", "--out", str(out)])
    stderr = capfd.readouterr().err
    assert code == 2, stderr
    assert "Traceback" not in stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("difftx-edge bench: error: target adb://emulator-5554 does not measure accuracy")
    assert "drop --accuracy" in line and "--target local" in line
    assert not out.exists()
