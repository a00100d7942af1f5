"""scikit-learn's 8x8 handwritten digits as sequences of 2x2 pixel patches."""

from __future__ import annotations

import numpy as np
import torch

from difftx_edge.tasks.base import Split, TaskConfig, TaskData, reject_unused, register_task

SEQ_LEN = 16  # 4x4 patches per 8x8 image
PATCH_DIM = 4  # pixels per 2x2 patch
_MAX_PIXEL = 16.0  # load_digits pixel values are 0..16
_VAL_FRACTION = 0.1
_TEST_FRACTION = 0.2


def image_patches(images: np.ndarray) -> np.ndarray:
    """Cuts 8x8 images into 16 row-major 2x2 patches.

    Args:
        images: ``(N, 8, 8)`` array.

    Returns:
        ``(N, 16, 4)`` array; patch ``4 * i + j`` holds pixels
        ``[2i, 2j], [2i, 2j + 1], [2i + 1, 2j], [2i + 1, 2j + 1]``.
    """
    n = images.shape[0]
    # (N, patch_row, row_in_patch, patch_col, col_in_patch) -> patch axes first.
    blocks = images.reshape(n, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4)
    return blocks.reshape(n, SEQ_LEN, PATCH_DIM)


@register_task("digits")
def load_digits_task(cfg: TaskConfig) -> TaskData:
    """Loads the digits task: 1797 images, stratified 70/10/20 % split by ``cfg.seed``.

    Args:
        cfg: Task configuration; only ``seed`` (and ``seq_len``, which must
            be 16 if given) apply.

    Returns:
        Float patch sequences ``(N, 16, 4)`` in [0, 1] with labels 0-9.

    Raises:
        ValueError: If ``cfg`` sets an option digits cannot honour.
    """
    if cfg.seq_len is not None and cfg.seq_len != SEQ_LEN:
        raise ValueError(f"digits has a fixed seq_len of {SEQ_LEN}, got seq_len={cfg.seq_len}; leave it unset")
    reject_unused(cfg, "data", "n_train", "n_val", "n_test")
    # Imported here so that importing the package does not pay for scikit-learn.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = image_patches(digits.images).astype(np.float32) / _MAX_PIXEL
    y = digits.target.astype(np.int64)
    index = np.arange(len(y))
    rest, test = train_test_split(index, test_size=_TEST_FRACTION, random_state=cfg.seed, stratify=y)
    train, val = train_test_split(
        rest, test_size=_VAL_FRACTION / (1 - _TEST_FRACTION), random_state=cfg.seed, stratify=y[rest]
    )

    def split(rows: np.ndarray) -> Split:
        return Split(torch.from_numpy(x[rows]), torch.from_numpy(y[rows]))

    return TaskData(
        name="digits",
        objective="classify",
        train=split(train),
        val=split(val),
        test=split(test),
        seq_len=SEQ_LEN,
        vocab_size=None,
        input_dim=PATCH_DIM,
        n_outputs=10,
        label_names=[str(d) for d in range(10)],
        vocab=None,
        metric="accuracy",
    )
