"""Atomic files and checkpoint loading.

Every artifact goes to a temporary file in the target's directory and is then
renamed over the target, so an interrupted run leaves either the old file or
the new one, never half of one. Checkpoints load with safetensors only, never
with an untrusted pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from pathlib import Path

import torch

_PARTIAL = ".tmp"
CONFIG_SCHEMA = 1  # the layout of a run's config.json: train writes it; a run without one is 1
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_PARTIAL)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give artifacts the permissions open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def partial_writes(path: str | os.PathLike) -> list[Path]:
    """The temporary files ``atomic_write_bytes`` left beside ``path`` when a kill stopped it before the rename."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*{_PARTIAL}"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def require_output_dir(out: str | os.PathLike) -> Path:
    """``out`` as a Path, checked before any work starts: a directory we can write, or one we can create.

    Nothing is left behind: the check creates and removes one empty probe
    directory (``os.access`` says yes to root even on a read-only mount).

    Raises:
        ValueError: ``out`` is a file or a broken link, sits under a file, or
            cannot be written or created; the message says which and what to do.
    """
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise ValueError(f"output {out} is a broken symbolic link: remove it or choose another --out")
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"output {out} is a file, not a directory: choose another --out or remove the file")
        _probe_writable(out, f"output directory {out} is not writable")
        return out
    parent = nearest_existing(out)
    if not parent.is_dir():
        raise ValueError(f"output {out} cannot be created: {parent} is a file, not a directory; choose another --out")
    _probe_writable(parent, f"output {out} cannot be created in {parent}")
    return out


def require_input_file(path: str | os.PathLike, what: str, advice: str) -> Path:
    """``path`` as a Path when it is a readable regular file (a link to one counts).

    Args:
        path: the file the user gave.
        what: what it should be, for the message: ``"model"``.
        advice: what to give instead: ``"give a file written by torch.export.save"``.

    Raises:
        ValueError: it is missing, a broken link, a folder or another kind of path; the message says which.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_symlink() and not path.exists():
        kind = "is a broken symbolic link"
    elif path.is_dir():
        kind = "is a folder, not a file"
    elif path.exists():
        kind = "is not a regular file"
    else:
        kind = "does not exist"
    raise ValueError(f"{what} {path} {kind}: {advice}")


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` or its closest ancestor that exists (a link counts, broken or not)."""
    path = Path(os.path.abspath(path))
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def missing_dirs(path: str | os.PathLike) -> list[Path]:
    """The directories ``path`` needs that do not exist yet, deepest first: what a failed command removes."""
    path, missing = Path(os.path.abspath(path)), []
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def make_dirs(path: str | os.PathLike) -> list[Path]:
    """``mkdir -p path``; returns the directories it created, deepest first, for ``remove_empty_dirs``."""
    created = missing_dirs(path)
    Path(path).mkdir(parents=True, exist_ok=True)
    return created


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove each of ``dirs`` (deepest first) that is still empty: a failed command leaves no new folder."""
    for path in dirs:
        try:
            path.rmdir()
        except OSError:  # not empty (another writer's files stay), or already gone
            return


def make_stage_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new hidden directory in ``parent`` with the permissions ``mkdir`` gives, not mkdtemp's 0700.

    Its name holds this process's id, so ``remove_stale_stages`` can tell a
    live run's staging from one a kill left behind.
    """
    stage = Path(tempfile.mkdtemp(dir=parent, prefix=f"{prefix}{os.getpid()}."))
    os.chmod(stage, 0o777 & ~_UMASK)
    return stage


def remove_stale_stages(parent: str | os.PathLike, prefix: str) -> list[Path]:
    """Remove ``parent/PREFIX*`` directories a killed run left; those of a live process stay.

    Returns:
        The directories removed.
    """
    import glob
    import shutil

    removed = []
    for stage in sorted(Path(parent).glob(f"{glob.escape(prefix)}*")):
        if not stage.is_dir() or stage.is_symlink():
            continue
        pid = stage.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(stage, ignore_errors=True)
        removed.append(stage)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _probe_writable(directory: Path, what: str) -> None:
    try:
        Path(tempfile.mkdtemp(dir=directory, prefix=".difftx-edge-probe.")).rmdir()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"{what} ({reason}): choose another --out or fix its permissions") from err


def state_dict_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy of the weights (safetensors refuses shared or strided storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_weights(path: str | os.PathLike, model: torch.nn.Module) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save(state_dict_cpu(model)))


def read_config(run_dir: str | os.PathLike) -> dict:
    """The ``config.json`` of a run directory, checked against the config dataclasses.

    The file may come from anyone, so every section is checked field by field
    (:func:`check_fields`) before any of it is used, and its ``schema``
    version must be one this release reads.

    Raises:
        ValueError: one line: the directory or its config is missing or
            corrupt, written by a newer difftx-edge, or a field is unknown or
            of the wrong type (named, with the type expected).
    """
    from difftx_edge.model import ModelConfig
    from difftx_edge.tasks import TaskConfig
    from difftx_edge.train import TrainConfig

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no config.json (train one with difftx-edge train)")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt ({type(err).__name__}): retrain or restore the run") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} is corrupt (a {type(config).__name__}, not an object): retrain or restore the run")
    schema = config.get("schema", 1)  # runs written before the version existed are version 1
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise ValueError(f"{path}: schema is {_shown(schema)}, expected a positive int: retrain or restore the run")
    if schema > CONFIG_SCHEMA:
        raise ValueError(f"{path} was written by a newer difftx-edge (config schema {schema}; this one reads up to "
                         f"{CONFIG_SCHEMA}): upgrade difftx-edge")
    for section, cls in (("model", ModelConfig), ("task", TaskConfig)):
        if section not in config:
            raise ValueError(f"{path} lacks its {section!r} section: retrain or restore the run")
        check_fields(config[section], cls, f"{path}: {section}")
    if "train" in config:  # runs written before a train field existed lack it: resume fills it in
        check_fields(config["train"], TrainConfig, f"{path}: train", required=False)
    return config


def check_fields(values: object, cls: type, where: str, required: bool = True) -> None:
    """Check a JSON object against the fields and types of the dataclass ``cls``.

    Args:
        values: the object read from a file.
        cls: the dataclass it must fit (``ModelConfig``, ``TaskConfig``, ...).
        where: the file and section, for the message (``"run/config.json: model"``).
        required: whether fields without a default must be present.

    Raises:
        ValueError: one line naming the first unknown key, missing field or
            value of the wrong type, e.g. ``config.json: model.d_model is
            'abc' (str), expected int``.
    """
    if not isinstance(values, dict):
        raise ValueError(f"{where} is {_shown(values)}, expected an object of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"{where}.{key} is not a field of {cls.__name__}: remove it, or upgrade difftx-edge if a "
                             "newer one wrote this file")
        if not _matches(value, hints[key]):
            raise ValueError(f"{where}.{key} is {_shown(value)}, expected {_type_name(hints[key])}")
    if required:
        for name, field in fields.items():
            if name not in values and field.default is dataclasses.MISSING \
                    and field.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where} lacks {name!r} ({_type_name(hints[name])}): retrain or restore the run")


def _matches(value: object, hint: object) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is typing.Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # JSON's true is not a count
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # a person editing the file writes 2 for 2.0
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(hint) or hint)


def _type_name(hint: object) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(typing.get_origin(hint) or hint, "__name__", str(hint))


def _shown(value: object) -> str:
    text = repr(value)
    return f"{text[:40] + '...' if len(text) > 40 else text} ({type(value).__name__})"


def load_run(run_dir: str | os.PathLike, device: torch.device | str = "cpu"):
    """Load the best checkpoint of a run.

    Returns:
        ``(model, config)``: the DiffTransformer in eval mode and the run's config dict.

    Raises:
        ValueError: missing or corrupt config or checkpoint, or weights that
            do not fit the config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from difftx_edge.model import DiffTransformer, ModelConfig

    config = read_config(run_dir)
    try:
        model_config = ModelConfig(**config["model"])
    except ValueError as err:  # types are checked already: this is a value out of range, blamed on the config
        raise ValueError(f"{Path(run_dir) / 'config.json'}: model: {err}") from err
    weights = Path(run_dir) / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{run_dir} has no checkpoint model.safetensors: train it first or check the path")
    try:
        model = DiffTransformer(model_config)
        model.load_state_dict(load_file(weights))
    except SafetensorError as err:
        raise ValueError(f"{weights} is corrupt ({err}): retrain or restore the run") from err
    except (RuntimeError, TypeError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise ValueError(f"{weights} does not match its config.json ({first_line})") from err
    return model.to(device).eval(), config
