"""A program's example inputs for convert: drawn at random within what the program can take, or read from an
.npz the user gives, checked against the program before any work.

Random token ids stay below the smallest vocabulary of the embeddings they index: an id at or past an
embedding's size is an IndexError in PyTorch and garbage in a runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def user_inputs(program) -> list[tuple[str, torch.Tensor]]:
    """The name and example (a fake tensor) of each of the program's tensor inputs, in the program's order."""
    specs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if not specs:
        raise ValueError("this program takes no input, so convert has nothing to check it on: export the model "
                         "with at least one tensor example input")
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    found = []
    for spec in specs:
        name = spec.arg.name
        node = placeholders.get(name)
        fake = node.meta.get("val") if node is not None else None
        if not isinstance(fake, torch.Tensor):
            raise ValueError(f"convert takes tensor inputs; this program's input {name!r} is {type(fake).__name__}: "
                             "export the model with tensor example inputs only")
        if fake.dtype.is_complex or fake.dtype == torch.bfloat16:  # numpy has no bfloat16, no format takes complex
            dtype = str(fake.dtype).removeprefix("torch.")
            raise ValueError(f"the program's input {name!r}: convert takes float, integer or bool inputs, not {dtype}: "
                             "export the model with a float32 or integer input")
        found.append((name, fake))
    return found


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
    if name is None:
        found = user_inputs(program)
        if len(found) != 1:
            raise ValueError(f"this program has {len(found)} inputs: name the one whose vocabulary you want")
        name = found[0][0]
    embeddings, _ = _index_bounds(program, name)
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


def example_args(program, seed: int, n: int) -> tuple[list[tuple[np.ndarray, ...]], dict]:
    """``n`` random samples of the program's inputs and how they were drawn (for the manifest).

    Returns:
        ``(samples, source)``: each sample a tuple of arrays, one per program input in the program's order, of
        its example shape and dtype; ``source`` says how each input was drawn.
    """
    rng = np.random.default_rng(seed)
    columns, drawn = [], {}
    for name, fake in user_inputs(program):
        shape = [int(d) for d in fake.shape]  # a dynamic dimension uses its export-time hint
        dtype = _numpy_dtype(fake.dtype)
        if fake.dtype.is_floating_point:
            drawn[name] = {"dtype": dtype.name, "distribution": "standard normal"}
            columns.append([rng.standard_normal(shape).astype(dtype) for _ in range(n)])
        elif fake.dtype == torch.bool:
            drawn[name] = {"dtype": "bool", "low": 0, "high": 2}
            columns.append([rng.integers(0, 2, shape).astype(bool) for _ in range(n)])
        else:
            # An id at or past an embedding's size is an IndexError in PyTorch and garbage in a runtime.
            high, limit = _id_limit(program, name, fake.dtype)
            drawn[name] = {"dtype": dtype.name, "low": 0, "high": high, "high_from": limit}
            columns.append([rng.integers(0, high, shape).astype(dtype) for _ in range(n)])
    return list(zip(*columns)), {"from": "random", "seed": seed, "inputs": drawn}


def npz_args(program, path: Path, n: int) -> tuple[list[tuple[np.ndarray, ...]], dict]:
    """The first ``n`` samples of the ``--inputs`` ``.npz`` at ``path``, checked against the program's inputs.

    Returns:
        ``(samples, source)`` as :func:`example_args`; ``source`` names the file and its sha256.

    Raises:
        ValueError: one line naming what does not fit and what to give instead.
    """
    from difftx_edge.hashing import sha256_file

    samples = read_samples(program, path)[:n]
    return samples, {"from": "npz", "file": path.name, "sha256": sha256_file(path), "samples": len(samples)}


def read_samples(program, path: Path) -> list[tuple[np.ndarray, ...]]:
    """Every sample of the ``.npz`` at ``path``, checked against the program's inputs and cast to their dtypes.

    The file holds one array per program input, named after it, of shape ``(S, *that input's shape)``: sample
    ``i`` is the ``i``-th row of every array. It is read without unpickling (object arrays are refused).

    Returns:
        ``S`` samples, each a tuple of arrays in the program's input order.

    Raises:
        ValueError: one line naming what does not fit and what to give instead: not a plain ``.npz``, a name
            that is no input, inputs left out, a dtype of another kind, a shape without the sample axis, sample
            counts that differ, NaN or inf, ids outside what the program indexes.
    """
    from difftx_edge.tasks.npz import read_arrays

    inputs = user_inputs(program)
    names = [name for name, _ in inputs]
    fix = "write it with numpy.savez(path, " + ", ".join(f"{name}=samples" for name in names) + "), " + "; ".join(
        f"{name} of shape (S, {', '.join(str(int(d)) for d in fake.shape)})" for name, fake in inputs)
    arrays = read_arrays(path, fix)
    unknown = sorted(set(arrays) - set(names))
    if unknown:
        their = f"its input is {names[0]!r}" if len(names) == 1 else f"its inputs are {', '.join(map(repr, names))}"
        raise ValueError(f"{path}: {unknown[0]!r} is not an input of the program ({their}); {fix}")
    missing = [name for name in names if name not in arrays]
    if missing:
        what = "input" if len(missing) == 1 else "inputs"
        raise ValueError(f"{path} has no array{'' if len(missing) == 1 else 's'} {', '.join(map(repr, missing))} for "
                         f"the program's {what} of that name: give every input, {fix}")
    columns = [_checked(program, path, name, fake, arrays[name]) for name, fake in inputs]
    counts = {name: len(column) for name, column in zip(names, columns)}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise ValueError(f"{path}: the inputs hold different numbers of samples ({listed}): sample i is row i of "
                         "every array, so give each input the same number of rows")
    return [tuple(np.ascontiguousarray(column[i]) for column in columns) for i in range(len(columns[0]))]


def _checked(program, path: Path, name: str, fake: torch.Tensor, array: np.ndarray) -> np.ndarray:
    """``array``, the samples of input ``name``, checked against it and cast to its dtype."""
    shape = tuple(int(d) for d in fake.shape)
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
    elif kind == "integer":
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
    return array


# -----------------------------------------------------------------------------
# Calibration samples for int8: observers see most of them, the rest measure the artifact.

HOLD_BACK = 0.2  # the last fifth of the calibration samples, at least one, never reach an observer
RANDOM_CALIBRATION = 32  # random samples when no calibration file is given


def calibration_args(program, path: Path | None, *, given: list[tuple[np.ndarray, ...]] | None = None,
                     seed: int = 0) -> tuple[list[tuple[np.ndarray, ...]], list[tuple[np.ndarray, ...]], dict]:
    """Calibration samples for int8, split into those the observers see and those held back to measure with.

    The last ``HOLD_BACK`` of the samples (at least one) are held back, in file order: the int8 artifact's
    parity and its SQNR against fp32 are measured on them, on samples no observer saw.

    Args:
        program: the float ExportedProgram.
        path: an ``.npz`` laid out as :func:`read_samples` reads (``--calibration``); None: no real samples, so
            the program's own example inputs (saved in the .pt2), ``given`` and ``RANDOM_CALIBRATION`` random
            samples of each input's dtype and range stand in, a weak calibration the source says is weak.
        given: the ``--inputs`` samples, used only when ``path`` is None.
        seed: the seed of the random samples.

    Returns:
        ``(observed, held_back, source)``: samples as :func:`example_args` gives them, and the manifest's
        ``quantization.calibration``.

    Raises:
        ValueError: one line: a file :func:`read_samples` refuses, or one with fewer than 2 samples.
    """
    if path is not None:
        from difftx_edge.hashing import sha256_file

        samples = read_samples(program, path)
        if len(samples) < 2:
            raise ValueError(f"{path} holds 1 sample; calibration needs at least 2 (observers see the first ones, "
                             f"the last {HOLD_BACK:.0%} measure the int8 artifact): give more samples, ideally "
                             "hundreds from the data the model will see")
        source = {"from": "npz", "file": path.name, "sha256": sha256_file(path), "weak": False}
    else:
        example = _program_example(program)
        random, drawn = example_args(program, seed, RANDOM_CALIBRATION)
        samples = example + list(given or []) + random
        source = {"from": "random", "weak": True, "seed": seed, "inputs": drawn["inputs"],
                  "program_example_samples": len(example), "inputs_samples": len(given or [])}
    held = max(1, round(len(samples) * HOLD_BACK))
    source.update(samples=len(samples), observed=len(samples) - held, held_back=held)
    return samples[:-held], samples[-held:], source


def _program_example(program) -> list[tuple[np.ndarray, ...]]:
    """The example inputs saved with the program as one sample, when they fit its inputs; else none."""
    saved, inputs = getattr(program, "example_inputs", None), user_inputs(program)
    if not saved or saved[1] or len(saved[0]) != len(inputs):
        return []
    sample = []
    for tensor, (name, fake) in zip(saved[0], inputs):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != fake.dtype or tensor.shape != fake.shape:
            return []
        try:  # the checks a --calibration file passes: finite floats, ids the program can index
            (array,) = _checked(program, Path("the program's example inputs"), name, fake,
                                tensor.detach().cpu().numpy()[None])
        except ValueError:
            return []
        sample.append(np.ascontiguousarray(array))
    return [tuple(sample)]
