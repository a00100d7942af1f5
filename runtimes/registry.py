"""The runtime registry: one runner per runtime, each in its own module.

A runner loads one artifact and executes it on numpy inputs in the real
runtime; its packages are imported when it loads, never at registration. This
module, like every runner module, imports only the standard library and numpy
at the top: it also runs on boards that have neither torch nor difftx-edge
(see ``difftx_edge.runtimes.measure``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difftx_edge.extras import missing_modules, not_installed

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Bundle:
    """An exported artifact and its ``manifest.json``: what every runner loads."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path) -> Bundle:
        """Read the bundle at ``path``; raises ValueError (one line) when it is not one."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ValueError(f"{path} is not a bundle: it has no {MANIFEST} (make one with difftx-edge export)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{manifest_path} is unreadable ({err}): export the bundle again") from err
        for key in ("format", "precision", "artifact", "inputs", "outputs"):
            if key not in manifest:
                raise ValueError(f"{manifest_path} lacks {key!r}: export the bundle again")
        if not (path / manifest["artifact"]).exists():
            raise ValueError(f"{path} lacks its artifact {manifest['artifact']}: export the bundle again")
        return cls(path, manifest)

    @property
    def artifact(self) -> Path:
        return self.path / self.manifest["artifact"]

    @property
    def seq_len(self) -> int | None:
        shape = self.manifest["inputs"][0]["shape"]
        return int(shape[1]) if len(shape) > 1 else None

    def example_inputs(self, seed: int = 0) -> list[np.ndarray]:
        """Inputs of the manifest's shapes and dtypes: token ids below the vocabulary size, or normal features."""
        return [example_tensor(spec, self.manifest.get("model") or {}, seed) for spec in self.manifest["inputs"]]


def runner_dtype(spec: dict) -> np.dtype:
    """The dtype a runner takes for the manifest tensor ``spec``: a quantized one is fed as float32, which the
    runner quantizes with the tensor's own scale and zero point."""
    return np.dtype(np.float32 if "quantization" in spec else spec["dtype"])


def example_tensor(spec: dict, model: dict, seed: int = 0) -> np.ndarray:
    """One input of ``spec`` (name, shape, dtype); integer inputs are token ids below ``model['vocab_size']``."""
    rng = np.random.default_rng(seed)
    shape, dtype = tuple(spec["shape"]), runner_dtype(spec)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, int(model.get("vocab_size") or 2), size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@dataclass(frozen=True)
class RuntimeSpec:
    """A runtime that executes one artifact format.

    Attributes:
        name: the runtime's name.
        format: the artifact format it runs.
        extra: the pip extra that installs it.
        requires: alternatives, each a tuple of importable modules; the first complete one is used.
        runner: the class, ``runner(path, threads, device)`` with ``run(inputs)`` and ``info()``, and a
            static ``import_runtime()`` that imports the runtime's packages (the memory baseline).
        devices: where it runs: "cpu", and "cuda" when the runtime has a CUDA path.
    """

    name: str
    format: str
    extra: str
    requires: tuple[tuple[str, ...], ...]
    runner: type
    devices: tuple[str, ...] = ("cpu",)

    def installed(self) -> bool:
        return any(not missing_modules(group) for group in self.requires)

    def require(self) -> None:
        """Raises ValueError, naming the pip extra, when the runtime is not installed."""
        if not self.installed():
            raise not_installed(f"runtime {self.name}", " or ".join("+".join(group) for group in self.requires),
                                self.extra)

    def load(self, source, threads: int = 1, device: str = "cpu"):
        """A runner for ``source``: a :class:`Bundle`, a bundle directory, or an artifact file."""
        if device not in self.devices:
            raise ValueError(f"runtime {self.name} runs on {', '.join(self.devices)}, not {device}")
        self.require()
        if isinstance(source, Bundle) or (Path(source) / MANIFEST).is_file():
            bundle = source if isinstance(source, Bundle) else Bundle.open(source)
            if bundle.manifest["format"] != self.format:
                raise ValueError(f"{bundle.path} is a {bundle.manifest['format']} bundle; runtime {self.name} "
                                 f"runs {self.format}")
            source = bundle.artifact
        if device == "cpu":
            return self.runner(source, threads)
        return self.runner(source, threads, device=device)


RUNTIMES: dict[str, RuntimeSpec] = {}


def register_runtime(name: str, *, format: str, extra: str, requires: tuple[tuple[str, ...], ...],
                     devices: tuple[str, ...] = ("cpu",)):
    """Register a runner class as runtime ``name``; returns the class unchanged."""

    def wrap(cls: type) -> type:
        RUNTIMES[name] = RuntimeSpec(name, format, extra, tuple(requires), cls, tuple(devices))
        return cls

    return wrap


def runtime_for(fmt: str) -> RuntimeSpec:
    """The runtime that checks artifacts of format ``fmt``."""
    for spec in RUNTIMES.values():
        if spec.format == fmt:
            return spec
    raise ValueError(f"no runtime runs format {fmt!r}")
