"""Describe a saved Core ML ``.mlpackage`` and evaluate it on Linux with a numpy reference.

Installed as ``difftx_edge.convert.coreml_reference``.

Core ML can only load, compile and run a model on macOS, so on Linux a converted
package cannot be executed. This module offers two stand-ins that need nothing
but coremltools:

* :func:`describe` reads the saved spec and MIL program without compiling it and
  reports its interface, op counts and weight storage by dtype.
* :func:`reference_predict` walks the saved program's default (``main``)
  function op by op and evaluates each op with coremltools' own per-op numpy
  code (the ``value_inference`` the converter uses for constant folding, and
  ``materialized_val_inference`` for the ``constexpr_*`` weight-decompression
  ops and ``dequantize``), storing each result at the op's declared output
  dtype (so a FLOAT16 program computes in float16 where its ops say so). The ops
  coremltools has no numpy code for but convolutional models need (``conv``,
  ``max_pool``, ``avg_pool``) are written here from their MIL op specs, in
  ``_NUMPY_OPS``; any other op without numpy code is refused with a
  ``ValueError`` naming it.

This is NOT the Core ML runtime: it does not reproduce Core ML's kernels, its
compute-unit choice (CPU, GPU, Neural Engine), their accumulation orders or
their fp16 arithmetic. Label its numbers as a "coremltools numpy reference
evaluation of the saved program", never as Core ML results. What it does check
is that the saved program (ops, wiring, weights, dequantization) computes what
the source model computes.

One workaround lives here rather than in site-packages: under numpy 2,
coremltools 9.0's reduce ops reject the ``numpy.bool`` ``keep_dims`` constants
they load with, so those constants are handed over as Python bools.

Importing this module does not import coremltools; each function imports it
when called.

Example::

    from difftx_edge.convert.coreml_reference import describe, reference_predict

    info = describe("model.mlpackage")
    outputs = reference_predict("model.mlpackage", {"x": x.numpy()})
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

__all__ = ["describe", "reference_predict"]

_INSTALL_HINT = "pip install 'difftx-edge[coreml]'"
# Inputs of the decompression ops that parametrise the data rather than hold it.
_QUANT_PARAMS = frozenset({"scale", "zero_point", "offset", "axis", "shape", "output_dtype"})
# Core ML multi-array data types, as numpy names.
_ARRAY_DTYPES = {"FLOAT16": "float16", "FLOAT32": "float32", "DOUBLE": "float64", "INT32": "int32", "INT8": "int8"}


def describe(package_path: str | os.PathLike) -> dict:
    """Describe a saved ``.mlpackage`` without compiling or loading it into Core ML.

    Args:
        package_path: Path to the ``.mlpackage`` directory (an ML program).

    Returns:
        A dict with:

        * ``"ops"``: ``{op_type: count}`` over the default (``main``) function,
          nested blocks included, ``const`` and ``constexpr_*`` ops included.
        * ``"inputs"`` / ``"outputs"``: ``[{"name", "shape", "dtype"}]`` from the
          model description, in order; ``dtype`` is a numpy name such as
          ``"float32"`` for multi-arrays, else the feature type's name.
        * ``"weights"``: ``{dtype: n_elements}`` over the stored weight tensors
          (constants of rank >= 1): the data a ``constexpr_*`` or ``dequantize``
          op decompresses, at its stored dtype (int8 quantized weights count as
          ``"int8"``), and every other floating-point constant. Quantization
          parameters (scales, zero points, offsets), integer shape/axis/index
          constants and scalars are not weights. Keys are MIL dtype names:
          ``"int8"``, ``"uint8"``, ``"fp16"``, ``"fp32"``, ...
        * ``"deployment_target"``: the oldest OS target the spec version runs on,
          e.g. ``"iOS17"``.
        * ``"spec_version"``: the Core ML specification version.

    Raises:
        ValueError: If coremltools is missing or the package is not an ML program.
    """
    ct = _coremltools()
    from coremltools.converters.mil.mil import types

    spec, function = _load_main(ct, package_path)
    ops = _all_ops(function.operations)
    weights: Counter[str] = Counter()
    for op in ops:
        if op.op_type == "const" and _is_weight(op.outputs[0], types):
            out = op.outputs[0]
            weights[types.builtin_to_string(out.dtype)] += int(np.prod(out.shape, dtype=np.int64))
    return {
        "ops": dict(Counter(op.op_type for op in ops)),
        "inputs": [_feature(f) for f in spec.description.input],
        "outputs": [_feature(f) for f in spec.description.output],
        "weights": dict(weights),
        "deployment_target": ct.target(spec.specificationVersion).name,
        "spec_version": int(spec.specificationVersion),
    }


def reference_predict(package_path: str | os.PathLike, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Evaluate a saved ``.mlpackage`` with coremltools' per-op numpy code (not the Core ML runtime).

    Each op of the default (``main``) function is evaluated in program order by its own
    ``value_inference`` (``materialized_val_inference`` for ``constexpr_*`` ops
    and ``dequantize``; this module's numpy code for ``conv`` and pools); every
    result is stored at the op's declared output dtype, as the program states it.
    The package is read afresh on each call.

    Args:
        package_path: Path to the ``.mlpackage`` directory (an ML program).
        inputs: One array per function input, keyed by input name. Each is cast
            to the input's declared dtype (same-kind casts only, e.g. float64 to
            float32) and must have its declared shape.

    Returns:
        ``{output_name: array}`` in the program's output order, at the dtypes the
        program declares (float16 outputs stay float16).

    Raises:
        ValueError: If coremltools is missing, the inputs do not match the
            program's, or an op has no numpy implementation in coremltools.
    """
    ct = _coremltools()
    from coremltools.converters.mil.mil import types

    # A fresh load per call: evaluation writes values into the loaded program's vars.
    _, function = _load_main(ct, package_path)
    expected = list(function.inputs)
    if sorted(inputs) != sorted(expected):
        raise ValueError(f"inputs {sorted(inputs)} do not match the program's inputs {sorted(expected)}")
    for name, var in function.inputs.items():
        _bind(var, _input_array(name, var, inputs[name], types), types)

    for op in function.operations:
        if op.op_type == "const":
            _python_bool(op.outputs[0])
            continue
        for var, value in zip(op.outputs, _evaluate(op), strict=True):
            _bind(var, value, types)
    return {var.name: np.asarray(var.val) for var in function.outputs}


def _coremltools():
    """Import coremltools, or say how to install it."""
    try:
        import coremltools
    except ImportError as exc:
        raise ValueError(f"reading a Core ML package needs coremltools: {_INSTALL_HINT}") from exc
    return coremltools


def _load_main(ct, package_path: str | os.PathLike):
    """The spec and the MIL default (``main``) function of a saved ML program, read without compiling it."""
    from coremltools.converters.mil.frontend.milproto.load import load

    path = os.fspath(package_path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not an .mlpackage directory")
    model = ct.models.MLModel(path, skip_model_load=True)
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"{path} holds a {spec.WhichOneof('Type')} model, not an ML program")
    program = load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
    # A multifunction package names its default function; a plain one has only "main".
    return spec, program.functions[spec.description.defaultFunctionName or "main"]


def _all_ops(operations) -> list:
    """The ops of a block followed by those of their nested blocks, depth first."""
    ops = []
    for op in operations:
        ops.append(op)
        for block in op.blocks:
            ops.extend(_all_ops(block.operations))
    return ops


def _is_weight(var, types) -> bool:
    """Whether the constant ``var`` is stored weight data (see :func:`describe`)."""
    if not types.is_tensor(var.sym_type) or var.rank < 1:
        return False
    # Which inputs of decompression ops (constexpr_*, dequantize) this constant binds to.
    roles = {name for child in var.child_ops if child.op_type.startswith("constexpr_") or child.op_type == "dequantize"
             for name, bound in child.inputs.items() if bound is var}
    if roles:
        return bool(roles - _QUANT_PARAMS)
    return types.is_float(var.dtype)


def _feature(feature) -> dict:
    """Name, shape and dtype of a model-description feature."""
    kind = feature.type.WhichOneof("Type")
    if kind != "multiArrayType":
        return {"name": feature.name, "shape": [], "dtype": kind}
    array = feature.type.multiArrayType
    dtype_name = array.ArrayDataType.Name(array.dataType)
    return {"name": feature.name, "shape": [int(d) for d in array.shape],
            "dtype": _ARRAY_DTYPES.get(dtype_name, dtype_name.lower())}


def _input_array(name: str, var, value, types) -> np.ndarray:
    """``value`` as the function input ``var`` declares it: its dtype, its shape."""
    dtype = types.nptype_from_builtin(var.dtype)
    try:
        array = np.asarray(value).astype(dtype, casting="same_kind")
    except TypeError as exc:
        raise ValueError(f"input {name!r}: cannot cast {np.asarray(value).dtype} to {np.dtype(dtype)}") from exc
    declared = var.shape
    # A symbolic dimension (flexible shape) accepts any size; a fixed one must match.
    fits = len(declared) == array.ndim and all(
        not isinstance(d, (int, np.integer)) or d == n for d, n in zip(declared, array.shape, strict=True))
    if not fits:
        raise ValueError(f"input {name!r}: shape {array.shape} does not match the declared {tuple(declared)}")
    return array


def _evaluate(op) -> tuple:
    """The output values of ``op`` from its inputs' values, by coremltools' numpy code or :data:`_NUMPY_OPS`.

    Ops the converter must not constant-fold (the ``constexpr_*`` decompression ops and
    iOS17 ``dequantize``) keep their numpy code in ``materialized_val_inference``.
    """
    if op.op_type in _NUMPY_OPS:
        return _NUMPY_OPS[op.op_type](op)
    try:
        values = op.materialized_val_inference() if hasattr(op, "materialized_val_inference") else op.value_inference()
    except NotImplementedError as exc:
        raise ValueError(f"Core ML reference evaluation has no numpy implementation for op {op.op_type}") from exc
    values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
    # None is coremltools' "cannot compute this here" (e.g. dequantize of a non-constant scale).
    if any(v is None for v in values):
        raise ValueError(f"Core ML reference evaluation has no numpy implementation for op {op.op_type}")
    return values


def _bind(var, value, types) -> None:
    """Set ``var``'s value, at the dtype the program declares for it."""
    if types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type):
        # Some ops' numpy code computes wider than their declared output (rsqrt in a fp16
        # program returns float32): the program's type is the semantics, so round to it here.
        value = np.asarray(value).astype(types.nptype_from_builtin(var.dtype), copy=False)
        if types.is_scalar(var.sym_type):
            value = value[()]  # a numpy scalar, as the scalar types hold
    # Ops read their inputs through Var.val, which coremltools backs by _sym_val with no public setter.
    holder = var.sym_type()
    holder.val = value
    var._sym_val = holder


def _python_bool(var) -> None:
    """Store a numpy-bool scalar constant as a Python bool.

    Under numpy 2, coremltools 9.0's reduce ops pass ``keep_dims`` straight to
    ``np.mean(..., keepdims=)``, which rejects ``numpy.bool``; the value is the same.
    """
    if isinstance(var.val, np.bool_):
        var._sym_val.val = bool(var.val)


# Ops coremltools has no numpy code for, written here from their MIL op specs
# (coremltools/converters/mil/mil/ops/defs/iOS15/). Each takes the op and returns its output values.


def _conv(op) -> tuple:
    """MIL ``conv`` (1-3 spatial dims): strides, dilations, groups, pad_type valid/same/same_lower/custom, bias.

    im2col: every output position's receptive field becomes a row, and each group is one matmul,
    ``(n * positions, C_in/groups * prod(K)) @ (C_in/groups * prod(K), C_out/groups)``. Computed in
    at least float32; :func:`_bind` rounds to the declared dtype. The weight is whatever its producer
    bound, so int8 weights arrive here already dequantized by their ``constexpr_*`` op.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    dtype = np.result_type(op.x.val, op.weight.val, np.float32)
    x, weight = np.asarray(op.x.val, dtype), np.asarray(op.weight.val, dtype)
    n, c_in, *spatial = x.shape
    c_out, _, *kernel = weight.shape
    rank = len(kernel)
    strides, dilations = [int(s) for s in op.strides.val], [int(d) for d in op.dilations.val]
    groups = int(op.groups.val)
    pads = _conv_pads(str(op.pad_type.val), spatial, kernel, strides, dilations, op.pad)

    padded = np.pad(x, [(0, 0), (0, 0), *pads])
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]  # the dilated kernel
    axes = tuple(range(2, 2 + rank))
    windows = sliding_window_view(padded, reach, axis=axes)  # (n, C_in, *positions, *reach), a view
    # Every stride-th position, every dilation-th tap: (n, C_in, *d_out, *K).
    windows = windows[(slice(None), slice(None), *(slice(None, None, s) for s in strides),
                       *(slice(None, None, d) for d in dilations))]
    d_out = windows.shape[2:2 + rank]
    c_group, o_group, positions = c_in // groups, c_out // groups, int(np.prod(d_out, dtype=np.int64))
    # (n, g, C_in/g, *d_out, *K) -> (g, n, *d_out, C_in/g, *K) -> rows of receptive fields per group.
    windows = windows.reshape(n, groups, c_group, *d_out, *kernel)
    order = (1, 0, *range(3, 3 + rank), 2, *range(3 + rank, 3 + 2 * rank))
    columns = windows.transpose(order).reshape(groups, n * positions, -1)
    filters = weight.reshape(groups, o_group, -1).transpose(0, 2, 1)  # (g, C_in/g * prod(K), C_out/g)
    out = np.matmul(columns, filters)  # (g, n * positions, C_out/g)
    out = out.reshape(groups, n, positions, o_group).transpose(1, 0, 3, 2).reshape(n, c_out, *d_out)
    if op.bias is not None:
        out = out + np.asarray(op.bias.val, dtype).reshape(c_out, *[1] * rank)
    return (out,)


def _conv_pads(pad_type: str, spatial, kernel, strides, dilations, pad) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim, as MIL conv's ``pad_type`` defines it.

    ``same``/``same_lower`` pad so that ``d_out = ceil(d_in / stride)``, the total as coremltools'
    ``aggregated_pad`` computes it; ``same`` puts an odd pixel after (bottom/right, as TensorFlow's
    SAME and Core ML's BOTTOM_RIGHT_HEAVY), ``same_lower`` before. (The spec's worked rule for an
    even dilated kernel reads the other way round, against its own ``same_lower`` text; the converter
    maps torch's ``padding="same"``, which pads an odd pixel after, to ``same``, and the tests hold
    this against torch.)
    """
    if pad_type == "valid":
        return [(0, 0)] * len(kernel)
    if pad_type == "custom":
        values = [int(p) for p in pad.val]
        return list(zip(values[0::2], values[1::2], strict=True))
    if pad_type not in ("same", "same_lower"):
        raise ValueError(f"conv pad_type {pad_type!r} is not one of valid, same, same_lower, custom")
    pads = []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max(0, s * -(-size // s) - size + (k - 1) * d + 1 - s)
        small, large = total // 2, total - total // 2
        pads.append((small, large) if pad_type == "same" else (large, small))
    return pads


def _max_pool(op) -> tuple:
    """MIL ``max_pool``: the largest value per window; padding never wins (it holds -inf)."""
    x = np.asarray(op.x.val)
    kernel, strides, _, widths, out = _pool_geometry(op, x.shape[2:])
    windows = _pool_windows(np.pad(x, [(0, 0), (0, 0), *widths], constant_values=-np.inf), kernel, strides, out)
    return (windows.max(axis=tuple(range(-len(kernel), 0))),)


def _avg_pool(op) -> tuple:
    """MIL ``avg_pool``: each window's sum over its count, padding counted unless ``exclude_padding_from_average``.

    A ``ceil_mode`` window that runs past the declared padding counts only what lies inside it
    (PyTorch's rule; the spec is silent on that overhang).
    """
    dtype = np.result_type(op.x.val, np.float32)
    x = np.asarray(op.x.val, dtype)
    kernel, strides, declared, widths, out = _pool_geometry(op, x.shape[2:])
    taps = tuple(range(-len(kernel), 0))
    sums = _pool_windows(np.pad(x, [(0, 0), (0, 0), *widths]), kernel, strides, out).sum(axis=taps)
    # What each position counts for: input 1, declared padding 1 (0 if excluded), ceil_mode's overhang 0.
    counted = np.pad(np.ones(x.shape[2:], dtype), declared,
                     constant_values=0.0 if bool(op.exclude_padding_from_average.val) else 1.0)
    overhang = [(0, after - pad_after) for (_, after), (_, pad_after) in zip(widths, declared, strict=True)]
    counted = np.pad(counted, overhang)
    counts = _pool_windows(counted[None, None], kernel, strides, out).sum(axis=taps)
    return (sums / counts,)


def _pool_geometry(op, spatial):
    """A pool's kernel, strides, declared (before, after) padding, the padding its windows need, output sizes.

    The output sizes follow coremltools' own shape rule (floor or ``ceil_mode``); in ceil mode the last
    window may reach past the declared padding, so the needed ``after`` can exceed the declared one.
    """
    from coremltools.converters.mil.mil.ops.defs._utils import spatial_dimensions_out_shape

    kernel, strides = [int(k) for k in op.kernel_sizes.val], [int(s) for s in op.strides.val]
    pad_type = str(op.pad_type.val)
    declared = _conv_pads(pad_type, spatial, kernel, strides, [1] * len(kernel), op.pad)
    out = [int(d) for d in spatial_dimensions_out_shape(
        pad_type=pad_type, input_shape=tuple(spatial), kernel_shape=tuple(kernel), strides=tuple(strides),
        custom_pad=None if op.pad is None else op.pad.val, ceil_mode=bool(op.ceil_mode.val))]
    widths = [(before, max(after, (o - 1) * s + k - size - before))
              for size, o, k, s, (before, after) in zip(spatial, out, kernel, strides, declared, strict=True)]
    return kernel, strides, declared, widths, out


def _pool_windows(padded: np.ndarray, kernel, strides, out) -> np.ndarray:
    """The ``out`` windows of a padded ``(n, C, *spatial)`` array as a view, ``(n, C, *out, *kernel)``."""
    from numpy.lib.stride_tricks import sliding_window_view

    windows = sliding_window_view(padded, kernel, axis=tuple(range(2, padded.ndim)))
    return windows[(slice(None), slice(None),
                    *(slice(0, (o - 1) * s + 1, s) for o, s in zip(out, strides, strict=True)))]


_NUMPY_OPS = {"conv": _conv, "max_pool": _max_pool, "avg_pool": _avg_pool}
