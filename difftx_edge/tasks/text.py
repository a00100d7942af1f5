"""Byte-level causal language modelling on a text file, a folder, or the Python stdlib."""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from difftx_edge.memory import require_memory
from difftx_edge.tasks.base import Split, TaskConfig, TaskData, register_task

DEFAULT_SEQ_LEN = 128
DEFAULT_SIZES = {"train": 20000, "val": 1000, "test": 1000}
# The stdlib has tens of MB of source; the first 2 MB keep loading well under a second.
DEFAULT_CORPUS_BYTES = 2_000_000
_SPLIT_ENDS = {"train": 0.8, "val": 0.9, "test": 1.0}  # contiguous 80/10/10 % of the byte stream
# Third-party packages live inside some stdlib folders and differ between machines.
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages"}

# Readable name of each byte, e.g. "a", "\\n", "\\xff".
VOCAB = [repr(bytes([b]))[2:-1] for b in range(256)]


def _walk(root: Path, skip_dirs: set[str]) -> Iterator[Path]:
    """Yields the files under ``root`` in sorted depth-first order, skipping hidden entries."""
    with os.scandir(root) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith(".") or entry.name in skip_dirs:
            continue
        # Symlinked folders are not followed: they can loop back up the tree.
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), skip_dirs)
        elif entry.is_file():
            yield Path(entry.path)


def _text_bytes(path: Path) -> bytes | None:
    """Returns the file's bytes, or None if it does not look like UTF-8 text."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def _stdlib_corpus() -> tuple[bytes, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in _walk(root, _SKIPPED_STDLIB_DIRS):
        if path.suffix != ".py":
            continue
        data = _text_bytes(path)
        if data is None:
            continue
        chunks.append(data)
        total += len(data)
        if total >= DEFAULT_CORPUS_BYTES:
            break
    return b"".join(chunks)[:DEFAULT_CORPUS_BYTES], f"{root}/**/*.py"


def _user_corpus(data: str) -> tuple[bytes, str]:
    """The bytes of a text file, or of the text files in a folder, and how to name them in messages."""
    path = Path(data)
    if path.is_file():
        text = _text_bytes(path)
        if text is None:
            raise ValueError(f"text data {path} is not a UTF-8 text file; pass a text file or a folder of them")
        return text, str(path)
    if path.is_dir():
        files = list(_walk(path, set()))
        texts = [t for t in (_text_bytes(p) for p in files) if t is not None]
        skipped = len(files) - len(texts)
        if not texts:
            found = f"its {skipped} file(s) are all binary or not UTF-8, and were skipped" if skipped else \
                "it holds no files (hidden ones are skipped)"
            raise ValueError(f"text data folder {path} has no text: {found}; pass a folder of UTF-8 text files")
        # Messages about the corpus (too short, too few windows) say what was skipped to get it.
        return b"".join(texts), f"{path} ({len(texts)} text file(s), {skipped} binary or non-UTF-8 skipped)"
    if path.exists():
        raise ValueError(f"text data {path} is neither a file nor a folder; pass a text file or a folder of them")
    raise ValueError(f"text data {path} does not exist; pass a text file or a folder of text files")


def _windows_bytes(n: int, seq_len: int) -> int:
    """Peak bytes of ``_windows``: the int64 index array, the gathered windows, and the input/target copies."""
    return 8 * n * (seq_len + 1) * 4


def _windows(part: np.ndarray, n: int, seq_len: int, rng: np.random.Generator) -> Split:
    offsets = rng.choice(len(part) - seq_len, size=n, replace=False)
    windows = torch.from_numpy(part[offsets[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    return Split(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())


@register_task("text")
def load_text(cfg: TaskConfig) -> TaskData:
    """Loads byte-level next-token prediction on ``cfg.data``.

    The bytes of the file, or of every UTF-8 text file under the folder
    (sorted, hidden entries and binaries skipped), are concatenated; without
    ``cfg.data`` the first 2 MB of the Python standard library's ``*.py``
    files are used. The stream is cut into contiguous train/val/test parts
    (80/10/10 %) before windowing, so no window spans two splits. Each split
    holds windows of ``seq_len + 1`` bytes at distinct random offsets.

    Args:
        cfg: Task configuration; ``data``, ``seq_len`` (default 128),
            ``n_train``, ``n_val``, ``n_test`` (default 20000/1000/1000, or
            every available window if fewer) and ``seed`` apply.

    Returns:
        int64 byte ids ``(N, seq_len)`` with the next byte at every position.

    Raises:
        ValueError: If the path is missing or not text, or the corpus is too
            short for the requested ``seq_len`` or window counts.
    """
    corpus, source = _stdlib_corpus() if cfg.data is None else _user_corpus(cfg.data)
    seq_len = cfg.seq_len or DEFAULT_SEQ_LEN
    stream = np.frombuffer(corpus, dtype=np.uint8)
    requested = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    counts: dict[str, int] = {}
    parts: dict[str, np.ndarray] = {}
    start = 0
    for part_name, end_fraction in _SPLIT_ENDS.items():
        end = int(len(stream) * end_fraction)
        part = stream[start:end]
        start = end
        available = len(part) - seq_len  # distinct window offsets
        if available < 1:
            raise ValueError(
                f"text data {source} has {len(stream)} bytes, too few for seq_len={seq_len}: each 80/10/10 % "
                f"split needs at least seq_len+1 bytes; give more text or a smaller seq_len"
            )
        n = requested[part_name]
        if n is None:
            n = min(DEFAULT_SIZES[part_name], available)
        elif n > available:
            raise ValueError(
                f"n_{part_name}={n} exceeds the {available} distinct windows of seq_len={seq_len} in the "
                f"{part_name} part of {source}; lower n_{part_name} or give more text"
            )
        counts[part_name], parts[part_name] = n, part
    # Every window is copied out of the stream: long windows times many of them outgrow memory before training.
    require_memory(sum(_windows_bytes(n, seq_len) for n in counts.values()),
                   f"the text task's {sum(counts.values())} windows of {seq_len + 1} bytes",
                   "lower --seq-len or --n-train / --n-val / --n-test")
    splits = {part_name: _windows(parts[part_name], counts[part_name], seq_len,
                                  np.random.default_rng([cfg.seed, index]))
              for index, part_name in enumerate(_SPLIT_ENDS)}
    return TaskData(
        preprocessing="the text's bytes (UTF-8 for text), each byte one token id 0..255 (task.vocab names each); "
                      "the model predicts the next byte at every position; input [batch, seq_len] of token ids",
        name="text",
        objective="lm",
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        seq_len=seq_len,
        vocab_size=256,
        input_dim=None,
        n_outputs=256,
        label_names=[],
        vocab=list(VOCAB),
        metric="bits_per_byte",
    )
