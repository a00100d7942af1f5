"""Atomic files and checkpoint loading.

Every artifact goes to a temporary file in the target's directory and is then
renamed over the target, so an interrupted run leaves either the old file or
the new one, never half of one. Checkpoints load with safetensors only, never
with an untrusted pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

_PARTIAL = ".tmp"
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
    """``out`` as a Path; raises ValueError when it exists and is not a directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file: give a directory for --out")
    return out


def state_dict_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy of the weights (safetensors refuses shared or strided storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_weights(path: str | os.PathLike, model: torch.nn.Module) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save(state_dict_cpu(model)))


def read_config(run_dir: str | os.PathLike) -> dict:
    """The ``config.json`` of a run directory.

    Raises:
        ValueError: the directory or its config is missing or corrupt.
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no config.json (train one with difftx-edge train)")
    try:
        config = json.loads(path.read_text())
        config["model"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt ({type(err).__name__}): retrain or restore the run") from err
    return config


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
    weights = Path(run_dir) / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{run_dir} has no checkpoint model.safetensors: train it first or check the path")
    try:
        model = DiffTransformer(ModelConfig(**config["model"]))
        model.load_state_dict(load_file(weights))
    except SafetensorError as err:
        raise ValueError(f"{weights} is corrupt ({err}): retrain or restore the run") from err
    except (RuntimeError, TypeError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise ValueError(f"{weights} does not match its config.json ({first_line})") from err
    return model.to(device).eval(), config
