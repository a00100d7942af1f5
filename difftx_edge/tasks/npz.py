"""User classification data from a ``.npz`` file."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from difftx_edge.tasks.base import Split, TaskConfig, TaskData, register_task, reject_unused

MIN_SAMPLES = 10  # so each of the 80/10/10 % splits gets at least one sample
# Ids become table rows (embedding, classifier) and one name each: a stray 1e9 would build a billion of them.
MAX_CLASSES = 100_000
MAX_TOKEN_ID = 2**20 - 1
MAX_ARRAY_BYTES = 8 << 30  # an array that unpacks past this is a zip bomb, not a dataset we train on here
_EVAL_FRACTION = 0.1  # each of val and test
# What np.load and reading a member raise on a damaged or non-npz file.
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def read_arrays(path: Path, fix: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, read without ever unpickling.

    Args:
        path: an existing file, which may be hostile.
        fix: how to write the file right, for the messages: ``"write it with numpy.savez(path, x=...)"``.

    Raises:
        ValueError: one line: not an .npz, unreadable, too large unpacked, or holding object arrays.
    """
    with path.open("rb") as f:
        head = f.read(6)
    # Checked up front: np.load would treat other files as pickles, and its
    # error then suggests unpickling, the opposite of the advice wanted here.
    if head.startswith(b"\x93NUMPY"):
        raise ValueError(f"{path} holds a single .npy array, not an .npz archive; {fix}")
    if not head.startswith(b"PK"):
        raise ValueError(f"{path} is not an .npz (zip) archive; {fix}")
    try:
        with zipfile.ZipFile(path) as archive:
            big = next((m for m in archive.infolist() if m.file_size > MAX_ARRAY_BYTES), None)
    except _READ_ERRORS as err:
        raise ValueError(f"{path} is not a readable .npz of plain arrays ({_one_line(err)}); {fix}") from None
    if big is not None:
        raise ValueError(f"{path} has an array {big.filename} of {big.file_size / 2**30:.1f} GiB unpacked, more "
                         f"than the {MAX_ARRAY_BYTES >> 30} GiB this loader takes; give a smaller dataset")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except _READ_ERRORS as err:
        # Object arrays (e.g. label_names of mixed types) need pickle and land here too.
        raise ValueError(f"{path} is not a readable .npz of plain arrays ({_one_line(err)}); {fix}") from None


def _check_ids(name: str, array: np.ndarray, ndim: int, shape: str, path: Path) -> None:
    if array.ndim != ndim:
        raise ValueError(f"'{name}' in {path} must have shape {shape}, got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"'{name}' in {path} must be an integer array, got {array.dtype}; cast it with .astype(np.int64)"
        )
    if array.size and array.min() < 0:
        raise ValueError(f"'{name}' in {path} has negative values (min {array.min()}); use ids 0, 1, 2, ...")
    limit = MAX_CLASSES - 1 if name == "labels" else MAX_TOKEN_ID
    if array.size and array.max() > limit:
        what = f"labels must be 0..K-1 with K <= {MAX_CLASSES}" if name == "labels" else \
            f"token ids must be at most {MAX_TOKEN_ID} (a vocabulary of {MAX_TOKEN_ID + 1})"
        raise ValueError(f"'{name}' in {path} go up to {array.max()}: {what}; renumber them 0, 1, 2, ...")


def _inputs(arrays: dict[str, np.ndarray], path: Path) -> np.ndarray:
    """Returns validated tokens (int64, N x L) or features (float32, N x L x F)."""
    if ("tokens" in arrays) == ("features" in arrays):
        raise ValueError(f"{path} must hold exactly one of 'tokens' (N x L ints) or 'features' (N x L x F floats)")
    if "tokens" in arrays:
        tokens = arrays["tokens"]
        _check_ids("tokens", tokens, 2, "(N, L)", path)
        if tokens.shape[1] == 0:
            raise ValueError(f"'tokens' in {path} has length 0 sequences; give at least one token per sample")
        return tokens.astype(np.int64)
    features = arrays["features"]
    if features.ndim != 3:
        raise ValueError(f"'features' in {path} must have shape (N, L, F), got {features.shape}")
    if features.shape[1] == 0 or features.shape[2] == 0:
        raise ValueError(f"'features' in {path} has an empty axis {features.shape}; L and F must be at least 1")
    is_real = np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)
    if not is_real:
        raise ValueError(f"'features' in {path} must be a float array, got {features.dtype}")
    features = features.astype(np.float32)
    if not np.isfinite(features).all():
        raise ValueError(f"'features' in {path} has NaN or inf (or values too large for float32); clean them first")
    return features


def _label_names(arrays: dict[str, np.ndarray], labels: np.ndarray, path: Path) -> list[str]:
    if "label_names" not in arrays:
        return [str(c) for c in range(int(labels.max()) + 1)]
    names = arrays["label_names"]
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise ValueError(f"'label_names' in {path} must be a 1-D string array, got {names.dtype} {names.shape}")
    if labels.max() >= len(names):
        raise ValueError(
            f"'labels' in {path} go up to {labels.max()} but 'label_names' has only {len(names)} names; "
            f"add names or fix the labels"
        )
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]


@register_task("npz")
def load_npz(cfg: TaskConfig) -> TaskData:
    """Loads user classification data from ``cfg.data``, a ``.npz`` file.

    The file holds ``labels`` (ints, ``(N,)``), exactly one of ``tokens``
    (ints, ``(N, L)``) or ``features`` (floats, ``(N, L, F)``), and optionally
    ``label_names`` (strings). It is read with ``allow_pickle=False``. The
    samples are split 80/10/10 % at random by ``cfg.seed``.

    Args:
        cfg: Task configuration; ``data``, ``seed`` and ``seq_len`` (which
            must equal L if given) apply.

    Returns:
        The data as tokens (``vocab_size`` = max id + 1) or features.

    Raises:
        ValueError: If the file is missing, unreadable, or its arrays do not
            follow the layout above.
    """
    reject_unused(cfg, "n_train", "n_val", "n_test")
    path = Path(cfg.data)
    if not path.is_file():
        raise ValueError(f"npz data {path} does not exist; pass the path of a .npz file")
    arrays = read_arrays(path, "write it with numpy.savez(path, labels=..., tokens=... or features=...)")
    if "labels" not in arrays:
        raise ValueError(f"{path} has no 'labels' array (found: {', '.join(sorted(arrays)) or 'nothing'})")
    labels = arrays["labels"]
    _check_ids("labels", labels, 1, "(N,)", path)
    inputs = _inputs(arrays, path)
    if len(inputs) != len(labels):
        raise ValueError(f"{path} has {len(labels)} labels but {len(inputs)} input sequences; they must match")
    if len(labels) < MIN_SAMPLES:
        raise ValueError(f"{path} has {len(labels)} samples; give at least {MIN_SAMPLES} so every split gets some")
    label_names = _label_names(arrays, labels, path)
    seq_len = inputs.shape[1]
    if cfg.seq_len is not None and cfg.seq_len != seq_len:
        raise ValueError(f"{path} has sequences of length {seq_len}, not seq_len={cfg.seq_len}; leave seq_len unset")

    order = np.random.default_rng(cfg.seed).permutation(len(labels))
    n_eval = int(len(labels) * _EVAL_FRACTION)
    labels = labels.astype(np.int64)

    def split(rows: np.ndarray) -> Split:
        return Split(torch.from_numpy(inputs[rows]), torch.from_numpy(labels[rows]))

    is_tokens = inputs.dtype == np.int64
    vocab_size = int(inputs.max()) + 1 if is_tokens else None
    return TaskData(
        preprocessing="as the rows of the user's .npz were made (difftx-edge does not know how): give the model "
                      "inputs of the same kind, scale and shape",
        name="npz",
        objective="classify",
        train=split(order[2 * n_eval :]),
        val=split(order[n_eval : 2 * n_eval]),
        test=split(order[:n_eval]),
        seq_len=seq_len,
        vocab_size=vocab_size,
        input_dim=None if is_tokens else inputs.shape[2],
        n_outputs=len(label_names),
        label_names=label_names,
        vocab=[str(t) for t in range(vocab_size)] if vocab_size is not None else None,
        metric="accuracy",
    )
