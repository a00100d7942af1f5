"""This machine: each row in a fresh Python process (or the native runner), on the CPU or on CUDA."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from difftx_edge.runtimes.targets.registry import CommandTarget, register_target

# Python 3.11's -P leaves the working directory off sys.path (3.10 has no such flag; a zipapp needs none).
SAFE_PATH = ("-P",) if sys.version_info >= (3, 11) else ()


@register_target("local")
class LocalTarget(CommandTarget):
    def __init__(self, url: str = "local", timeout: float = 600.0):
        super().__init__(url, timeout)
        self.scratch = Path(tempfile.mkdtemp(prefix="difftx-bench-"))

    def stage(self, files: dict[str, Path], outputs: tuple[str, ...] = ()) -> dict[str, str]:
        return {**{name: str(path) for name, path in files.items()}, **{name: str(self.scratch / name)
                                                                          for name in outputs}}

    def command(self, argv: list[str], env: dict[str, str]) -> list[str]:
        return argv  # env reaches the child through Popen's environment

    def fetch(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def python(self, runtime: str) -> list[str]:
        if runtime == "torch":  # eager torch needs the whole package
            # -P: the installed package, never a difftx_edge/ folder in the working directory. From a clone's
            # root, that folder is the source tree, which lacks runtimes/ (it installs from the top level).
            return [sys.executable, *SAFE_PATH, "-m", "difftx_edge.runtimes.measure"]
        # The device runner, as on a board: importing difftx_edge itself would load torch, and count it as memory.
        runner = self.scratch / "runner.pyz"
        if not runner.exists():
            from difftx_edge.runtimes.measure import device_runner

            device_runner(runner)
        return [sys.executable, str(runner)]

    def native_dir(self) -> str:
        from difftx_edge.runtimes.native import build

        return str(build("host"))

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


@register_target("cuda")
class CudaTarget(LocalTarget):
    """The torch and ONNX Runtime rows on this machine's NVIDIA GPU."""

    device = "cuda"
    runtimes = ("torch", "onnxruntime")
