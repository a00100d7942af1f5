"""The runtime registry: one runner per runtime, each in its own module.

A runner loads one artifact and executes it on numpy inputs in the real
runtime; its packages are imported when it loads, never at registration. This
module, like every runner module, imports only the standard library and numpy
at the top (and difftx-edge's standard-library helpers ``extras`` and ``hashing``): it also runs on boards that
have neither torch nor difftx-edge (see ``difftx_edge.runtimes.measure``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from difftx_edge.extras import missing_modules, not_installed
from difftx_edge.hashing import sha256_tree

MANIFEST = "manifest.json"


def inside(folder: str | os.PathLike, relative: object, what: str = "path") -> Path:
    """``folder / relative``, refused unless it stays inside ``folder``.

    A manifest comes from whoever made the bundle, so a path in it is
    confined: no absolute path, no ``..``, and no symbolic link that
    resolves outside the folder.

    Args:
        folder: the directory the path must stay in (a bundle).
        relative: the path as the file gives it.
        what: what the path is, for the error message.

    Returns:
        The path under ``folder``.

    Raises:
        ValueError: one line, when the path is not a plain relative string or leaves ``folder``.
    """
    folder = Path(folder)
    if not isinstance(relative, str) or not relative.strip() or "\x00" in relative:
        raise ValueError(f"{folder}: the {what} is {relative!r} ({type(relative).__name__}), expected a file name "
                         "inside the folder: export the bundle again")
    parts = PurePosixPath(relative).parts
    # A backslash or a drive means a path elsewhere on Windows, where a bundle may be opened too.
    absolute = PurePosixPath(relative).is_absolute() or Path(relative).is_absolute() or bool(Path(relative).drive)
    if not parts or absolute or ".." in parts or "\\" in relative:
        raise ValueError(f"{folder}: the {what} {relative!r} leaves the folder (an absolute path or ..): refusing "
                         "it; a bundle names only files inside itself")
    path = folder / relative
    if not _resolves_inside(path, folder.resolve()):
        raise ValueError(f"{folder}: the {what} {relative!r} is a link out of the folder: refusing it; a bundle "
                         "holds its files itself")
    return path


def _resolves_inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a link loop resolves nowhere
        return False


def links_outside(folder: str | os.PathLike) -> list[Path]:
    """The symbolic links under ``folder`` that resolve outside it (or nowhere)."""
    root = Path(folder).resolve()
    found = []
    for parent, dirs, files in os.walk(folder):  # os.walk does not follow links into other folders
        for name in (*dirs, *files):
            entry = Path(parent) / name
            if entry.is_symlink() and not _resolves_inside(entry, root):
                found.append(entry)
    return found


@dataclass(frozen=True)
class Bundle:
    """An exported artifact and its ``manifest.json``: what every runner loads."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path) -> Bundle:
        """Read the bundle at ``path``, which may come from anyone.

        Its manifest must have the shape export writes, its artifact must lie
        inside the bundle (no absolute path, ``..`` or link out of it) and
        match the manifest's ``artifact_sha256``, so nothing outside the
        bundle, and no truncated or swapped file, is ever run or copied.

        Raises:
            ValueError: one line, naming what is wrong, when it is not a sound bundle.
        """
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ValueError(f"{path} is not a bundle: it has no {MANIFEST} (make one with difftx-edge export)")
        links = links_outside(path)
        if links:
            outside = ", ".join(str(link.relative_to(path)) for link in links)
            raise ValueError(f"{path} holds links to files outside it ({outside}): refusing it; a bundle holds "
                             "its files itself")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{manifest_path} is unreadable ({type(err).__name__}): export the bundle again") from err
        check_manifest(manifest, manifest_path)
        artifact = inside(path, manifest["artifact"], "artifact")
        if not artifact.exists():
            raise ValueError(f"{path} lacks its artifact {manifest['artifact']}: export the bundle again")
        if sha256_tree(artifact) != manifest["artifact_sha256"]:
            raise ValueError(f"{artifact} does not match the manifest's artifact_sha256 (truncated or replaced): "
                             "export the bundle again")
        return cls(path, manifest)

    @property
    def artifact(self) -> Path:
        return inside(self.path, self.manifest["artifact"], "artifact")

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


_MANIFEST_FIELDS = {"format": str, "precision": str, "artifact": str, "artifact_sha256": str, "inputs": list,
                   "outputs": list}
_TENSOR_FIELDS = {"name": str, "shape": list, "dtype": str}


def check_manifest(manifest: object, where: str | os.PathLike = MANIFEST) -> None:
    """Check the fields runners and targets read from a manifest: each present and of its type, ``inputs`` a
    non-empty list of tensors with a name, a shape of non-negative ints and a numpy dtype.

    Raises:
        ValueError: one line naming the first field that is wrong.
    """
    def fail(field: str, value: object, expected: str) -> ValueError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return ValueError(f"{where}: {field} is {shown} ({type(value).__name__}), expected {expected}: "
                          "export the bundle again")

    if not isinstance(manifest, dict):
        raise fail("the manifest", manifest, "an object")
    for key, kind in _MANIFEST_FIELDS.items():
        if key not in manifest:
            raise ValueError(f"{where} lacks {key!r}: export the bundle again")
        if not isinstance(manifest[key], kind):
            raise fail(key, manifest[key], kind.__name__)
    if not manifest["inputs"]:
        raise fail("inputs", manifest["inputs"], "at least one input")
    if not isinstance(manifest.get("model") or {}, dict):
        raise fail("model", manifest["model"], "an object")
    for side in ("inputs", "outputs"):
        for i, tensor in enumerate(manifest[side]):
            if not isinstance(tensor, dict):
                raise fail(f"{side}[{i}]", tensor, "an object with name, shape and dtype")
            for key, kind in _TENSOR_FIELDS.items():
                if not isinstance(tensor.get(key), kind):
                    raise fail(f"{side}[{i}].{key}", tensor.get(key), kind.__name__)
            if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**31 for n in tensor["shape"]):
                raise fail(f"{side}[{i}].shape", tensor["shape"], "a list of non-negative ints")
            if side == "inputs" and not tensor["shape"]:
                raise fail(f"{side}[{i}].shape", tensor["shape"], "a batch dimension at least")
            try:
                np.dtype(tensor["dtype"])
            except TypeError as err:
                raise fail(f"{side}[{i}].dtype", tensor["dtype"], "a numpy dtype name") from err


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
