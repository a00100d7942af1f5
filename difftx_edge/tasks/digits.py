"""scikit-learn's 8x8 handwritten digits as sequences of 2x2 pixel patches."""

from __future__ import annotations

import numpy as np
import torch

from difftx_edge.tasks.base import Split, TaskConfig, TaskData, register_task, reject_unused

SEQ_LEN = 16  # 4x4 patches per 8x8 image
PATCH_DIM = 4  # pixels per 2x2 patch
_MAX_PIXEL = 16.0  # load_digits pixel values are 0..16
_VAL_FRACTION = 0.1
_TEST_FRACTION = 0.2


PREPROCESSING = ("an 8x8 grayscale image with pixel values 0..16 (scikit-learn's load_digits; 0 is the background), "
                 "each divided by 16.0, cut into 16 patches of 2x2 pixels in row-major order: patch 4*i+j holds "
                 "pixels [2i, 2j], [2i, 2j+1], [2i+1, 2j], [2i+1, 2j+1]; input [batch, 16, 4] float32")


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


def patch_images(patches: torch.Tensor) -> torch.Tensor:
    """The inverse of ``image_patches``: ``(N, 16, 4)`` patches back to ``(N, 8, 8)`` images."""
    n = patches.shape[0]
    return patches.reshape(n, 4, 4, 2, 2).transpose(2, 3).reshape(n, 8, 8)


def shift_images(patches: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Moves each image by a random whole number of pixels, at most ``max_shift`` each way, filling with 0.

    The training split's augmentation: load_digits centres every digit in its
    8x8 box, so a small shift is still a well-formed digit of the same class
    (0 is the background). Only shifts that push no ink out of the box are
    drawn, so no stroke is cut off. The draw comes from ``generator`` alone,
    so a seeded run sees the same shifts every time.

    Args:
        patches: ``(N, 16, 4)`` patch sequences, as the task serves them.
        generator: Source of the shifts.
        max_shift: Largest shift in pixels along each axis.

    Returns:
        New ``(N, 16, 4)`` patch sequences; ``patches`` is not changed.
    """
    n, m = patches.shape[0], max_shift
    padded = torch.nn.functional.pad(patch_images(patches), (m, m, m, m))  # (N, 8+2m, 8+2m)
    side = 2 * m + 1
    offsets = torch.tensor([(y, x) for y in range(side) for x in range(side)])  # (S, 2); (m, m) is no shift
    ink = padded.flatten(1).sum(1)  # (N,)
    kept = torch.stack([padded[:, y:y + 8, x:x + 8].flatten(1).sum(1) for y, x in offsets.tolist()], 1)  # (N, S)
    draw = torch.rand(n, len(offsets), generator=generator).masked_fill(kept < ink[:, None], -1.0)
    dy, dx = offsets[draw.argmax(1)].T  # uniform over the shifts that keep all the ink
    rows = (dy[:, None] + torch.arange(8))[:, :, None]  # (N, 8, 1)
    cols = (dx[:, None] + torch.arange(8))[:, None, :]  # (N, 1, 8)
    shifted = padded[torch.arange(n)[:, None, None], rows, cols]  # (N, 8, 8)
    return torch.from_numpy(image_patches(shifted.numpy())).to(patches.dtype)


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
        augment=shift_images,
        preprocessing=PREPROCESSING,
    )
