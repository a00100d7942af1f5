"""Post-training int8 for any ``torch.export`` program: static PTQ or int8-dynamic, with a format's quantizer.

Installed as ``difftx_edge.quantize.program``. ``difftx-edge quantize`` serves
our own model, whose float modules (attention, LayerNorm) are known by type; a
program of unknown origin has no such types. Here the values themselves decide:
the float program is run on the calibration samples first, and every
annotation that would put an observer on a value int8 cannot represent (an
attention mask of -inf or of ``finfo.min``, a sentinel, a blown-up variance)
is dropped, so that op stays in float. What is left is quantized with the
backend's own quantizer, calibrated, converted and exported again with static
shapes: the program each format's exporter takes.

Example::

    from difftx_edge.quantize.program import quantize_program

    q = quantize_program(torch.export.export(model, (x,)), "xnnpack", [(x,) for x in samples])
    q.program  # static-shape int8 ExportedProgram; q.module is its PyTorch reference
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch

from difftx_edge.quantize import pt2e
from difftx_edge.quantize.registry import get_quantizer_spec, unannotate

log = logging.getLogger("difftx_edge.quantize")

# A value whose magnitude reaches this is no activation an int8 scale should cover: one such value sets
# the step, and every ordinary activation beside it rounds to zero. Masks (-inf, finfo.min, -1e4 .. -1e9)
# and sentinels are the values seen; the largest activations of the zoo models are below 1e3.
REPRESENTABLE = 1e4
SCHEMES = ("static", "dynamic")


@dataclass
class QuantizedProgram:
    """An int8 program and what parity and the manifest read of it.

    Attributes:
        program: the static-shape int8 program, what a format's exporter takes.
        module: the PyTorch int8 program: the parity reference.
        output_step: the output step parity counts in. Static: the scale of the int8 output. Dynamic (float
            output): the step a per-tensor int8 output would have, the range of ``module``'s output over the
            calibration samples / 255 (``facts["output_step_from"]`` says which).
        facts: for the manifest's ``quantization``: quantizer, scheme, weights, calibration samples, the ops
            kept in float because of their values, and the integer and float op counts.
    """

    program: torch.export.ExportedProgram
    module: torch.fx.GraphModule
    output_step: float
    facts: dict


def quantize_program(program: torch.export.ExportedProgram, quantizer: str,
                     calibration: list[tuple[torch.Tensor, ...]], *, dynamic: bool = False) -> QuantizedProgram:
    """Quantize a float program to int8 with backend ``quantizer``'s PT2E quantizer.

    Args:
        program: a float ``torch.export`` program (static or dynamic shapes).
        quantizer: the backend (``xnnpack``, ``litert``, ``onnx``, ``coreml``): a format's ``FormatSpec.quantizer``.
        calibration: samples, each a tuple of tensors in the program's user-input order, all of one shape
            (the batch included); the int8 program is exported at that shape.
        dynamic: int8 weights with activations quantized at run time, instead of static activation scales.

    Returns:
        The :class:`QuantizedProgram`.

    Raises:
        ValueError: an unknown or uninstalled backend, a backend without int8-dynamic, calibration samples
            that do not fit the program or hold NaN or infinity, or an op whose value int8 cannot hold.
    """
    spec = get_quantizer_spec(quantizer)
    spec.require()
    samples = _check_calibration(program, calibration)
    module = program.module()
    if pt2e.is_quantized(module):
        raise ValueError("this program is quantized already (it holds PT2E quantize/dequantize ops): "
                         "convert it as it is, at int8")
    folded = _fold_constant_slices(module)
    trimmed = _trim_constant_lookups(module)
    base = spec.dynamic_quantizer() if dynamic else spec.quantizer(qat=False)
    kept_float: list[str] = []
    prepared = pt2e.prepare(module, _ValueAwareQuantizer(base, samples, kept_float), qat=False)
    with pt2e.refuse_nonfinite(prepared, quantizer):
        with torch.no_grad():
            for sample in samples:
                prepared(*sample)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    # In place, not pt2e.convert's copy: a deep copy leaves the annotations naming the old graph's nodes, and
    # the converter then finds no choose_qparams for a dynamic input.
    converted = convert_pt2e(prepared)
    if spec.int32_bias and not dynamic:  # a dynamic input's scale, and so the bias grid, exists only at run time
        pt2e.snap_biases(converted)
    static = torch.export.export(converted, samples[0])
    step, step_from = _output_step(converted, samples, dynamic)
    facts = {
        "quantizer": quantizer, "runtime": spec.runtime, "scheme": "dynamic" if dynamic else "static",
        "weights": "per-channel int8", "activations": _activations(converted, dynamic),
        "calibration_samples": len(samples), "kept_float": kept_float, "folded_slices": folded,
        "trimmed_tables": trimmed,
        "int8_weights": pt2e.int8_weight_count(converted), "ops": _op_table(converted, dynamic),
        "output_step": step, "output_step_from": step_from,
    }
    return QuantizedProgram(static, converted, step, facts)


def _fold_constant_slices(module: torch.fx.GraphModule) -> int:
    """Replace each slice of a stored tensor by the slice itself, a constant of its own; returns how many.

    A learned position table of 2048 rows read as ``pos[:, :N]``: the float
    exporters fold that slice and store N rows, but once the table is annotated
    int8 it is a quantized constant they no longer fold, and the whole table
    was stored: the int8 .tflite and .mlpackage of a zoo encoder at d_model 32
    came out larger than fp32. At one static shape the slice is a constant.
    """
    aten = torch.ops.aten
    slices = {aten.slice.Tensor, aten.narrow.default, aten.select.int}
    folded = 0
    for node in list(module.graph.nodes):
        source = node.args[0] if node.op == "call_function" and node.target in slices else None
        if not (isinstance(source, torch.fx.Node) and source.op == "get_attr"
                and not any(isinstance(a, torch.fx.Node) for a in node.args[1:])):
            continue
        table = operator.attrgetter(source.target)(module)  # a dotted path: "layers.0.pos"
        name = f"_folded_slice_{folded}"
        module.register_buffer(name, node.target(table, *node.args[1:]).detach().clone())
        with module.graph.inserting_before(node):
            constant = module.graph.get_attr(name)
        constant.meta = dict(node.meta)
        node.replace_all_uses_with(constant)
        module.graph.erase_node(node)
        folded += 1
    if folded:
        module.graph.eliminate_dead_code()
        module.recompile()
    return folded


def _trim_constant_lookups(module: torch.fx.GraphModule) -> int:
    """Give each embedding looked up by constant ids a table of only the rows it reads; returns how many.

    BERT looks its positions up by ``arange(N)`` in a table of 512 rows: at
    N=256 half of it is never read, yet a quantizer that stores the table
    int8 stores all of it (32 KB of BERT's int8 .tflite at hidden 128). Run
    after ``_fold_constant_slices``, which makes such ids a stored constant.
    The ids are renumbered into the smaller table, so every lookup gathers
    the same rows as before.
    """
    aten = torch.ops.aten
    trimmed = 0
    for node in list(module.graph.nodes):
        if node.op != "call_function" or node.target != aten.embedding.default:
            continue
        table, ids = node.args[0], node.args[1]
        if not (isinstance(table, torch.fx.Node) and table.op == "get_attr"
                and isinstance(ids, torch.fx.Node) and ids.op == "get_attr"):
            continue
        stored, index = operator.attrgetter(table.target)(module), operator.attrgetter(ids.target)(module)
        rows = torch.unique(index)
        if len(rows) == stored.shape[0]:
            continue
        names = (f"_trimmed_table_{trimmed}", f"_trimmed_ids_{trimmed}")
        module.register_parameter(names[0], torch.nn.Parameter(stored.detach()[rows].clone(),
                                                               requires_grad=stored.requires_grad))
        module.register_buffer(names[1], torch.searchsorted(rows, index))
        with module.graph.inserting_before(node):
            new_table, new_ids = (module.graph.get_attr(name) for name in names)
        node.args = (new_table, new_ids, *node.args[2:])
        trimmed += 1
    if trimmed:
        module.graph.eliminate_dead_code()
        module.recompile()
    return trimmed


def _check_calibration(program: torch.export.ExportedProgram, calibration) -> list[tuple[torch.Tensor, ...]]:
    """The samples as tuples, each checked against the program's inputs; raises ValueError at the first misfit."""
    inputs = [node for node in program.graph.nodes if node.op == "placeholder"
              and node.name in set(program.graph_signature.user_inputs)]
    if not calibration:
        raise ValueError("no calibration samples: give at least one tuple of input tensors (16 or more is better)")
    samples = []
    for i, sample in enumerate(calibration):
        sample = tuple(sample) if isinstance(sample, (tuple, list)) else (sample,)
        if len(sample) != len(inputs):
            raise ValueError(f"calibration sample {i} has {len(sample)} tensors, the program takes {len(inputs)} "
                             f"({', '.join(n.name for n in inputs)})")
        for tensor, node in zip(sample, inputs):
            expected = node.meta["val"]
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"calibration sample {i}: input {node.name} is a {type(tensor).__name__}, "
                                 "not a tensor")
            if tensor.dtype != expected.dtype or tensor.dim() != expected.dim():
                raise ValueError(f"calibration sample {i}: input {node.name} is {tensor.dtype} of rank "
                                 f"{tensor.dim()}, the program takes {expected.dtype} of rank {expected.dim()}")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"calibration sample {i}: input {node.name} holds NaN or infinite values, which "
                                 "no int8 scale can represent: calibrate with finite inputs")
        if samples and [t.shape for t in sample] != [t.shape for t in samples[0]]:
            raise ValueError(f"calibration sample {i} has shapes {[list(t.shape) for t in sample]}, sample 0 "
                             f"{[list(t.shape) for t in samples[0]]}: the int8 program has one static shape")
        samples.append(sample)
    return samples


class _ValueAwareQuantizer:
    """A backend quantizer whose annotations skip every value int8 cannot represent.

    Wraps the backend's quantizer (prepare_pt2e calls these four methods). After
    the backend annotated the graph, the graph runs on the calibration samples
    in float, and an annotation whose observed values (the op's inputs or its
    output) hold NaN, infinity or a magnitude of ``REPRESENTABLE`` or more is
    dropped, with every annotation that shares its quantization parameters:
    those ops compute in float.
    """

    def __init__(self, base, samples, kept_float: list[str]) -> None:
        self.base, self.samples, self.kept_float = base, samples, kept_float

    def transform_for_annotation(self, model):
        return self.base.transform_for_annotation(model)

    def annotate(self, model):
        self.base.annotate(model)
        _calibration_observers(model)
        bad = _unrepresentable(model, self.samples)
        dropped = unannotate(model, lambda node: _observes(node, bad) or _weight_only_conv(node))
        self.kept_float.extend(sorted(pt2e.op_name(n) + f" ({n.name})" for n in dropped))
        if dropped:
            log.info("kept in float, their values beyond int8: %s", ", ".join(self.kept_float))
        return model

    def validate(self, model) -> None:
        self.base.validate(model)

    def prepare_obs_or_fq_callback(self, model, edge_or_node_to_obs_or_fq) -> None:
        self.base.prepare_obs_or_fq_callback(model, edge_or_node_to_obs_or_fq)


def _unrepresentable(model: torch.fx.GraphModule, samples) -> set[torch.fx.Node]:
    """The nodes whose value, on any sample, is not a float tensor int8 can hold.

    That is a value that holds NaN, infinity or a magnitude of REPRESENTABLE
    or more, or one of integers or booleans (position ids, masks): the Core ML
    quantizer annotates those too, and its fake-quant fails on them.
    """
    bad: set[torch.fx.Node] = set()

    class Probe(torch.fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if isinstance(value, torch.Tensor) and (not value.is_floating_point() or (
                    value.numel() and not bool((value.abs() < REPRESENTABLE).all()))):
                bad.add(node)
            return value

    with torch.no_grad():
        for sample in samples:
            Probe(model).run(*sample)
    return bad


def _calibration_observers(model: torch.fx.GraphModule) -> None:
    """Swap each moving-average observer of the annotations for its min/max twin, in place.

    A moving average (the Core ML quantizer's default, built for QAT) moves 1 %
    of the way to each new range: over 32 single-sample calibration batches its
    range stayed near the first sample's, clipped the logits of the others and
    cost 5-20 % top-1 on zoo models. PTQ sees each sample once and wants the
    range over all of them.
    """
    import dataclasses

    from torchao.quantization.pt2e import (
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        PerChannelMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    twins = {MovingAverageMinMaxObserver: MinMaxObserver,
             MovingAveragePerChannelMinMaxObserver: PerChannelMinMaxObserver}

    def swap(spec):
        ctor = getattr(spec, "observer_or_fake_quant_ctr", None) if isinstance(spec, QuantizationSpec) else None
        partial = getattr(ctor, "p", None)
        if partial is None:
            return spec
        if partial.func in twins:  # an observer
            return dataclasses.replace(spec, observer_or_fake_quant_ctr=twins[partial.func].with_args(
                **partial.keywords))
        if partial.keywords.get("observer") in twins:  # a fake-quant around one
            keywords = {**partial.keywords, "observer": twins[partial.keywords["observer"]]}
            return dataclasses.replace(spec, observer_or_fake_quant_ctr=partial.func.with_args(**keywords))
        return spec

    for node in model.graph.nodes:
        annotation = node.meta.get(Q_ANNOTATION_KEY)
        if annotation is None:
            continue
        annotation.input_qspec_map = {source: swap(spec) for source, spec in annotation.input_qspec_map.items()}
        annotation.output_qspec = swap(annotation.output_qspec)


def _observes(node: torch.fx.Node, bad: set[torch.fx.Node]) -> bool:
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    annotation = node.meta[Q_ANNOTATION_KEY]
    observed = set(annotation.input_qspec_map)
    if annotation.output_qspec is not None:
        observed.add(node)
    return bool(observed & bad)


_CONVOLUTIONS = ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution")


def _weight_only_conv(node: torch.fx.Node) -> bool:
    """A convolution whose weight alone is annotated (the backend's weight-only tables), its input left float.

    Such a conv is no integer kernel anywhere; the XNNPACK delegate lowered the
    dequantize of its weight into a .pte that computed wrong values (cnn-1d at
    int8-dynamic, whose conv1d the dynamic quantizer leaves float). It stays float.
    """
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    annotation = node.meta[Q_ANNOTATION_KEY]
    return (pt2e.op_name(node) in _CONVOLUTIONS and annotation.output_qspec is None
            and all(source.op == "get_attr" for source in annotation.input_qspec_map))


def _activations(converted: torch.fx.GraphModule, dynamic: bool) -> str:
    """How the program's activations are quantized, as its graph says."""
    if not dynamic:
        return "int8, scale per tensor from calibration"
    if any(n.target == torch.ops.quantized_decomposed.choose_qparams.tensor for n in converted.graph.nodes):
        return "int8, scale per tensor computed at run time"
    # LiteRT's dynamic quantizer leaves activations unannotated; its converter makes the weight-only int8
    # layers hybrid kernels (measured: XNNPACK ran them within 2.4e-7 of this float-activation program).
    return "float: the program stores int8 weights only; the format's converter picks its hybrid kernels"


def _op_table(converted: torch.fx.GraphModule, dynamic: bool) -> dict[str, dict[str, int]]:
    """``pt2e.op_table``, where int8-dynamic counts as integer each op fed by a run-time quantized input.

    Such an op (a dynamic Linear) has a float output, which op_table's static
    pattern (dequantize in, quantize out) counts as float.
    """
    table = pt2e.op_table(converted)
    if not dynamic:
        return table
    run_time = torch.ops.quantized_decomposed.dequantize_per_tensor.tensor
    integer, floats = dict(table["integer"]), dict(table["float"])
    for node in converted.graph.nodes:
        if node.op == "call_function" and any(a.target == run_time for a in node.all_input_nodes):
            name = pt2e.op_name(node)
            integer[name] = integer.get(name, 0) + 1
            floats[name] -= 1
    return {"integer": dict(sorted(integer.items())),
            "float": dict(sorted((k, v) for k, v in floats.items() if v))}


def _output_step(converted: torch.fx.GraphModule, samples, dynamic: bool) -> tuple[float, str]:
    step = None if dynamic else pt2e.output_step(converted)
    if step is not None:
        return step, "the scale of the int8 output"
    with torch.no_grad():
        outputs = [converted(*sample) for sample in samples]
    outputs = torch.stack([(y[0] if isinstance(y, (tuple, list)) else y).float() for y in outputs])
    step = float(outputs.max() - outputs.min()) / 255
    if step <= 0:
        raise ValueError("the int8 program's output is constant over the calibration samples, so it has no output "
                         "step to count parity in: calibrate with varied inputs")
    return step, ("the range of the int8 program's float output over the calibration samples / 255: the step "
                  "a per-tensor int8 output would have" + ("" if dynamic else " (its output is not int8)"))
