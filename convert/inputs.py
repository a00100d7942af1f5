"""A program's example inputs for convert: drawn at random within what the program can take, or read from an
.npz the user gives, checked against the program before any work.

Random token ids stay below the smallest vocabulary of the embeddings they index: an id at or past an
embedding's size is an IndexError in PyTorch and garbage in a runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def user_input(program) -> tuple[str, torch.Tensor]:
    """The name and example (a fake tensor) of the program's one tensor input."""
    user_inputs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(user_inputs) != 1:
        raise ValueError(f"convert supports programs with one tensor input, this one has {len(user_inputs)}")
    name = user_inputs[0].arg.name
    nodes = [n for n in program.graph.nodes if n.op == "placeholder" and n.name == name]
    fake = nodes[0].meta.get("val") if len(nodes) == 1 else None
    if not isinstance(fake, torch.Tensor):
        raise ValueError(f"convert supports programs with one tensor input; this one's input is "
                         f"{type(fake).__name__}: export the model with a tensor example input")
    if fake.dtype.is_complex or fake.dtype == torch.bfloat16:  # numpy has no bfloat16, no format takes complex
        raise ValueError(f"convert takes float, integer or bool inputs, not {str(fake.dtype).removeprefix('torch.')}"
                         ": export the model with a float32 or integer input")
    return name, fake


# Ops that pass an integer input's values on unchanged (reshaped, sliced or cast), so ids that reach an
# embedding through them are still the input's. Matched by name, also as edge dialect's "<name>_copy".
_SAME_VALUES = frozenset({"view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze",
                          "transpose", "permute", "t", "contiguous", "clone", "alias", "detach", "expand",
                          "slice", "select", "narrow", "to", "_to_copy", "lift_fresh"})


def _index_bounds(program, name: str) -> tuple[list[int], list[int]]:
    """What bounds the values of input ``name``: ``(embedding sizes, other index bounds)``.

    An embedding's size is its weight's first dimension (``num_embeddings``).
    The other bounds come from ``index_select``, ``gather``, ``index`` (a
    ``table[ids]``) and ``one_hot``, each the size of the dimension indexed.
    """
    def size(node, axis: int) -> int | None:
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(value, torch.Tensor) or not -value.dim() <= axis < value.dim():
            return None
        return int(value.shape[axis])

    embeddings, others = [], []
    frontier = [n for n in program.graph.nodes if n.op == "placeholder" and n.name == name]
    seen = set(frontier)
    while frontier:
        node = frontier.pop()
        for user in node.users:
            target = user.target
            if user.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
                continue
            op, args = target._opname, user.args
            if (op in _SAME_VALUES or op.removesuffix("_copy") in _SAME_VALUES) and args and args[0] is node:
                if user not in seen:
                    seen.add(user)
                    frontier.append(user)
            elif op == "embedding" and len(args) > 1 and args[1] is node:
                embeddings.append(size(args[0], 0))
            elif op in ("index_select", "gather") and len(args) > 2 and args[2] is node:
                others.append(size(args[0], args[1]))
            elif op == "index" and len(args) > 1 and isinstance(args[1], (list, tuple)) and node in args[1]:
                others.append(size(args[0], list(args[1]).index(node)))
            elif op == "one_hot" and args[0] is node:
                classes = args[1] if len(args) > 1 else user.kwargs.get("num_classes", -1)
                others.append(classes if isinstance(classes, int) and classes > 0 else None)
    return [b for b in embeddings if b is not None], [b for b in others if b is not None]


def token_vocab(program, name: str | None = None) -> int | None:
    """The vocabulary of a token input: the smallest ``num_embeddings`` of the embeddings it indexes.

    Args:
        program: an ExportedProgram.
        name: the user input's name in the graph; None: the program's one input.

    Returns:
        The vocabulary size, or None when the input reaches no embedding
        (directly or through view, slice and cast ops).
    """
    embeddings, _ = _index_bounds(program, name if name is not None else user_input(program)[0])
    return min(embeddings) if embeddings else None


SMALL_IDS = 16  # random ids of an integer input that indexes no embedding: a small non-negative range


def _id_limit(program, name: str, dtype: torch.dtype) -> tuple[int, str]:
    """The exclusive upper bound of valid ids for input ``name``, and what set it."""
    embeddings, others = _index_bounds(program, name)
    high, limit = (min(embeddings), "embedding") if embeddings else (SMALL_IDS, "default")
    if others and min(others) < high:
        high, limit = min(others), "index"
    high = min(high, torch.iinfo(dtype).max + 1)
    if high < 1:
        raise ValueError(f"the program's input {name!r} indexes a table with no rows: no id is valid, so convert "
                         "cannot check it; export the model with a non-empty embedding")
    return high, limit


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def example_args(program, seed: int, n: int) -> tuple[list[np.ndarray], dict]:
    """``n`` random batches of the program's input and how they were drawn (for the manifest)."""
    name, fake = user_input(program)
    shape = [int(d) for d in fake.shape]  # a dynamic dimension uses its export-time hint
    rng = np.random.default_rng(seed)
    dtype = _numpy_dtype(fake.dtype)
    if fake.dtype.is_floating_point:
        drawn = {"dtype": dtype.name, "distribution": "standard normal"}
        args = [rng.standard_normal(shape).astype(dtype) for _ in range(n)]
    elif fake.dtype == torch.bool:
        drawn = {"dtype": "bool", "low": 0, "high": 2}
        args = [rng.integers(0, 2, shape).astype(bool) for _ in range(n)]
    else:
        # An id at or past an embedding's size is an IndexError in PyTorch and garbage in a runtime.
        high, limit = _id_limit(program, name, fake.dtype)
        drawn = {"dtype": dtype.name, "low": 0, "high": high, "high_from": limit}
        args = [rng.integers(0, high, shape).astype(dtype) for _ in range(n)]
    return args, {"from": "random", "seed": seed, "inputs": {name: drawn}}


def npz_args(program, path: Path, n: int) -> tuple[list[np.ndarray], dict]:
    """The first ``n`` samples of the ``.npz`` at ``path``, checked against the program's input.

    Raises:
        ValueError: one line naming what does not fit and what to give instead.
    """
    from difftx_edge.hashing import sha256_file
    from difftx_edge.tasks.npz import read_arrays

    name, fake = user_input(program)
    shape = tuple(int(d) for d in fake.shape)
    fix = f"write it with numpy.savez(path, {name}=samples), samples of shape (S, {', '.join(map(str, shape))})"
    arrays = read_arrays(path, fix)
    unknown = sorted(set(arrays) - {name})
    if unknown:
        raise ValueError(f"{path}: {unknown[0]!r} is not an input of the program (its input is {name!r}); {fix}")
    if name not in arrays:
        raise ValueError(f"{path} has no array {name!r} for the program's input {name!r}; {fix}")
    array = arrays[name]
    kind = "float" if fake.dtype.is_floating_point else "bool" if fake.dtype == torch.bool else "integer"
    if array.dtype.kind not in {"float": "f", "bool": "b", "integer": "iu"}[kind]:
        raise ValueError(f"{path}: {name!r} is {array.dtype}, but the program's input {name!r} takes "
                         f"{str(fake.dtype).removeprefix('torch.')}: give {kind} values")
    if array.ndim != len(shape) + 1 or array.shape[1:] != shape or len(array) == 0:
        raise ValueError(f"{path}: {name!r} has shape {array.shape}; it must be (S, {', '.join(map(str, shape))}): "
                         f"S >= 1 samples, each of the program's input shape {shape}")
    dtype = _numpy_dtype(fake.dtype)
    if kind == "float":
        with np.errstate(over="ignore"):  # too large for the dtype becomes inf, refused below
            array = array.astype(dtype)
        if not np.isfinite(array).all():
            raise ValueError(f"{path}: {name!r} has NaN or inf (or values too large for {dtype.name}); give finite "
                             "values")
    elif kind == "integer" and array.size:
        low, high = int(array.min()), int(array.max())
        embeddings, others = _index_bounds(program, name)
        bound = min(embeddings + others, default=None)
        if bound is not None and (low < 0 or high >= bound):
            what = "an embedding" if embeddings and bound == min(embeddings) else "a table"
            raise ValueError(f"{path}: {name!r} holds ids from {low} to {high}, but it indexes {what} of {bound} "
                             f"rows: give ids 0..{bound - 1}")
        info = np.iinfo(dtype)
        if low < info.min or high > info.max:
            raise ValueError(f"{path}: {name!r} holds values from {low} to {high}, outside the program's "
                             f"{dtype.name}: give values in {info.min}..{info.max}")
        array = array.astype(dtype)
    args = [np.ascontiguousarray(sample) for sample in array[:n]]
    return args, {"from": "npz", "file": path.name, "sha256": sha256_file(path), "samples": len(args)}
