"""sha256 of files and folders: the one definition every writer and checker of a hash uses.

Manifests (``artifact_sha256``), quantize's configs (``program_sha256``, the
run's checkpoint), the pipeline's records and keys, and the native runner's
build key all hash through here, so a hash
written by one is what the other recomputes. Like ``difftx_edge.extras``, this
module imports nothing beyond the standard library: the device runner's
zipapp carries it (``runtimes.measure.device_runner``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20


def _update(digest, path: Path) -> None:
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)


def sha256_bytes(data: bytes) -> str:
    """The sha256 of ``data``, as hex."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of the file's bytes, as ``sha256sum`` prints it."""
    digest = hashlib.sha256()
    _update(digest, Path(path))
    return digest.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """The sha256 of a file (its bytes, as :func:`sha256_file`), or of a folder such as an .mlpackage.

    A folder hashes each file's path relative to it, its size and its bytes,
    in sorted path order. The names count, so renaming or moving a file inside
    the folder changes the hash; the size ends each file unambiguously, so the
    bytes of one file can never pass for the start of the next.
    """
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\0".encode())
        _update(digest, file)
    return digest.hexdigest()
