"""The PT2E flow shared by every backend: export, prepare, calibrate or train, convert, inspect.

Backends differ only in the quantizer they hand in. The functions here import
torchao inside their bodies, so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from collections import Counter

import torch
import torch.nn.functional as F

# The largest batch a quantized program accepts; export specialises on nothing below it.
MAX_BATCH = 1024


def consistent_fake_quant(config):
    """The same QuantizationConfig with fake-quant modules that convert_pt2e reproduces exactly.

    The stock QAT configs of the XNNPACK and LiteRT quantizers use
    ``FusedMovingAvgObsFakeQuantize``. Its per-channel symmetric weight
    fake-quant keeps affine qparams during training (zero points of -127..127,
    half the scale), while ``convert_pt2e`` computes symmetric ones with zero
    point 0: the converted model then disagrees with the trained one by 4-8
    output steps. ``FakeQuantize`` with the same observer computes the same
    qparams as convert, and the two agree exactly. Observer-only (PTQ) specs
    pass through unchanged.
    """
    from torchao.quantization.pt2e import FakeQuantize, FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver

    def fix(spec):
        ctor = getattr(spec, "observer_or_fake_quant_ctr", None)
        if ctor is None or getattr(ctor, "p", None) is None or ctor.p.func is not FusedMovingAvgObsFakeQuantize:
            return spec
        kwargs = {"observer": MovingAverageMinMaxObserver, **ctor.p.keywords}
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=FakeQuantize.with_args(**kwargs))

    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{name: fix(value) for name, value in fields.items()
                                          if dataclasses.is_dataclass(value)})


def export_for_quantization(model: torch.nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """The eval-mode model as an ATen graph with a dynamic batch dimension.

    A batch-1 example would specialise the batch to a constant; the example
    needs at least 2 rows.
    """
    from torch.export import Dim

    if example.shape[0] < 2:
        raise ValueError("the example batch for export needs at least 2 rows")
    batch = Dim("batch", min=1, max=MAX_BATCH)
    return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},)).module()


def prepare(graph: torch.fx.GraphModule, quantizer, *, qat: bool) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    return (prepare_qat_pt2e if qat else prepare_pt2e)(graph, quantizer)


def observed_nodes(prepared: torch.fx.GraphModule):
    """``(module, observed_node)`` for every observer or fake-quant the prepare step inserted."""
    for node in prepared.graph.nodes:
        if node.op == "call_module" and "activation_post_process" in str(node.target):
            yield prepared.get_submodule(node.target), node.args[0]


@contextlib.contextmanager
def refuse_nonfinite(prepared: torch.fx.GraphModule, backend: str):
    """Stop, naming the op, as soon as an observer is handed a value int8 cannot represent.

    The observers themselves fail in three different ways: a histogram
    observer drops the batch with a warning (silently wrong scales), min/max
    observers store -inf, and fake-quant asserts on NaN. This hook sees the
    tensor first.

    Raises:
        ValueError: naming the op, the module it came from, and why.
    """
    def check(node: torch.fx.Node):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor) and not torch.isfinite(args[0]).all():
                raise ValueError(
                    f"backend {backend} cannot quantize op {op_name(node)} in {module_path(node)}: its output "
                    "holds infinite or NaN values (an attention mask?), which an int8 scale cannot represent; "
                    "that module has to stay in float")
        return hook

    handles = [module.register_forward_pre_hook(check(node)) for module, node in observed_nodes(prepared)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def module_path(node: torch.fx.Node) -> str:
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path]
    return paths[-1] if paths else "the top-level model"


def op_name(node: torch.fx.Node) -> str:
    return str(node.target).removesuffix(".default").removesuffix(".Tensor")


def calibrate(prepared: torch.fx.GraphModule, batches) -> None:
    with torch.no_grad():
        for x in batches:
            prepared(x)


def qat_finetune(prepared: torch.fx.GraphModule, inputs: torch.Tensor, targets: torch.Tensor, *, steps: int,
                 batch_size: int, lr: float, freeze_at: int, label_smoothing: float, grad_clip: float, seed: int,
                 select_every: int, score, on_step=None) -> tuple[torch.fx.GraphModule, dict]:
    """Fine-tune a QAT-prepared graph with fake quantization and keep its best frozen snapshot.

    Adam with a cosine decay from ``lr``; observers freeze from step
    ``freeze_at``. Every ``select_every`` steps, and before the first, a copy
    is frozen (eval mode, observers off: exactly what convert will compute)
    and scored with ``score(graph)``, a number or a list compared in order
    (higher is better, e.g. validation accuracy, then minus the validation
    loss); the best copy is returned. A small training split
    lets fake-quant fine-tuning overfit, and this keeps QAT from ending worse
    than where it started.

    Returns:
        ``(best frozen graph, info)`` with the per-step losses and the scores.
    """
    from torchao.quantization.pt2e import disable_observer, move_exported_model_to_train

    def snapshot(step: int):
        with warnings.catch_warnings():  # torch's own treespec pickling warns on every deepcopy of a graph
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            frozen = copy.deepcopy(prepared)
        freeze(frozen)
        return frozen, score(frozen)

    best, best_score = snapshot(0)
    scores, best_step = [{"step": 0, "score": best_score}], 0
    move_exported_model_to_train(prepared)
    params = [p for p in prepared.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order, cursor, losses = torch.randperm(len(inputs), generator=generator), 0, []
    for step in range(steps):
        if step == freeze_at:
            prepared.apply(disable_observer)
        if cursor + batch_size > len(order):  # a fresh shuffle each pass over the data
            order, cursor = torch.randperm(len(inputs), generator=generator), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        logits = prepared(inputs[idx])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[idx].reshape(-1),
                               label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, loss.item())
        if (step + 1) % select_every == 0 or step + 1 == steps:
            candidate, candidate_score = snapshot(step + 1)
            scores.append({"step": step + 1, "score": candidate_score})
            if candidate_score >= best_score:  # on an exact tie the longer-trained snapshot wins
                best, best_score, best_step = candidate, candidate_score, step + 1
    return best, {"losses": losses, "scores": scores, "best_step": best_step}


def freeze(prepared: torch.fx.GraphModule) -> None:
    """Eval mode with observers off: the state in which a prepared graph predicts what convert will compute."""
    from torchao.quantization.pt2e import disable_observer, move_exported_model_to_eval

    move_exported_model_to_eval(prepared)
    prepared.apply(disable_observer)


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The quantized graph: int8 weight constants and explicit quantize/dequantize around integer ops."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        prepared = copy.deepcopy(prepared)
    return convert_pt2e(prepared)


def snap_biases(graph: torch.fx.GraphModule) -> int:
    """Round the float bias of every int8 Linear to the int32 grid of integer kernels; returns how many.

    TFLite, XNNPACK and ONNX Runtime add an integer Linear's bias as int32 at
    scale ``input_scale * weight_scale`` per output channel, while
    ``convert_pt2e`` leaves it in float. The difference is a fraction of an
    output step, but it flips occasional roundings, and the float LayerNorms,
    attention and residuals between int8 layers grew those flips to 3-5 output
    steps at the logits of a LiteRT model. On the grid, the graph and the
    kernels add the same bias. The scale is the float32 product the converters
    compute; snapping twice changes nothing. Core ML keeps float biases, so its
    backend does not snap.
    """
    snapped = 0
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.linear.default or len(node.args) < 3:
            continue
        x, w, b = node.args[:3]
        if not (isinstance(b, torch.fx.Node) and b.op == "get_attr" and _is_quant(x, "dequantize")
                and _is_quant(w, "dequantize") and "per_tensor" in str(x.target)):
            continue
        x_scale, w_scale = (_attr(graph, s) if isinstance(s, torch.fx.Node) else s for s in (x.args[1], w.args[1]))
        scale = (torch.as_tensor(x_scale, dtype=torch.float32) * torch.as_tensor(w_scale, dtype=torch.float32))
        bias = _attr(graph, b)
        with torch.no_grad():
            bias.copy_((torch.round(bias.double() / scale.double()) * scale.double()).to(bias.dtype))
        snapped += 1
    return snapped


# -----------------------------------------------------------------------------
# Inspecting a converted graph


def _is_quant(node: torch.fx.Node, kind: str) -> bool:
    return node.op == "call_function" and str(node.target).startswith(f"quantized_decomposed.{kind}_per_")


def _attr(graph: torch.fx.GraphModule, node: torch.fx.Node):
    if node.op != "get_attr":
        return None
    value = graph
    for part in node.target.split("."):
        value = getattr(value, part)
    return value


# Ops that only move or view data, or do nothing in eval mode: the table leaves them out.
_LAYOUT = {"aten.dropout", "aten.lift_fresh_copy", "aten.to.device", "aten.to.dtype", "aten.alias",
           "aten.view", "aten.reshape", "aten.permute", "aten.transpose.int", "aten.slice.Tensor", "aten.t",
           "aten.unsqueeze", "aten.squeeze.dim", "aten.narrow", "aten.expand", "aten.clone", "aten.contiguous",
           "aten.select.int", "aten._assert_tensor_metadata", "aten.sym_size.int"}


# Activations a backend fuses into the integer op before them (linear + gelu, add + relu).
_FUSED_ACTIVATIONS = {"aten.relu", "aten.gelu", "aten.hardtanh", "aten.sigmoid", "aten.tanh", "aten.silu"}


def op_table(graph: torch.fx.GraphModule) -> dict[str, dict[str, int]]:
    """Which compute ops of a converted graph run on int8 and which stay float.

    An op counts as integer when its activation inputs come from dequantize
    nodes and its outputs go to quantize nodes, directly or through one
    activation the backend fuses into it: the pattern each backend replaces
    with an integer kernel. Layout-only ops (views, permutes, slices) and
    eval-mode no-ops are left out.

    Returns:
        ``{"integer": {op: count}, "float": {op: count}}``.
    """
    def quantized_out(node: torch.fx.Node, fused_ok: bool = True) -> bool:
        return bool(node.users) and all(
            _is_quant(u, "quantize") or (fused_ok and op_name(u) in _FUSED_ACTIVATIONS and quantized_out(u, False))
            for u in node.users)

    table, integer = {"integer": Counter(), "float": Counter()}, set()
    for node in graph.graph.nodes:
        if node.op != "call_function" or _is_quant(node, "quantize") or _is_quant(node, "dequantize"):
            continue
        name = op_name(node)
        if name in _LAYOUT or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        # Constants fed straight in (a Linear's float bias) are the backend's to convert, not activations.
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        fused = name in _FUSED_ACTIVATIONS and len(inputs) == 1 and inputs[0] in integer
        if fused or (inputs and all(_is_quant(a, "dequantize") for a in inputs) and quantized_out(node)):
            integer.add(node)
        table["integer" if node in integer else "float"][name] += 1
    return {kind: dict(sorted(counts.items())) for kind, counts in table.items()}


def linear_weights(graph: torch.fx.GraphModule) -> list[dict]:
    """Every ``aten.linear`` of a converted graph with the dtype its weight is stored in."""
    rows = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
            continue
        weight = node.args[1]
        stored = _attr(graph, weight.args[0]) if _is_quant(weight, "dequantize") else _attr(graph, weight)
        rows.append({"node": node.name, "module": module_path(node),
                     "dtype": str(stored.dtype).removeprefix("torch.") if stored is not None else "computed",
                     "shape": list(stored.shape) if stored is not None else None,
                     "per_channel": _is_quant(weight, "dequantize") and "per_channel" in str(weight.target)})
    return rows


def int8_weight_count(graph: torch.fx.GraphModule) -> int:
    """Elements stored as int8 in the graph's constants."""
    return sum(t.numel() for t in _constants(graph) if t.dtype == torch.int8)


def _constants(graph: torch.fx.GraphModule):
    seen = set()
    for node in graph.graph.nodes:
        value = _attr(graph, node)
        if isinstance(value, torch.Tensor) and node.target not in seen:
            seen.add(node.target)
            yield value


def is_quantized(graph: torch.fx.GraphModule) -> bool:
    """Whether ``graph`` holds PT2E quantize or dequantize ops: a program quantized already."""
    return any(_is_quant(node, "quantize") or _is_quant(node, "dequantize") for node in graph.graph.nodes)


def output_step(graph: torch.fx.GraphModule) -> float | None:
    """The scale of the quantized output, when the graph's output comes straight from a dequantize."""
    (out,) = [n for n in graph.graph.nodes if n.op == "output"]
    result = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    if not _is_quant(result, "dequantize") or "per_tensor" not in str(result.target):
        return None
    scale = result.args[1]
    return float(_attr(graph, scale)) if isinstance(scale, torch.fx.Node) else float(scale)
