"""A training run's files: the resumable state, the metrics lines, and the temporary files of killed writes.

Every file is written whole to a temporary name and renamed (``difftx_edge.io``),
so a killed run never leaves a half-written checkpoint; resuming reloads the
state after the last finished epoch and drops the metrics of any later one.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difftx_edge.io import atomic_write_bytes, partial_writes, state_dict_cpu

# Its warnings are the training run's: they go to the training log.
log = logging.getLogger("difftx_edge.train")


@dataclass
class RunFiles:
    """The files of a run directory (see ``difftx_edge.train``)."""

    root: Path
    model: Path = field(init=False)
    config: Path = field(init=False)
    metrics: Path = field(init=False)
    state: Path = field(init=False)

    def __post_init__(self) -> None:
        self.model, self.config = self.root / "model.safetensors", self.root / "config.json"
        self.metrics, self.state = self.root / "metrics.jsonl", self.root / "state.pt"

    def remove_partial_writes(self) -> None:
        """Delete the temporary files of writes a killed run never renamed into place (``atomic_write_bytes``)."""
        for path in (self.model, self.config, self.state, self.metrics):
            for partial in partial_writes(path):
                partial.unlink(missing_ok=True)


def save_state(files: RunFiles, model, optimizer, scheduler, epoch: int, best: float, averaged=None) -> None:
    """Write ``state.pt``: what resuming after ``epoch`` needs (weights, optimizer, schedule, RNG), atomically."""
    buffer = io.BytesIO()
    state = {"epoch": epoch, "best": best, "model": state_dict_cpu(model), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
    if averaged is not None:
        state["averaged"] = state_dict_cpu(averaged)
    torch.save(state, buffer)
    atomic_write_bytes(files.state, buffer.getvalue())


def load_state(files: RunFiles, model, optimizer, scheduler, averaged=None) -> tuple[int, float]:
    """Restore ``state.pt`` into the objects given; returns the epoch it was saved after and the best score.

    Raises:
        ValueError: the file is corrupt.
    """
    try:
        state = torch.load(files.state, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
    except (RuntimeError, KeyError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise ValueError(f"cannot resume: {files.state} is corrupt ({type(err).__name__}); "
                         "start over with --force") from err
    return state["epoch"], state["best"]


def keep_epochs(metrics: Path, last_epoch: int) -> None:
    """Drop metrics lines of epochs the saved state does not hold (and any earlier test line).

    A torn last line (a kill mid-write, from before the file was written
    atomically) is dropped with a warning: its epoch is redone.

    Raises:
        ValueError: a line before the last one is corrupt.
    """
    if not metrics.exists():
        return
    lines = [line for line in metrics.read_text(errors="replace").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            epoch = record.get("epoch", last_epoch + 1)
        except (json.JSONDecodeError, AttributeError) as err:
            if number < len(lines):
                raise ValueError(f"cannot resume: line {number} of {metrics} is corrupt ({type(err).__name__}): "
                                 "delete that line or start over with --force") from err
            log.warning("dropping the torn last line of %s (a killed write); its epoch is redone", metrics)
            continue
        if isinstance(epoch, int) and epoch <= last_epoch:
            kept.append(line)
    atomic_write_bytes(metrics, "".join(line + "\n" for line in kept).encode())


def append_line(path: Path, record: dict) -> None:
    """Add one JSON line to ``path`` atomically: the file is rewritten whole, so a kill never tears a line."""
    old = path.read_bytes() if path.exists() else b""
    atomic_write_bytes(path, old + (json.dumps(record) + "\n").encode())
