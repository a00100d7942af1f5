"""Mobile rewrites: patterns in exported programs we did not write, replaced by exact forms XNNPACK delegates.

ExecuTorch's XnnpackPartitioner (and LiteRT's XNNPACK delegate) refuse some of
the ops that ``nn.TransformerEncoder``, HF BERT/DistilBERT/ViT and friends
export to. Each refused op splits the delegated graph, and the portable kernels
between the pieces made a foreign Transformer's .pte slower than eager PyTorch.
Each rewrite here finds one such pattern in the program's graph and puts the
same math in the form ``difftx_edge/model.py`` uses to be fully delegated:

    fold_constants    subgraphs that read no input (HF masks and position/type ids, sliced position tables,
                      expand'd buffers) -> one materialised constant each (no stride-0 constants)
    attention         scaled_dot_product_attention (its decomposition leaves any/eq/logical_not/where/
                      full_like, 4-D matmuls as expand + bmm and mul.Scalar outside) -> 3-D bmm + softmax;
                      an all-True or all-zero constant mask is dropped, a causal one is a constant
    layer_norm        layer_norm -> 4-D mean over dims [2, 3] and rsqrt
    mean              mean over any dims -> the one form XNNPACK takes: 4-D, dims [2, 3], keepdim
    amax              amax (no XNNPACK reduce-max) -> one max pooling window
    views             select -> slice + reshape; split/chunk/unbind -> slices; squeeze/unsqueeze -> reshape
                      (XNNPACK takes no select, split or squeeze, and unsqueeze on the last dim only)

A rewrite replaces a node with a call of a plain tensor function below; the
rewritten module is exported again, which traces that function into aten ops.
Every form is the same math as the op it replaces; floating-point results agree
to rounding (the tests hold them within 1e-6 in fp32).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

aten = torch.ops.aten

# name -> rewrite(module) -> the number of sites it replaced; applied in this (registration) order, since
# later ones read what earlier ones made (attention drops the masks fold_constants turned into constants).
REWRITES: dict[str, Callable[[GraphModule], int]] = {}


def register_rewrite(name: str):
    """Register ``rewrite(module: GraphModule) -> int`` (sites replaced) as ``name``; returns it unchanged."""

    def wrap(rewrite: Callable[[GraphModule], int]) -> Callable[[GraphModule], int]:
        REWRITES[name] = rewrite
        return rewrite

    return wrap


def apply_rewrites(program: torch.export.ExportedProgram, names: Iterable[str] | None = None
                   ) -> tuple[torch.export.ExportedProgram, list[dict]]:
    """Rewrite ``program`` into forms XNNPACK delegates, with the same inputs, outputs and values.

    Args:
        program: a static-shape exported program (the one convert loads).
        names: the rewrites to apply (see ``REWRITES``); None applies all of them. They run in
            registration order whatever the order given.

    Returns:
        The rewritten program, exported again with the same input names (``program`` itself when nothing
        changed), and ``[{"name": rewrite, "count": sites replaced}]`` for each rewrite that changed something.

    Raises:
        ValueError: an unknown rewrite name, or a program with dynamic shapes.
    """
    chosen = set(REWRITES) if names is None else set(names)
    unknown = sorted(chosen - set(REWRITES))
    if unknown:
        raise ValueError(f"unknown rewrite {', '.join(map(repr, unknown))}: use one of {', '.join(REWRITES)}")
    args, kwargs = _example_inputs(program)
    module = program.module()
    report = []
    for name, rewrite in REWRITES.items():
        if name in chosen:
            count = rewrite(module)
            if count:
                report.append({"name": name, "count": count})
    if not report:
        return program, []
    module.graph.eliminate_dead_code()
    _drop_unused_state(module)
    module.recompile()
    return torch.export.export(module, args, kwargs), report


def _example_inputs(program: torch.export.ExportedProgram) -> tuple[tuple, dict]:
    """Zero tensors of the user inputs' shapes and dtypes, as ``(args, kwargs)`` the program takes."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    flat = []
    for spec in program.graph_signature.input_specs:
        if spec.kind.name != "USER_INPUT":
            continue
        node = placeholders.get(getattr(spec.arg, "name", None))
        value = node.meta.get("val") if node is not None else None
        if isinstance(value, torch.Tensor):
            if not all(isinstance(n, int) for n in value.shape):
                raise ValueError(f"input {spec.arg.name} has a dynamic shape {tuple(value.shape)}: the rewrites "
                                 "take a static-shape program, export it without dynamic_shapes")
            value = torch.zeros(value.shape, dtype=value.dtype)
        else:
            value = getattr(spec.arg, "value", value)  # a constant input (an int, a float, None)
        flat.append(value)
    return pytree.tree_unflatten(flat, program.call_spec.in_spec)


def _drop_unused_state(module: GraphModule) -> None:
    """Delete parameters and buffers no node reads (folded away), so the new program does not carry them."""
    used = {n.target for n in module.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]:
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(module.get_submodule(owner) if owner else module, leaf)


def _val(node) -> torch.Tensor | None:
    """The (fake) tensor a node computes, or None."""
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _calls(module: GraphModule, *targets) -> list[Node]:
    return [n for n in module.graph.nodes if n.op == "call_function" and n.target in targets]


def _arguments(node: Node) -> dict:
    """An aten call's arguments by their schema names, defaults filled in."""
    return node.normalized_arguments(node.graph.owning_module, normalize_to_only_use_kwargs=True).kwargs


def _replace(node: Node, function: Callable, *args) -> None:
    """Put a call of ``function(*args)`` in place of ``node``; exporting the module again traces it."""
    with node.graph.inserting_before(node):
        new = node.graph.call_function(function, tuple(args))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _add_constant(module: GraphModule, value: torch.Tensor, before: Node) -> Node:
    """A new buffer holding ``value`` (materialised: contiguous, no stride-0), and the node that reads it."""
    index = 0
    while hasattr(module, f"_rewrite_constant_{index}"):
        index += 1
    name = f"_rewrite_constant_{index}"
    module.register_buffer(name, value.detach().clone(memory_format=torch.contiguous_format))
    with module.graph.inserting_before(before):
        node = module.graph.get_attr(name)
    node.meta["val"] = value
    return node


def _constant(module: GraphModule, node) -> torch.Tensor | None:
    """The value a ``get_attr`` node reads, or None for any other node."""
    if isinstance(node, Node) and node.op == "get_attr":
        value = operator.attrgetter(node.target)(module)  # a dotted path: "layers.0.pos"
        return value if isinstance(value, torch.Tensor) else None
    return None


# ---------------------------------------------------------------------------------------------------------------
# fold_constants: everything computed from parameters, buffers and constants alone becomes one constant.

def _foldable(node: Node) -> bool:
    """An aten op (or a getitem of one) that always gives the same result for the same inputs."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    target = node.target
    return (isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"
            and torch.Tag.nondeterministic_seeded not in target.tags
            and not target._schema.is_mutable)


@register_rewrite("fold_constants")
def fold_constants(module: GraphModule) -> int:
    """Evaluate every op that reads no program input, and read its result as one constant instead.

    HF models build their attention mask from ``arange`` and comparisons, and
    their position and token-type ids from buffers, at every call; none of it
    depends on the input, and the ops (arange, ge, where, gather, expand,
    scalar_tensor, ...) run outside XNNPACK. Quantize ops are not aten ops,
    so a quantized program's weights keep their quantize/dequantize pairs.
    Returns the number of constants made.
    """
    values: dict[Node, object] = {}
    for node in module.graph.nodes:
        if node.op == "get_attr":
            values[node] = _constant(module, node)
        elif _foldable(node) and all(n in values and values[n] is not None for n in node.all_input_nodes):
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
            values[node] = node.target(*args, **kwargs)
    made = 0
    for node, value in values.items():
        computed = node.op == "call_function" and isinstance(value, torch.Tensor)
        if computed and any(user not in values for user in node.users):
            node.replace_all_uses_with(_add_constant(module, value, node))
            made += 1
    module.graph.eliminate_dead_code()
    return made


# ---------------------------------------------------------------------------------------------------------------
# attention: scaled_dot_product_attention as 3-D bmm + softmax.

# Queries per block of scores. Each row's softmax is its own, so blocks change nothing in the values; at
# N=2048 a block's scores (B*H, 256, N) are 8 MB where all of them would be 64 MB per layer, and the .pte ran
# faster than with one block (and no slower than eager's fused attention).
QUERY_BLOCK = 256


def attention_bmm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with 3-D bmm; q (..., N, E), k (..., S, E), v (..., S, Ev)."""
    *batch, n, e = q.shape
    s, ev = k.shape[-2], v.shape[-1]
    q3, k3, v3 = q.reshape(-1, n, e) * scale, k.reshape(-1, s, e), v.reshape(-1, s, ev)  # (B*H, N, E) ...
    k3t = k3.transpose(1, 2)  # (B*H, E, S)
    blocks = []
    for start in range(0, n, QUERY_BLOCK):
        rows = min(QUERY_BLOCK, n - start)
        scores = torch.bmm(q3[:, start:start + rows] if rows < n else q3, k3t)  # (B*H, rows, S)
        if mask is not None:  # broadcast over the batch dims as SDPA does
            rows_mask = mask[..., start:start + rows, :] if mask.shape[-2] == n and rows < n else mask
            scores = (scores.reshape(*batch, rows, s) + rows_mask).reshape(-1, rows, s)
        blocks.append(torch.bmm(torch.softmax(scores, dim=-1), v3))  # (B*H, rows, Ev)
    out = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
    return out.reshape(*batch, n, ev)


def _additive_mask(mask: torch.Tensor | None, n: int, s: int, causal: bool, dtype: torch.dtype
                   ) -> tuple[bool, torch.Tensor | None]:
    """``(exact, mask)``: SDPA's mask as a float to add to the scores, None when it masks nothing.

    Not exact where a row is masked entirely: SDPA's safe softmax gives zeros
    there, a softmax NaNs, so those calls are left as they are.
    """
    if causal:
        mask = torch.ones(n, s, dtype=torch.bool).tril()
    if mask is None:
        return True, None
    if mask.dtype == torch.bool:
        if bool(mask.all()):
            return True, None
        if not bool(mask.any(dim=-1).all()):
            return False, None
        return True, torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    if not bool((mask > float("-inf")).any(dim=-1).all()):
        return False, None
    return True, (mask if bool(mask.any()) else None)


@register_rewrite("attention")
def attention(module: GraphModule) -> int:
    """Replace each scaled_dot_product_attention whose mask is None, causal or a constant by 3-D bmm + softmax.

    Its decomposition runs a 4-D matmul (expand_copy + bmm), scales q and k
    with mul.Scalar, and guards fully masked rows with any/eq/logical_not/
    where/full_like, all outside XNNPACK. A mask that reads the input, dropout,
    and grouped-query attention are left as they are.
    """
    count = 0
    for node in _calls(module, aten.scaled_dot_product_attention.default):
        call = _arguments(node)
        q, k, mask_node = _val(call["query"]), _val(call["key"]), call["attn_mask"]
        mask = _constant(module, mask_node)
        if call["dropout_p"] or call["enable_gqa"] or q is None or k is None:
            continue
        if mask_node is not None and mask is None:  # computed from the input: rows unknown, kept as it is
            continue
        exact, additive = _additive_mask(mask, q.shape[-2], k.shape[-2], call["is_causal"], q.dtype)
        if not exact:
            continue
        scale = 1.0 / math.sqrt(q.shape[-1]) if call["scale"] is None else call["scale"]
        mask_arg = mask_node if additive is mask else (
            None if additive is None else _add_constant(module, additive, node))
        _replace(node, attention_bmm, call["query"], call["key"], call["value"], mask_arg, scale)
        count += 1
    return count


# ---------------------------------------------------------------------------------------------------------------
# layer_norm and mean: XNNPACK reduces only a 4-D tensor over dims [2, 3] with keepdim.

def _as_4d(shape: tuple[int, ...]) -> tuple[int, int]:
    """The two leading sizes of ``shape``'s 4-D form ``(a, b, C, 1)``: its first dim and the rest, flattened."""
    if not shape:
        return 1, 1
    return (1, shape[0]) if len(shape) == 1 else (shape[0], math.prod(shape[1:]))


def layer_norm_explicit(x: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """layer_norm from 4-D means over dims [2, 3] and rsqrt, as ``difftx_edge.model.LayerNorm.explicit``."""
    lead = tuple(x.shape[:x.dim() - len(normalized_shape)])
    x4 = x.reshape(*_as_4d(lead), math.prod(normalized_shape), 1)  # (a, b, C, 1)
    centred = x4 - x4.mean(dim=[2, 3], keepdim=True)
    var = (centred * centred).mean(dim=[2, 3], keepdim=True)
    y = (centred * torch.rsqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


@register_rewrite("layer_norm")
def layer_norm(module: GraphModule) -> int:
    """Replace each layer_norm (and a native_layer_norm whose statistics nobody reads) by mean and rsqrt."""
    count = 0
    for node in _calls(module, aten.layer_norm.default, aten.native_layer_norm.default):
        call = _arguments(node)
        x, args = call["input"], (list(call["normalized_shape"]), call["weight"], call["bias"], call["eps"])
        value = _val(x)
        if value is None or not value.dtype.is_floating_point:
            continue
        if node.target is aten.native_layer_norm.default:
            users = list(node.users)
            if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
                continue
            for user in users:
                _replace(user, layer_norm_explicit, x, *args)
            node.graph.erase_node(node)
        else:
            _replace(node, layer_norm_explicit, x, *args)
        count += 1
    return count


def _reduced_last(x: torch.Tensor, dims: list[int], keepdim: bool) -> tuple[torch.Tensor, list[int]]:
    """``(x as (kept, reduced), shape of the result)``: the reduced dims (sorted, non-negative) moved last and
    flattened, and the shape of a reduction over them with ``keepdim``."""
    kept = [d for d in range(x.dim()) if d not in dims]
    out_shape = [1 if d in dims else x.shape[d] for d in range(x.dim())] if keepdim else [x.shape[d] for d in kept]
    moved = x.permute(*kept, *dims) if kept + dims != list(range(x.dim())) else x
    return moved.reshape(math.prod(x.shape[d] for d in kept), math.prod(x.shape[d] for d in dims)), out_shape


def mean_4d(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    """x.mean(dims, keepdim) as the mean over dims [2, 3] of a 4-D tensor ``(1, kept, reduced, 1)``."""
    flat, out_shape = _reduced_last(x, dims, keepdim)
    return flat.reshape(1, *flat.shape, 1).mean(dim=[2, 3], keepdim=True).reshape(out_shape)


@register_rewrite("mean")
def mean(module: GraphModule) -> int:
    """Replace each float mean not already over dims [2, 3] of a 4-D tensor with keepdim."""
    count = 0
    for node in _calls(module, aten.mean.dim, aten.mean.default):
        call = _arguments(node)
        value = _val(call["input"])
        if value is None or not value.dtype.is_floating_point or value.dim() == 0 or call["dtype"] is not None:
            continue
        dims, keepdim = call.get("dim"), call.get("keepdim", False)  # mean.default has neither: all dims
        dims = list(range(value.dim())) if not dims else sorted(d % value.dim() for d in dims)
        if value.dim() == 4 and dims == [2, 3] and keepdim:
            continue  # delegated as it is
        _replace(node, mean_4d, call["input"], dims, bool(keepdim))
        count += 1
    return count


def amax_pool(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    """x.amax(dims, keepdim) as one 2-D max pooling window over a ``(1, kept, 1, reduced)`` view."""
    flat, out_shape = _reduced_last(x, dims, keepdim)
    pooled = F.max_pool2d(flat.reshape(1, flat.shape[0], 1, flat.shape[1]), (1, flat.shape[1]))  # (1, kept, 1, 1)
    return pooled.reshape(out_shape)


@register_rewrite("amax")
def amax(module: GraphModule) -> int:
    """Replace each float amax (XNNPACK has no reduce-max) by max pooling, which it delegates; max is exact."""
    count = 0
    for node in _calls(module, aten.amax.default):
        call = _arguments(node)
        value = _val(call["input"])
        if value is None or not value.dtype.is_floating_point or value.dim() == 0:
            continue
        dims = list(range(value.dim())) if not call["dim"] else sorted(d % value.dim() for d in call["dim"])
        _replace(node, amax_pool, call["input"], dims, bool(call["keepdim"]))
        count += 1
    return count


# ---------------------------------------------------------------------------------------------------------------
# views: select, split, squeeze and unsqueeze as the slices and reshapes XNNPACK takes.

def select_slice(x: torch.Tensor, dim: int, index: int) -> torch.Tensor:
    """x.select(dim, index) as a one-wide slice and a reshape."""
    shape = [n for d, n in enumerate(x.shape) if d != dim % x.dim()]
    return x.narrow(dim, index % x.shape[dim], 1).reshape(shape)


def narrow_slice(x: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    return x.narrow(dim, start, length)


def reshape_to(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return x.reshape(shape)


_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)


def _split_pieces(node: Node) -> int:
    """Replace each piece a split/chunk/unbind hands out (a getitem) by a slice; returns 1, or 0 if it cannot."""
    pieces, call, users = node.meta.get("val"), _arguments(node), list(node.users)
    if not isinstance(pieces, (list, tuple)) or not all(u.target is operator.getitem for u in users):
        return 0
    x, dim = call["input"], call["dim"]
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + (1 if node.target is aten.unbind.int else piece.shape[dim]))
    for user in users:
        i = user.args[1]
        if node.target is aten.unbind.int:
            _replace(user, select_slice, x, dim, i)
        else:
            _replace(user, narrow_slice, x, dim, starts[i], starts[i + 1] - starts[i])
    node.graph.erase_node(node)
    return 1


@register_rewrite("views")
def views(module: GraphModule) -> int:
    """Replace select by slice + reshape, split/chunk/unbind by slices, squeeze/unsqueeze (not on the last dim) by
    reshape; XNNPACK refuses select_copy, split_with_sizes_copy, squeeze_copy and such an unsqueeze_copy."""
    count = 0
    squeezes = (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default)
    for node in _calls(module, aten.select.int, *squeezes, *_SPLITS):
        call = _arguments(node)
        value, out = _val(call["input"]), _val(node)
        if value is None:
            continue
        if node.target in _SPLITS:
            count += _split_pieces(node)
            continue
        if out is None or (node.target is aten.unsqueeze.default and call["dim"] in (-1, value.dim())):
            continue  # an unsqueeze on the last dim is delegated as it is
        if node.target is aten.select.int:
            _replace(node, select_slice, call["input"], call["dim"], call["index"])
        else:
            _replace(node, reshape_to, call["input"], list(out.shape))
        count += 1
    return count
