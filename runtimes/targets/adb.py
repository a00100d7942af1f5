"""An Android phone over adb, measured with the official native benchmark binaries.

The Python runtimes do not run on a phone, so this target runs what LiteRT and
ExecuTorch ship for it: LiteRT's ``benchmark_model`` for .tflite bundles and
ExecuTorch's ``executor_runner`` for .pte bundles, built or downloaded by the
user and named with ``--benchmark-model`` and ``--executorch-runner``. For each
row it pushes the binary and the artifact into a private directory made with
``mktemp -d`` under /data/local/tmp, runs the binary with ``adb shell``, parses
what it prints, and removes the directory.

Nothing the user typed reaches the phone's shell unquoted: the serial must match
a strict pattern, files travel under fixed names, and every word of a device
command goes through ``shlex.quote``.

What the binaries print is read in ``android_binaries``.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from difftx_edge.runtimes.registry import inside
from difftx_edge.runtimes.targets.android_binaries import (
    benchmark_model_argv,
    benchmark_model_delegate,
    executor_runner_argv,
    last_line,
    parse_benchmark_model,
    parse_executor_runner,
    pte_delegate,
)
from difftx_edge.runtimes.targets.registry import Target, register_target

log = logging.getLogger(__name__)

_SERIAL = re.compile(r"[A-Za-z0-9._:][A-Za-z0-9._:-]*")
_REMOTE_DIR = re.compile(r"/data/local/tmp/difftx\.[A-Za-z0-9]+")
REMOTE_TEMPLATE = "/data/local/tmp/difftx.XXXXXXXXXX"
CLEANUP_TIMEOUT_S = 60.0

# format -> (runner, the CLI flag that names its binary, the artifact's name on the phone)
FORMATS = {
    "litert": ("benchmark_model", "--benchmark-model", "model.tflite"),
    "executorch": ("executor_runner", "--executorch-runner", "model.pte"),
}


def parse_adb_url(url: str) -> str:
    """The serial of ``adb://SERIAL``; raises ValueError (one line) on anything else."""
    serial = url[len("adb://"):] if url.startswith("adb://") else ""
    if not _SERIAL.fullmatch(serial):
        raise ValueError(f"bad adb target {url!r}: use adb://SERIAL with the serial `adb devices` lists "
                         "(letters, digits, . : _ -, not starting with -)")
    return serial


@register_target("adb")
class AdbTarget(Target):
    """Measures LiteRT and ExecuTorch bundles on an Android phone with the runtimes' own native binaries.

    Args:
        url: ``adb://SERIAL``.
        benchmark_model: LiteRT's ``benchmark_model`` built for the phone (runs .tflite bundles).
        executorch_runner: ExecuTorch's ``executor_runner`` built for the phone (runs .pte bundles).
        gpu: run .tflite bundles on LiteRT's GPU delegate. A .pte program chose its backends when it
            was exported, so its delegate is read from the artifact instead.
        timeout: seconds one row may take, pushing included.
    """

    runtimes = ("litert", "executorch")
    # The runtimes' device path for the harness's checks: the phone's delegate is each row's "delegate".
    device = "cpu"
    measures_accuracy = False  # the binaries feed their own inputs, never the task's test split

    def __init__(self, url: str, *, benchmark_model: str | None = None, executorch_runner: str | None = None,
                 gpu: bool = False, timeout: float = 600.0):
        super().__init__(url, timeout)
        self.serial = parse_adb_url(url)
        self.binaries = {"litert": _binary(benchmark_model, "--benchmark-model"),
                         "executorch": _binary(executorch_runner, "--executorch-runner")}
        self.gpu = gpu

    def describe(self) -> dict:
        """The phone: its model, then its SoC platform and CPU ABI, as getprop reports them."""
        adb = _adb_path()
        props = ("ro.product.model", "ro.board.platform", "ro.product.cpu.abi")
        out = self._adb(adb, ["shell", "; ".join(device_command(["getprop", p]) for p in props)],
                        time.monotonic() + self.timeout, "reading the phone's properties")
        values = [line.strip() for line in out.splitlines()]
        if len(values) < len(props):
            raise ValueError(f"getprop on {self.url} printed {len(values)} of {len(props)} lines: {out.strip()!r}")
        model, platform, abi = values[:3]
        return {"target": self.url, "kind": "adb", "device": f"{model} ({platform}, {abi})"}

    def run(self, job) -> dict:
        """Measures one row: pushes the binary and the artifact, runs the binary, parses its output.

        Raises:
            ValueError: one line: a bundle this target cannot run, a missing binary or adb, adb's own
                error, the binary's last line when it fails, or the timeout.
        """
        fmt = job.manifest.get("format")
        if fmt not in FORMATS:
            raise ValueError(f"{job.bundle} is a {fmt} bundle: the adb target runs litert and executorch bundles; "
                             "measure the others on a local or ssh target")
        runner, flag, remote_name = FORMATS[fmt]
        binary = self.binaries[fmt]
        if binary is None:
            raise ValueError(f"{job.bundle} is a {fmt} bundle: pass {flag} PATH, the {runner} binary built for "
                             "Android (see the README)")
        artifact = inside(job.bundle, job.manifest.get("artifact"), "artifact")  # never a file outside the bundle
        if not artifact.is_file():
            raise ValueError(f"{artifact} is missing: the bundle's manifest names it; export the bundle again")
        if fmt == "executorch" and job.runs is None:
            raise ValueError("executor_runner runs a fixed number of times: pass --runs instead of --seconds")

        adb = _adb_path()
        deadline = time.monotonic() + self.timeout
        remote = self._make_dir(adb, deadline)
        binary_on_phone, model_on_phone = f"{remote}/{runner}", f"{remote}/{remote_name}"
        total = job.runs or 1
        try:
            self._adb(adb, ["push", str(binary), binary_on_phone], deadline, f"pushing {binary.name}")
            self._adb(adb, ["push", str(artifact), model_on_phone], deadline, f"pushing {artifact.name}")
            self._adb(adb, ["shell", device_command(["chmod", "+x", binary_on_phone])], deadline, "chmod")
            if fmt == "litert":
                argv = benchmark_model_argv(binary_on_phone, model_on_phone, threads=job.threads,
                                            warmup=job.warmup, runs=job.runs, seconds=job.seconds,
                                            max_secs=self.timeout, gpu=self.gpu)
            else:
                argv = executor_runner_argv(binary_on_phone, model_on_phone, threads=job.threads,
                                            executions=job.warmup + job.runs)
            if job.progress is not None:
                job.progress(0, total)
            # Both binaries log to stderr, which adb's shell protocol returns apart from stdout: 2>&1 keeps
            # the log and the printed results in one stream, in the order the binary wrote them.
            text = self._adb(adb, ["shell", device_command(argv) + " 2>&1"], deadline, runner)
        finally:
            self._remove_dir(adb, remote)

        if fmt == "litert":
            row = parse_benchmark_model(text)
            row["delegate"] = benchmark_model_delegate(text, gpu=self.gpu)
        else:
            row = parse_executor_runner(text, warmup=job.warmup)
            row["delegate"] = pte_delegate(artifact)
        if job.progress is not None:
            job.progress(total, total)
        return row

    def close(self) -> None:
        """Nothing to do: each row removes its own directory on the phone."""

    # adb ----------------------------------------------------------------------------------------------------------
    def _adb(self, adb: str, args: list[str], deadline: float, what: str) -> str:
        """Runs ``adb -s SERIAL *args`` within the row's deadline; returns its stdout."""
        timed_out = f"{what} on {self.url} timed out after {self.timeout:g} s: raise --timeout or lower --runs"
        left = deadline - time.monotonic()
        if left <= 0:
            raise ValueError(timed_out)
        try:
            done = subprocess.run([adb, "-s", self.serial, *args], capture_output=True, text=True,
                                  errors="replace", stdin=subprocess.DEVNULL, timeout=left)
        except subprocess.TimeoutExpired:
            raise ValueError(timed_out) from None
        # Without adb's shell protocol (old phones) line ends arrive as \r\n.
        stdout = done.stdout.replace("\r\n", "\n")
        if done.returncode != 0:
            raise ValueError(f"{what} on {self.url} failed: {_reason(done.stderr, stdout)}")
        return stdout

    def _make_dir(self, adb: str, deadline: float) -> str:
        made = self._adb(adb, ["shell", device_command(["mktemp", "-d", REMOTE_TEMPLATE])], deadline,
                         "making a temporary directory").strip()
        if not _REMOTE_DIR.fullmatch(made):
            raise ValueError(f"mktemp on {self.url} made an unexpected directory {made!r}")
        return made

    def _remove_dir(self, adb: str, remote: str) -> None:
        """Removes the row's directory; a failure is logged, since raising here would hide the row's own error."""
        argv = [adb, "-s", self.serial, "shell", device_command(["rm", "-rf", remote])]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL,
                                  timeout=CLEANUP_TIMEOUT_S)
            reason = _reason(done.stderr, done.stdout) if done.returncode != 0 else None
        except (subprocess.TimeoutExpired, OSError) as err:
            reason = str(err)
        if reason is not None:
            log.warning("could not remove %s on %s (%s): remove it with adb -s %s shell rm -rf %s",
                        remote, self.url, reason, self.serial, remote)


# Device commands ----------------------------------------------------------------------------------------------------
def device_command(argv: list[str]) -> str:
    """``argv`` as one command line for the phone's shell, every word quoted."""
    return " ".join(shlex.quote(word) for word in argv)


# Helpers ------------------------------------------------------------------------------------------------------------
def _adb_path() -> str:
    adb = shutil.which("adb")
    if adb is None:
        raise ValueError("adb is not on PATH: install Android platform-tools "
                         "(https://developer.android.com/tools/releases/platform-tools) and put adb on PATH")
    return adb


def _binary(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path} is not a file: give the binary built for Android (see the README)")
    return Path(path)


def _reason(stderr: str, stdout: str) -> str:
    """Why a command failed, in one line: adb's own first error line, else the command's last line."""
    errors = [line.strip() for line in stderr.splitlines() if line.strip()]
    return errors[0] if errors else last_line(stdout) or "no message"


