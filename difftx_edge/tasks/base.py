"""Task configuration, data containers and the task registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Kept here rather than in listops.py so TaskConfig can validate the setting
# without importing the task modules (they import this module).
LISTOPS_SETTINGS = ("cpu", "lra")

# numpy and scikit-learn seeds must fit in an unsigned 32-bit integer.
_MAX_SEED = 2**32


@dataclass
class TaskConfig:
    """Which task to load and how.

    Attributes:
        name: Task name, one of ``TASKS``.
        seed: Fixes the splits and any generated data.
        data: Path to the user data: a ``.npz`` file for ``"npz"``, a text
            file or folder for ``"text"``. Other tasks take no data.
        seq_len: Sequence length; None uses the task default (digits: 16,
            listops: the setting's longest sequence, text: 128).
        listops_setting: ``"cpu"`` (short sequences) or ``"lra"`` (the Long
            Range Arena lengths).
        n_train: Training examples for generated tasks (listops, text
            windows); None uses the task default.
        n_val: Validation examples for generated tasks.
        n_test: Test examples for generated tasks.

    Raises:
        ValueError: If a field has an invalid value.
    """

    name: str = "digits"
    seed: int = 0
    data: str | None = None
    seq_len: int | None = None
    listops_setting: str = "cpu"
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; choose one of: {', '.join(sorted(TASKS))}")
        if not _is_int(self.seed) or not 0 <= self.seed < _MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.listops_setting not in LISTOPS_SETTINGS:
            raise ValueError(
                f"unknown listops_setting {self.listops_setting!r}; choose one of: {', '.join(LISTOPS_SETTINGS)}"
            )
        for field in ("seq_len", "n_train", "n_val", "n_test"):
            value = getattr(self, field)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ValueError(f"{field} must be a positive integer or unset, got {value!r}")
        if self.name == "npz" and not self.data:
            raise ValueError("task 'npz' needs data=PATH to a .npz file with 'labels' and 'tokens' or 'features'")


@dataclass
class Split:
    """One split of a task.

    Attributes:
        inputs: int64 ``(N, L)`` token ids, or float32 ``(N, L, F)`` features.
        targets: int64 ``(N,)`` class labels for ``"classify"``, or int64
            ``(N, L)`` next-token ids for ``"lm"``.
    """

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]


@dataclass
class TaskData:
    """A loaded task: three splits plus what a model needs to know about them.

    Attributes:
        name: Task name.
        objective: ``"classify"`` (one label per sequence) or ``"lm"``
            (next-token prediction at every position).
        train: Training split.
        val: Validation split.
        test: Test split.
        seq_len: Sequence length L of every split.
        vocab_size: Embedding size when inputs are token ids, else None.
        input_dim: Feature size F when inputs are float features, else None.
        n_outputs: Number of classes, or the vocabulary size for ``"lm"``.
        label_names: Class names (empty for ``"lm"``).
        vocab: Readable name of each token id, or None for features.
        metric: ``"accuracy"`` or ``"bits_per_byte"``.
        augment: None, or ``augment(inputs, generator) -> inputs``: a random
            change of a batch of training inputs that keeps every label
            (digits: shifts of the image by at most one pixel). Training
            applies it when ``TrainConfig.augment`` is on; it never touches
            the validation or test split.
        preprocessing: How an app turns its raw input into the model's
            input, in words precise enough to code from; every bundle's
            manifest carries it (``preprocessing``).
    """

    name: str
    objective: str
    train: Split
    val: Split
    test: Split
    seq_len: int
    vocab_size: int | None
    input_dim: int | None
    n_outputs: int
    label_names: list[str]
    vocab: list[str] | None
    metric: str
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    preprocessing: str = ""

    def to_dict(self) -> dict:
        """Returns the JSON-serialisable metadata (no tensors)."""
        return {
            "name": self.name,
            "objective": self.objective,
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "input_dim": self.input_dim,
            "n_outputs": self.n_outputs,
            "label_names": list(self.label_names),
            "vocab": None if self.vocab is None else list(self.vocab),
            "metric": self.metric,
            "preprocessing": self.preprocessing,
            "split_sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
        }


TASKS: dict[str, Callable[[TaskConfig], TaskData]] = {}


def register_task(name: str) -> Callable[[Callable[[TaskConfig], TaskData]], Callable[[TaskConfig], TaskData]]:
    """Decorator that registers a task loader under ``name``.

    Args:
        name: Task name used in ``TaskConfig.name``.

    Returns:
        A decorator that registers the loader and returns it unchanged.

    Raises:
        ValueError: If ``name`` is already registered.
    """

    def decorate(loader: Callable[[TaskConfig], TaskData]) -> Callable[[TaskConfig], TaskData]:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered; pick another name")
        TASKS[name] = loader
        return loader

    return decorate


def load_task(cfg: TaskConfig) -> TaskData:
    """Loads the task that ``cfg`` names.

    Args:
        cfg: Task configuration.

    Returns:
        The loaded task.

    Raises:
        ValueError: If the configuration or the task's data is invalid.
    """
    loader = TASKS.get(cfg.name)
    if loader is None:  # cfg may have been edited after validation
        raise ValueError(f"unknown task {cfg.name!r}; choose one of: {', '.join(sorted(TASKS))}")
    return loader(cfg)


def reject_unused(cfg: TaskConfig, *fields: str) -> None:
    """Raises if any of ``fields`` is set, so ignored options never pass silently.

    Args:
        cfg: Task configuration.
        *fields: Names of ``TaskConfig`` fields the task does not use.

    Raises:
        ValueError: Naming the first field that is set.
    """
    for field in fields:
        if getattr(cfg, field) is not None:
            raise ValueError(f"task {cfg.name!r} does not use {field}; leave it unset")


def _is_int(value: object) -> bool:
    # bool is an int subclass but never a meaningful seed or size.
    return isinstance(value, int) and not isinstance(value, bool)
