"""ExecuTorch programs run by ``difftx-et-runner``, a small native process (runner.cpp) with XNNPACK linked in.

A Python process that imports ExecuTorch peaks at about 430 MB before it runs anything; this runner peaks at a few
MB, which is what a device would see, and it runs where torch cannot be installed (the aarch64 torch wheel is a
CUDA build). ``build`` compiles it with g++ against the headers and shared libraries of the executorch wheel, the
installed one for the host and a downloaded one for aarch64 boards, into a directory that can be copied anywhere:
the binary finds its libraries through an ``$ORIGIN`` RPATH.

Only the standard library and numpy are imported here, so this module also runs where torch is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

BINARY = "difftx-et-runner"
SOURCE = Path(__file__).with_name("runner.cpp")
# runner.cpp declares the thread pool API itself (the wheel leaves out its header) as executorch 1.5.1 has it.
EXECUTORCH_VERSION = "1.5.1"
# The kernel and backend libraries register themselves from static initializers and the binary calls none of
# their symbols, so they are linked with --no-as-needed: a linker that drops unused libraries (Debian's default)
# would leave a runner that fails every load with OperatorMissing. The quantized kernels serve the int8
# programs' quantize/dequantize ops that stay outside the XNNPACK delegate.
LIBRARIES = ("executorch_kernels_optimized", "executorch_kernels_quantized", "executorch_backend_xnnpack",
             "executorch_threadpool", "executorch")
# The shipped libraries are compiled with both definitions: without the first the vendored c10 headers look for a
# header generated inside a PyTorch build, and the second changes the layout of classes shared with them.
FLAGS = ("-std=c++17", "-O2", "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED")


@dataclass(frozen=True)
class Arch:
    """A target: its g++, the apt package holding it, its ELF e_machine and the pip platform of its wheel."""

    compiler: str
    apt_package: str
    elf_machine: int | None
    wheel_platform: str | None


# elf_machine None: whatever this machine is. The aarch64 wheel's platform tag is the one PyPI lists for 1.5.1.
ARCHES = {
    "host": Arch("g++", "g++", None, None),
    "aarch64": Arch("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu", 183, "manylinux_2_28_aarch64"),
}
_HOST_ELF_MACHINES = {"x86_64": 62, "aarch64": 183, "arm64": 183}


def cache_root() -> Path:
    """Where built runners and downloaded wheels live: ``${DIFFTX_EDGE_CACHE:-~/.cache/difftx-edge}/native``."""
    return Path(os.environ.get("DIFFTX_EDGE_CACHE", "~/.cache/difftx-edge")).expanduser() / "native"


def _installed_executorch() -> Path | None:
    spec = importlib.util.find_spec("executorch")  # finds the package without importing it (and torch)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _missing_parts(root: Path) -> str | None:
    for part in ("include/executorch", *(f"lib/lib{name}.so" for name in LIBRARIES)):
        if not (root / part).exists():
            return part
    return None


def problem(arch: str = "host") -> str | None:
    """Why the runner for ``arch`` cannot be built here, in one line, or None. Compiles and downloads nothing.

    Args:
        arch: "host" (this machine) or "aarch64" (cross-compiled for a 64-bit ARM Linux board).
    """
    if arch not in ARCHES:
        return f"unknown arch {arch!r} (choose from {', '.join(ARCHES)})"
    if platform.system() != "Linux":
        return f"{BINARY} is built on Linux only (this is {platform.system()})"
    target = ARCHES[arch]
    if shutil.which(target.compiler) is None:
        return f"{target.compiler} is not installed: apt-get install {target.apt_package}"
    if arch != "host":
        return None
    root = _installed_executorch()
    if root is None:
        return "executorch is not installed: pip install 'difftx-edge[executorch]'"
    found = version("executorch").split("+")[0]
    if found != EXECUTORCH_VERSION:
        return f"{BINARY} is written against executorch {EXECUTORCH_VERSION}, found {found}"
    missing = _missing_parts(root)
    if missing:
        return f"the executorch wheel at {root} lacks {missing}"
    return None


def _run_logged(command: list[str], log: Path, what: str) -> None:
    """Runs ``command``; on failure writes its output to ``log`` and raises a one-line ValueError naming it."""
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        log.write_text(shlex.join(command) + "\n\n" + result.stdout)
        raise ValueError(f"{what} failed (exit {result.returncode}); its output is in {log}")


def _atomic_dir(final: Path, fill: Callable[[Path], None], *, force: bool = False) -> Path:
    """Builds a directory with ``fill`` next to ``final`` and renames it into place.

    An interrupted build leaves only a hidden temp directory, never a half-written ``final``; when two processes
    race, the first rename wins and the other's copy is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would follow the directory onto a board as an unreadable runner
    try:
        fill(work)
        if force and final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            os.replace(final, old / final.name)
            shutil.rmtree(old)
        try:
            os.replace(work, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _aarch64_executorch() -> Path:
    """The include/ and lib/ of the aarch64 executorch wheel, downloaded and unpacked once into the cache."""
    root = cache_root() / f"executorch-{EXECUTORCH_VERSION}-aarch64"
    if root.is_dir():
        return root

    def fill(work: Path) -> None:
        download = work / "wheel"
        _run_logged([sys.executable, "-m", "pip", "download", f"executorch=={EXECUTORCH_VERSION}", "--no-deps",
                     "--only-binary=:all:", "--platform", ARCHES["aarch64"].wheel_platform, "--python-version",
                     "3.11", "--implementation", "cp", "-d", str(download)],
                    cache_root() / f"{root.name}.download.log", "downloading the aarch64 executorch wheel")
        wheel = next(download.glob("executorch-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.startswith(("executorch/include/", "executorch/lib/")) and not name.endswith("/"):
                    archive.extract(name, work)
        for part in ("include", "lib"):
            os.replace(work / "executorch" / part, work / part)
        shutil.rmtree(work / "executorch")
        shutil.rmtree(download)
        missing = _missing_parts(work)
        if missing:
            raise ValueError(f"the aarch64 executorch {EXECUTORCH_VERSION} wheel lacks {missing}")

    return _atomic_dir(root, fill)


def elf_machine(path: str | Path) -> int:
    """The ``e_machine`` field of an ELF file's header (62 x86-64, 183 aarch64)."""
    with open(path, "rb") as f:
        header = f.read(20)
    if header[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


def build(arch: str = "host", *, force: bool = False) -> Path:
    """Compiles ``difftx-et-runner`` for ``arch``, once per source, executorch version, compiler and flags.

    Args:
        arch: "host" or "aarch64" (cross-compiled with Debian's aarch64-linux-gnu-g++ against the aarch64 wheel,
            which is downloaded into the cache the first time).
        force: rebuild even when the cache holds this build.

    Returns:
        ``<cache>/<arch>-<hash>/``, holding the binary and the executorch libraries it loads, relocatable as a
        whole: copy the directory to a board and run the binary there.

    Raises:
        ValueError: the runner cannot be built here (see ``problem``), or the compile failed (one line naming the
            log in the cache).
    """
    # Imported here, not at the top: importing difftx_edge imports torch, and the rest of this module runs
    # where torch is absent; building happens on the host, which has it.
    from difftx_edge.hashing import sha256_bytes, sha256_file

    reason = problem(arch)
    if reason:
        raise ValueError(f"cannot build {BINARY} for {arch}: {reason}")
    target = ARCHES[arch]
    compiler_version = subprocess.run([target.compiler, "--version"], capture_output=True, text=True,
                                      check=True).stdout.splitlines()[0]
    parts = [sha256_file(SOURCE), EXECUTORCH_VERSION, arch, compiler_version, *FLAGS, *LIBRARIES]
    key = sha256_bytes("\0".join(parts).encode())[:16]
    final = cache_root() / f"{arch}-{key}"
    if (final / BINARY).is_file() and not force:
        return final
    executorch = _installed_executorch() if arch == "host" else _aarch64_executorch()
    lib = executorch / "lib"
    expected = target.elf_machine or _HOST_ELF_MACHINES.get(platform.machine())

    def fill(work: Path) -> None:
        _run_logged([target.compiler, *FLAGS, f"-I{executorch / 'include'}",
                     f"-I{executorch / 'include/executorch/runtime/core/portable_type/c10'}", str(SOURCE),
                     "-o", str(work / BINARY), f"-L{lib}", "-Wl,--no-as-needed",
                     *(f"-l{name}" for name in LIBRARIES), "-Wl,--as-needed", "-Wl,-rpath,$ORIGIN"],
                    cache_root() / f"{final.name}.log", f"compiling {BINARY} for {arch}")
        for name in LIBRARIES:
            shutil.copy2(lib / f"lib{name}.so", work / f"lib{name}.so")
        machine = elf_machine(work / BINARY)
        if expected is not None and machine != expected:
            raise ValueError(f"{target.compiler} built an ELF for machine {machine}, not {expected} ({arch})")

    return _atomic_dir(final, fill, force=force)


# The client: every caller builds the runner's command line and reads its report here -------------------------------
def command(directory: str | os.PathLike, model: str | os.PathLike, *, threads: int = 1, warmup: int = 0,
            runs: int | None = None, seconds: float | None = None, input_file: str | os.PathLike | None = None,
            output_file: str | os.PathLike | None = None, progress: bool = False,
            prefix: Sequence[str] = ()) -> list[str]:
    """The command line that runs ``model`` with the runner in ``directory``.

    Args:
        directory: the directory ``build`` made, as the machine that runs the command sees it (a path on a
            board for the ssh target); the binary is joined with "/", so a remote POSIX path works from here.
        model: the .pte file, as that machine sees it.
        threads: the XNNPACK thread pool's size.
        warmup: untimed executions before the timed ones.
        runs: timed executions (the runner's default, 20, when neither this nor ``seconds`` is given).
        seconds: time executions until this many seconds of them (at least 3), instead of ``runs``.
        input_file: raw input batches (zeros when absent); ``output_file``: where each batch's outputs go,
            as float32, before timing starts.
        progress: print about 20 progress lines on stderr.
        prefix: words that start the runner, such as an emulator and its flags.

    Raises:
        ValueError: both ``runs`` and ``seconds`` given.
    """
    if runs is not None and seconds is not None:
        raise ValueError("give runs or seconds, not both")
    argv = [*prefix, f"{os.fspath(directory)}/{BINARY}", "--model", os.fspath(model), "--threads", str(threads),
            "--warmup", str(warmup)]
    if runs is not None:
        argv += ["--runs", str(runs)]
    if seconds is not None:
        argv += ["--seconds", str(seconds)]
    if input_file is not None:
        argv += ["--input", os.fspath(input_file)]
    if output_file is not None:
        argv += ["--output", os.fspath(output_file)]
    if progress:
        argv.append("--progress")
    return argv


def read_report(stdout: str | bytes) -> dict:
    """The runner's JSON report: load_ms, first_inference_ms, times_ms, baseline_rss_kb, peak_rss_kb,
    final_rss_kb, planned_bytes, threads, inputs and outputs (dtype and shape), batches and runner."""
    return json.loads(stdout)


def read_stderr(lines: Iterable[str], progress: Callable[[int, int | None], None] | None = None) -> str | None:
    """Follows the runner's stderr to its end: hands each progress line to ``progress`` and returns the error.

    Returns:
        The runner's own error line without its ``difftx-et-runner: error:`` prefix, else the first other
        line (a loader's message), or None when it printed neither.
    """
    error = None
    for line in lines:
        line = line.strip()
        if line.startswith(f"{BINARY}: error: "):
            error = line.removeprefix(f"{BINARY}: error: ")
        elif line.startswith('{"progress"'):
            if progress is not None:
                update = json.loads(line)
                progress(update["progress"], update["of"])
        elif line:
            error = error or line
    return error


def invoke(command: list[str], progress: Callable[[int, int | None], None] | None = None) -> dict:
    """Runs a runner command line from ``command`` on this machine and returns its report.

    Args:
        command: from :func:`command`.
        progress: called with (runs done, runs in all, or None under --seconds) for each progress line.

    Raises:
        ValueError: the runner exited non-zero; the message is its error line.
    """
    # stdout goes to a file: a pipe left unread while stderr is followed would fill and stall a long run.
    with tempfile.TemporaryFile() as stdout:
        process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True, errors="replace")
        error = read_stderr(process.stderr, progress)
        returncode = process.wait()
        stdout.seek(0)
        text = stdout.read().decode()
    if returncode != 0:
        raise ValueError(f"{BINARY}: {error or f'exited with status {returncode}'}")
    return read_report(text)


class NativeRunner:
    """A .pte run by ``difftx-et-runner`` on this machine: the registry's runner interface, plus ``measure``."""

    def __init__(self, path: str | Path, threads: int = 1):
        self.path, self.threads = Path(path), threads
        self.directory = build("host")
        self.binary = self.directory / BINARY
        # One load up front: a bad program fails here, and run() learns the dtypes and shapes it must be given.
        self.meta = self.measure(warmup=0, runs=0)

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Executes the program once on ``inputs``; returns its outputs as float32 arrays."""
        return self.run_batches([inputs])[0]

    def run_batches(self, batches: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Executes the program once per batch, all in one process; returns each batch's float32 outputs.

        Raises:
            ValueError: an input's count, dtype or shape differs from what the program takes.
        """
        specs = self.meta["inputs"]
        if not batches:
            raise ValueError("no batches to run")
        data = []
        for batch in batches:
            if len(batch) != len(specs):
                raise ValueError(f"{self.path.name} takes {len(specs)} inputs, got {len(batch)}")
            for i, (x, spec) in enumerate(zip(batch, specs)):
                x = np.asarray(x)
                if x.dtype != np.dtype(spec["dtype"]).newbyteorder("<") or list(x.shape) != spec["shape"]:
                    raise ValueError(f"input {i} of {self.path.name} must be {spec['dtype']} {spec['shape']}, "
                                     f"got {x.dtype} {list(x.shape)}")
                data.append(np.ascontiguousarray(x).tobytes())
        sizes = [int(np.prod(spec["shape"])) for spec in self.meta["outputs"]]
        with tempfile.TemporaryDirectory(prefix="difftx-et-") as work:
            input_file, output_file = Path(work) / "inputs.bin", Path(work) / "outputs.bin"
            input_file.write_bytes(b"".join(data))
            self.measure(warmup=0, runs=0, input_file=input_file, output_file=output_file)
            flat = np.fromfile(output_file, dtype="<f4").reshape(len(batches), sum(sizes))
        ends = np.cumsum(sizes)
        return [[row[end - size:end].reshape(spec["shape"]) for size, end, spec in
                 zip(sizes, ends, self.meta["outputs"])] for row in flat]

    def info(self) -> dict:
        return {"runtime": "executorch", "runner": "native", "version": version("executorch"),
                "threads": self.threads}

    def measure(self, *, warmup: int, runs: int | None = None, seconds: float | None = None,
                input_file: str | Path | None = None, output_file: str | Path | None = None,
                progress: Callable[[int, int | None], None] | None = None) -> dict:
        """Runs the binary once and returns its JSON report.

        Args:
            warmup: untimed executions before the timed ones.
            runs: timed executions (the runner's default, 20, when neither this nor ``seconds`` is given).
            seconds: time executions until this many seconds of them (at least 3), instead of ``runs``.
            input_file: raw input batches (zeros when absent); ``output_file``: where each batch's outputs go,
                as float32, before timing starts.
            progress: called with (runs done, runs in all, or None under ``seconds``) about 20 times.

        Returns:
            The report: load_ms, first_inference_ms, times_ms, baseline_rss_kb, peak_rss_kb, final_rss_kb,
            threads, inputs, outputs (dtype and shape) and batches.

        Raises:
            ValueError: both ``runs`` and ``seconds`` given, or the runner failed (its error line).
        """
        return invoke(command(self.directory, self.path, threads=self.threads, warmup=warmup, runs=runs,
                              seconds=seconds, input_file=input_file, output_file=output_file,
                              progress=progress is not None), progress)
