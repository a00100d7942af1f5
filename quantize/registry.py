"""The quantizer registry: one entry per backend, each in its own module.

An entry only names what it needs; the backend's packages are imported when
its quantizer is built, never at registration, so ``import difftx_edge`` stays
light and a missing extra is reported as one line naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from difftx_edge.extras import missing_modules, require_extra


@dataclass(frozen=True)
class QuantizerSpec:
    """A backend's PT2E quantizer.

    Attributes:
        name: the backend name used by ``--backend``.
        extra: the pip extra that installs what it needs.
        requires: importable modules the quantizer needs.
        runtime: where its integer kernels run.
        int32_bias: whether those kernels add a Linear's bias as int32 (``pt2e.snap_biases``).
        build: ``build(qat: bool, dynamic: bool = False) -> Quantizer``, leaving ``float_module_types()`` in
            float; ``dynamic`` (int8 weights, activations quantized at run time) only where ``dynamic`` is set.
        dynamic: whether the backend's toolchain takes int8-dynamic programs.
    """

    name: str
    extra: str
    requires: tuple[str, ...]
    runtime: str
    int32_bias: bool
    build: Callable
    dynamic: bool = False

    def missing(self) -> list[str]:
        return missing_modules(self.requires)

    def installed(self) -> bool:
        return not self.missing()

    def require(self) -> None:
        """Raises ValueError, naming the pip extra, when the backend's packages are not installed."""
        require_extra(f"backend {self.name}", self.requires, self.extra)

    def quantizer(self, qat: bool):
        """The backend's quantizer (fake-quant modules for QAT, observers for PTQ)."""
        self.require()
        return self.build(qat)

    def dynamic_quantizer(self):
        """The backend's int8-dynamic quantizer (PTQ); raises ValueError where its toolchain has none."""
        if not self.dynamic:
            raise ValueError(f"backend {self.name} does not support int8-dynamic (its toolchain takes no "
                             "activations quantized at run time): use int8")
        self.require()
        return self.build(qat=False, dynamic=True)


QUANTIZERS: dict[str, QuantizerSpec] = {}


def register_quantizer(name: str, *, extra: str, requires: tuple[str, ...], runtime: str, int32_bias: bool,
                       dynamic: bool = False):
    """Register ``build(qat, dynamic=False) -> Quantizer`` as backend ``name``; returns the function unchanged."""

    def wrap(build: Callable) -> Callable:
        QUANTIZERS[name] = QuantizerSpec(name, extra, tuple(requires), runtime, int32_bias, build, dynamic)
        return build

    return wrap


def get_quantizer_spec(name: str) -> QuantizerSpec:
    """Raises ValueError naming the known backends when ``name`` is not one."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown backend {name!r}: use one of {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[name]


def float_module_types() -> list[type]:
    """Module types kept in float on every backend: the attention kinds and LayerNorm.

    Attention masks hold -inf and the eps-softmax's probabilities span many
    orders of magnitude; an int8 observer can represent neither (the mask's
    scale would flatten attention to uniform). LayerNorm, exported as
    mean/rsqrt for XNNPACK, would otherwise have its variance quantized: a
    small variance plus eps rounds to 0 and rsqrt returns inf.
    """
    from difftx_edge.model import ATTENTION, LayerNorm

    return [*dict.fromkeys(ATTENTION.values()), LayerNorm]


def in_float_module(node) -> bool:
    """Whether an exported graph node was traced inside one of ``float_module_types()``."""
    names = {qualified_name(kind) for kind in float_module_types()}  # per call: attention kinds can be added later
    stack = (node.meta.get("nn_module_stack") or {}).values()
    return any((qualified_name(t) if isinstance(t, type) else t) in names for _, t in stack)


def unannotate_float_modules(graph) -> int:
    """Drop every quantization annotation inside ``float_module_types()``; returns how many went.

    Some annotators ignore the module filter a quantizer was given: XNNPACK's
    cat annotator quantizes every cat, and its propagation pass then quantizes
    the reshapes and means around it, so a float module ends up with int8 cats
    of attention scores.
    """
    return len(unannotate(graph, in_float_module))


def unannotate(graph, drop: Callable) -> list:
    """Drop the quantization annotation of every node where ``drop(node)`` holds; returns the nodes it left.

    Annotations elsewhere that share qparams with a removed one go too, since
    their source no longer exists.
    """
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    def shares_with(annotation, gone: set) -> bool:
        specs = [annotation.output_qspec, *annotation.input_qspec_map.values()]
        for spec in specs:
            if isinstance(spec, SharedQuantizationSpec):
                edge = spec.edge_or_node
                if any(n in gone for n in (edge if isinstance(edge, tuple) else (edge,))):
                    return True
        return False

    annotated = [n for n in graph.graph.nodes if Q_ANNOTATION_KEY in n.meta]
    gone = {n for n in annotated if drop(n)}
    while True:
        more = {n for n in annotated if n not in gone and shares_with(n.meta[Q_ANNOTATION_KEY], gone)}
        if not more:
            break
        gone |= more
    for node in gone:
        del node.meta[Q_ANNOTATION_KEY]
    return [n for n in annotated if n in gone]


def share_through_moves(graph) -> int:
    """Quantize the output of each op that only moves values (zero padding, flatten, views, eval-mode dropout)
    with its input's scale and zero point, and have its readers use them too; returns how many ops.

    Left to the backend's annotators, such an op sits between its input's
    dequantize and its reader's own quantize, a requantization to other
    qparams, and the converters fold it into an integer op that assumes none:
    coremltools' ``int_op_canonicalization`` turned MobileNetV2's
    ``dequantize -> flatten -> quantize`` into one int8 reshape that kept the
    first scale and read it with the second (the logits 250 output steps off),
    each zero pad between a ReLU6 and a convolution requantized onto a grid
    half as fine, flipping ties wherever the runtime rounds differently, and
    litert-torch refused such a pad outright ("Attempting to convert non-NHWC
    compatible node to NHWC: dequantize_per_tensor"). Shared, there is nothing
    to requantize: zero lies on every affine int8 grid, so a zero pad is exact.
    Only constant pads of zero are shared. Not for XNNPACK (ExecuTorch): its
    own quantizer shares the views already, and with shared pads the .pte of a
    32 px MobileNetV2 went from 0 to 9 output steps off its PyTorch program.
    """
    import torch
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    aten = torch.ops.aten
    moves = {aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten.squeeze.dim,
             aten.unsqueeze.default, aten.dropout.default, aten.dropout_.default}

    def zero_pad(node) -> bool:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        return node.target == aten.pad.default and mode == "constant" and not value

    shared = 0
    for node in graph.graph.nodes:
        if node.op != "call_function" or not (node.target in moves or zero_pad(node)) or in_float_module(node):
            continue  # a view inside attention or LayerNorm stays float with its module
        source = node.args[0]
        annotation = source.meta.get(Q_ANNOTATION_KEY) if isinstance(source, torch.fx.Node) else None
        if annotation is None or annotation.output_qspec is None:
            continue  # a float input stays float through the move
        spec = SharedQuantizationSpec(source)
        node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map={source: spec}, output_qspec=spec,
                                                             _annotated=True)
        for reader in node.users:
            reads = reader.meta.get(Q_ANNOTATION_KEY)
            if reads is not None and node in reads.input_qspec_map:
                reads.input_qspec_map[node] = SharedQuantizationSpec(node)
        shared += 1
    return shared


def int8_weight_spec(qat: bool, per_channel: bool, quant_max: int = 127):
    """Symmetric int8 for a weight or a float table: per row when ``per_channel``, fake-quantized under QAT.

    ``quant_max`` narrows the grid to ``[-quant_max, quant_max]`` for kernels that need headroom.
    """
    import torch
    from torchao.quantization.pt2e import (
        FakeQuantize,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        PerChannelMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    if per_channel:
        observer, scheme, axis = (MovingAveragePerChannelMinMaxObserver if qat else PerChannelMinMaxObserver,
                                  torch.per_channel_symmetric, 0)
    else:
        observer = MovingAverageMinMaxObserver if qat else MinMaxObserver
        scheme, axis = torch.per_tensor_symmetric, None
    ctor = observer.with_args(eps=2 ** -12)
    if qat:
        ctor = FakeQuantize.with_args(observer=observer, eps=2 ** -12)
    return QuantizationSpec(dtype=torch.int8, quant_min=-quant_max, quant_max=quant_max, qscheme=scheme, ch_axis=axis,
                            observer_or_fake_quant_ctr=ctor)


def annotate_float_tables(graph, spec, *, leading_one: bool = True) -> int:
    """Store as int8 (weight-only, ``spec``) every parameter table the backend's annotations left float.

    These are the learned position table and the low-rank projections: they
    grow with max_len, and in float they made up most of an int8 .tflite or
    .onnx at N=1024. The ops that read them keep computing in float: only the
    stored values are rounded, to a step of max|row| / 127. Linear weights are
    already annotated and 1-D vectors are too small to matter. Embedding
    tables are left to ``annotate_embedding_tables``: dequantized whole on every
    inference, as some runtimes would, a table is a vocabulary's worth of work
    per lookup, so their formats look up int8 rows instead.
    ``leading_one=False`` leaves float the tables whose first dimension is 1,
    for a backend that computes them wrong (see ``store_leading_ones_flat``).
    Returns how many tables were annotated.
    """
    import torch
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    aten = torch.ops.aten
    views = {aten.slice.Tensor, aten.narrow.default, aten.view.default, aten.reshape.default, aten.t.default,
             aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.clone.default}

    def quantized_downstream(node) -> bool:
        """Whether the backend quantizes this value already, directly or after slices and views of it."""
        for user in node.users:
            if node in getattr(user.meta.get(Q_ANNOTATION_KEY), "input_qspec_map", {}):
                return True  # an int8 add's input, a Linear's weight
            if user.target in views and quantized_downstream(user):
                return True
        return False

    parameters = dict(graph.named_parameters())
    annotated = 0
    for node in graph.graph.nodes:
        table = parameters.get(node.target) if node.op == "get_attr" else None
        if table is None or table.dim() < 2 or (not leading_one and table.shape[0] == 1):
            continue
        users = list(node.users)
        if any(u.target == torch.ops.aten.embedding.default for u in users):
            continue
        if quantized_downstream(node):
            continue  # rounding it twice, weight-only and then as an activation, would only add error
        for user in users:
            _quantize_input(user, node, spec)
        annotated += 1
    return annotated


def store_leading_ones_flat(graph) -> int:
    """Store each table of leading dimension 1 as its rows, a parameter of that shape read through
    ``unsqueeze``; returns how many. In place, on a graph about to be annotated.

    litert-torch computes an int8 constant of shape ``(1, N, d)`` wrong:
    HF ViT's ``(1, 257, 128)`` position table, stored int8, put the .tflite
    54 output steps from its PyTorch program, per channel or per tensor alike,
    and float it was 0. The same rows stored as ``(N, d)`` and unsqueezed are
    right (2 steps, ViT at 128 px), and ``annotate_float_tables`` stores them
    int8, one scale per row, where before they stayed float: the zoo encoder's
    folded ``(1, 256, 128)`` position slice was 131 KB of its int8 .tflite.
    Tables that are one row once flattened (a class token) stay as they are.
    """
    import operator

    import torch

    flattened = 0
    for node in list(graph.graph.nodes):
        if node.op != "get_attr":
            continue
        table = operator.attrgetter(node.target)(graph)
        if not isinstance(table, torch.Tensor) or table.dim() < 3 or table.shape[0] != 1:
            continue
        rows = table.detach().reshape(table.shape[1:])
        if rows.shape[0] == 1:
            continue
        name = f"_flat_{node.target.replace('.', '_')}"
        graph.register_parameter(name, torch.nn.Parameter(rows.clone(), requires_grad=table.requires_grad))
        with graph.graph.inserting_after(node):
            stored = graph.graph.get_attr(name)
        with graph.graph.inserting_after(stored):
            unsqueezed = graph.graph.call_function(torch.ops.aten.unsqueeze.default, (stored, 0))
        node.replace_all_uses_with(unsqueezed)
        graph.graph.erase_node(node)
        flattened += 1
    if flattened:
        graph.recompile()
    return flattened


def annotate_embedding_tables(graph, spec, *, constant_ids: bool) -> int:
    """Store each token embedding table as int8, weight-only (``spec``, per row); returns how many.

    No quantizer annotates ``aten.embedding``, and a 1000 x 128 vocabulary
    left in float was half of an int8 Transformer's artifact. Only the stored
    table is rounded: the lookup gathers its rows dequantized to float, and
    the ops after it are quantized as before. The formats turn the pair into
    an int8 lookup that dequantizes only the rows gathered (ExecuTorch's
    ``embedding_byte``, LiteRT's int8 ``EMBEDDING_LOOKUP``). A lookup by ids
    that depend on no input (BERT's position and token-type ids) is a
    constant, which the mobile rewrites fold away: ``constant_ids=False``
    leaves its table float for a backend that then stores the folded rows
    int8 itself (XNNPACK's int8 add takes them as its int8 input).
    """
    import torch

    parameters = dict(graph.named_parameters())
    annotated = 0
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.embedding.default:
            continue
        table = node.args[0]
        stored = parameters.get(table.target) if table.op == "get_attr" else None
        if stored is None or stored.dim() != 2 or not (constant_ids or _reads_an_input(node.args[1])):
            continue
        _quantize_input(node, table, spec)
        annotated += 1
    return annotated


def _quantize_input(node, value, spec) -> None:
    """Annotate ``node``'s input ``value`` with ``spec``, beside whatever the backend annotated on ``node``."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    annotation = node.meta.get(Q_ANNOTATION_KEY)
    if annotation is None:
        node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map={value: spec}, _annotated=True)
    else:
        annotation.input_qspec_map[value] = spec


def _reads_an_input(node) -> bool:
    """Whether a graph value depends on one of the program's inputs (else it is a constant)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            return True
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return False


def qualified_name(cls: type) -> str:
    """How torch.export's ``nn_module_stack`` names a module type: some quantizers' filters compare strings."""
    return f"{cls.__module__}.{cls.__qualname__}"
