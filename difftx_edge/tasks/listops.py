"""Long Range Arena ListOps, regenerated offline by a seeded generator.

Follows LRA's generator (lra_benchmarks/data/listops.py): each node below the
maximum depth is an operator with probability 0.25, else a digit 0-9; an
operator takes 2 to ``max_args`` arguments; trees whose token count (digits,
operators and closing brackets) is not strictly between ``min_len`` and
``max_len`` are rejected. The label is the value of the expression.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from difftx_edge.tasks.base import Split, TaskConfig, TaskData, register_task, reject_unused

PAD = 0
# Token ids: PAD, digits 0-9 as ids 1-10, then operators and the closing bracket.
VOCAB = ["<pad>", *(str(d) for d in range(10)), "[MIN", "[MAX", "[MED", "[SM", "]"]
_FIRST_OP = VOCAB.index("[MIN")
END = VOCAB.index("]")
_N_OPS = 4
_OP_PROB = 0.25  # LRA's VALUE_P: a node is an operator iff random() <= 0.25


@dataclass(frozen=True)
class ListOpsSetting:
    """Generation parameters of one setting; lengths are exclusive bounds as in LRA."""

    min_len: int
    max_len: int
    max_depth: int
    max_args: int
    n_train: int
    n_val: int
    n_test: int


# Keys must match base.LISTOPS_SETTINGS, which TaskConfig validates against.
SETTINGS = {
    # Short sequences with the LRA grammar, so a small CPU trains in minutes.
    "cpu": ListOpsSetting(min_len=32, max_len=128, max_depth=10, max_args=10, n_train=8000, n_val=1000, n_test=1000),
    # The published LRA task.
    "lra": ListOpsSetting(min_len=500, max_len=2000, max_depth=10, max_args=10, n_train=96000, n_val=2000, n_test=2000),
}


def _apply(op: int, args: list[int]) -> int:
    if op == 0:
        return min(args)
    if op == 1:
        return max(args)
    if op == 2:
        # LRA computes int(np.median(args)): the mean of the middle pair, truncated.
        ordered = sorted(args)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) // 2
    return sum(args) % 10


def _evaluate(tokens: list[int]) -> int:
    """Returns the value of an expression given as token ids in prefix order."""
    # The bottom entry is a sentinel whose argument list receives the result.
    stack: list[tuple[int, list[int]]] = [(-1, [])]
    for token in tokens:
        if token == END:
            op, args = stack.pop()
            stack[-1][1].append(_apply(op, args))
        elif token >= _FIRST_OP:
            stack.append((token - _FIRST_OP, []))
        else:
            stack[-1][1].append(token - 1)
    return stack[0][1][0]


def _attempt(uniform: Callable[[], float], setting: ListOpsSetting) -> list[int] | None:
    """Draws one tree in prefix order, or None once it is sure to be too long.

    Iterative and with as few random draws as possible because rejected trees
    outnumber accepted ones about 15 to 1 in the "cpu" setting. ``int(uniform()
    * k)`` stands in for ``randrange(k)``: several times faster, bias ~1e-16.
    """
    # Locals: this loop runs millions of times, attribute lookups show up.
    arg_span, max_len = setting.max_args - 1, setting.max_len
    # A node drawn with len(pending) open operators sits at depth len(pending) + 1
    # (root at depth 1) and may be an operator only below max_depth.
    op_below_depth = setting.max_depth - 1
    n_args = 2 + int(uniform() * arg_span)
    # The root is always an operator: a lone digit is one token long and LRA
    # rejects it, so this skips those draws without changing the distribution.
    tokens = [_FIRST_OP + int(uniform() * _N_OPS)]
    # Lower bound of the final length: every announced argument is at least
    # one digit and every operator ends with "]". Trees that reach max_len are
    # cut off early, which is where most of the time would otherwise go.
    min_length = n_args + 2
    if min_length >= max_len:
        return None
    pending = [n_args]  # arguments still to draw, per open operator
    while pending:
        if pending[-1] == 0:
            pending.pop()
            tokens.append(END)
            continue
        pending[-1] -= 1
        if len(pending) < op_below_depth and uniform() <= _OP_PROB:
            n_args = 2 + int(uniform() * arg_span)
            min_length += n_args + 1
            if min_length >= max_len:
                return None
            tokens.append(_FIRST_OP + int(uniform() * _N_OPS))
            pending.append(n_args)
        else:
            tokens.append(1 + int(uniform() * 10))
    return tokens


def generate(n: int, setting: ListOpsSetting, seed: str) -> tuple[list[list[int]], list[int]]:
    """Generates ``n`` accepted expressions.

    Args:
        n: Number of expressions.
        setting: Length and shape limits.
        seed: Seed of the generator; any string.

    Returns:
        Token id lists (unpadded, prefix order) and their values 0-9.
    """
    uniform = random.Random(seed).random
    sequences: list[list[int]] = []
    while len(sequences) < n:
        tokens = _attempt(uniform, setting)
        if tokens is not None and len(tokens) > setting.min_len:
            sequences.append(tokens)
    return sequences, [_evaluate(tokens) for tokens in sequences]


def _split(n: int, setting: ListOpsSetting, seed: str, seq_len: int) -> Split:
    sequences, values = generate(n, setting, seed)
    inputs = np.full((n, seq_len), PAD, dtype=np.int64)
    for row, tokens in enumerate(sequences):
        inputs[row, : len(tokens)] = tokens
    return Split(torch.from_numpy(inputs), torch.tensor(values, dtype=torch.int64))


@register_task("listops")
def load_listops(cfg: TaskConfig) -> TaskData:
    """Generates the ListOps task for ``cfg.listops_setting``.

    Each split comes from its own seed derived from ``cfg.seed``, so changing
    one split's size leaves the others unchanged.

    Args:
        cfg: Task configuration; ``seed``, ``n_train``, ``n_val``,
            ``n_test`` and ``seq_len`` apply. ``seq_len`` is the padded
            length: default the setting's ``max_len``, at least its longest
            sequence (``max_len - 1``).

    Returns:
        Right-padded token ids ``(N, seq_len)`` with labels 0-9.

    Raises:
        ValueError: If ``seq_len`` is too short or ``data`` is set.
    """
    reject_unused(cfg, "data")
    setting = SETTINGS[cfg.listops_setting]
    longest = setting.max_len - 1  # lengths are exclusive bounds
    seq_len = setting.max_len if cfg.seq_len is None else cfg.seq_len
    if seq_len < longest:
        raise ValueError(
            f"listops setting {cfg.listops_setting!r} makes sequences up to {longest} tokens, "
            f"seq_len={seq_len} is too short; leave seq_len unset or raise it"
        )
    sizes = {
        "train": cfg.n_train or setting.n_train,
        "val": cfg.n_val or setting.n_val,
        "test": cfg.n_test or setting.n_test,
    }
    splits = {
        part: _split(n, setting, f"listops/{cfg.listops_setting}/{cfg.seed}/{part}", seq_len)
        for part, n in sizes.items()
    }
    return TaskData(
        preprocessing="a ListOps expression as tokens in prefix order, each mapped to its id by task.vocab "
                      "(digits 0-9 are ids 1-10; '[MIN', '[MAX', '[MED', '[SM' and ']' follow), right-padded with "
                      "id 0 (<pad>) to seq_len; input [batch, seq_len] of token ids",
        name="listops",
        objective="classify",
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        seq_len=seq_len,
        vocab_size=len(VOCAB),
        input_dim=None,
        n_outputs=10,
        label_names=[str(d) for d in range(10)],
        vocab=list(VOCAB),
        metric="accuracy",
    )
