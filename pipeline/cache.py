"""What lets a re-run skip the work that is done: content digests, unit keys and unit records.

A stage is made of units: one per backend in quantize, one per bundle in
export, one in every other stage. A unit's key holds its settings, the
toolchain versions and the sha256 of every file it reads; its record holds the
key's sha256 and the sha256 of each output. A unit is skipped when its record
names the same key and its outputs still hash to what was recorded. Keys hash
the outputs of earlier units, so redoing one redoes what depends on whatever
changed, and nothing else. A record is deleted before its unit runs and
written, atomically, after the unit's outputs: an interrupted or failed unit
leaves no record and is redone, and an interrupted training run continues from
its last finished epoch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

from difftx_edge.hashing import sha256_bytes, sha256_tree
from difftx_edge.io import atomic_write_json

# Left out of the keys: paths, which the layout of DIR fixes, and settings that change how fast a stage runs
# rather than what it writes (the benchmark's threads, which change its timings, are kept).
UNKEYED = ("out", "run", "quantized", "bundles", "threads", "device")


def digests(root: Path, names: Iterable[str]) -> dict[str, str]:
    """Each of ``names`` (relative to ``root``) -> its sha256 (a folder's covers its file names)."""
    return {name: sha256_tree(root / name) for name in names}


def key_sha256(key: dict) -> str:
    return sha256_bytes(json.dumps(key, sort_keys=True).encode())


def settings(cfg, *, leave_out: tuple[str, ...] = UNKEYED) -> dict:
    """A stage config's fields as they go into a key."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in leave_out}


def _record_path(out: Path, unit: str) -> Path:
    return out / "stages" / f"{unit}.json"


def read_record(out: Path, unit: str) -> dict | None:
    """A unit's record, or None when it has none or an unreadable one."""
    try:
        record = json.loads(_record_path(out, unit).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def forget_record(out: Path, unit: str) -> None:
    """Delete a unit's record: until it is written again, the unit reads as not done."""
    _record_path(out, unit).unlink(missing_ok=True)


def write_record(out: Path, unit: str, stage: str, key: dict, key_hash: str, seconds: float,
                 outputs: Iterable[Path]) -> None:
    """Record a finished unit: its key, its wall time and the digest of each output (paths relative to ``out``)."""
    atomic_write_json(_record_path(out, unit), {
        "unit": unit, "stage": stage, "key_sha256": key_hash, "key": key, "seconds": seconds,
        "outputs": {str(path.relative_to(out)): sha256_tree(path) for path in outputs}})


def up_to_date(out: Path, unit: str, outputs: Iterable[Path], key_hash: str) -> bool:
    """Whether ``unit``'s record names ``key_hash`` and each of its outputs still hashes to what was recorded."""
    record = read_record(out, unit)
    if record is None or record.get("key_sha256") != key_hash:
        return False
    recorded = record.get("outputs")
    if not isinstance(recorded, dict):
        return False
    for path in outputs:
        name = str(path.relative_to(out))
        if not path.exists() or recorded.get(name) != sha256_tree(path):
            return False
    return True
