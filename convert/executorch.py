"""ExecuTorch: a .pte lowered with the XNNPACK partitioner."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from difftx_edge.convert.registry import register_format

if TYPE_CHECKING:
    import numpy as np


# A .pte stores no tensor names, so the bundle keeps the program's I/O (no artifact_io).
@register_format("executorch", filename="model.pte", precisions=("fp32", "int8", "int8-dynamic"), quantizer="xnnpack",
                 extra="executorch", requires=("executorch",), rewrites=True,
                 manifest_keys={"delegation": "what the XNNPACK delegate took, and what it left out"})
def export(program, path: Path, precision: str, options: dict) -> dict:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if precision != "fp32":
        fuse_int8_embeddings(program)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    delegation = delegation_figures(edge.exported_program().graph_module)
    Path(path).write_bytes(edge.to_executorch().buffer)
    return {"delegation": delegation}


def delegation_figures(graph_module) -> dict:
    """Delegated and total compute ops and the XNNPACK partition count of a lowered graph."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    frame = info.get_operator_delegation_dataframe()
    frame = frame[frame["op_type"] != "Total"]
    # getitem only unpacks the delegate's outputs; the embedding lookup is reported, not hidden.
    compute = frame[frame["op_type"] != "getitem"]
    outside = {row.op_type: int(row.occurrences_in_non_delegated_graphs)
               for row in compute.itertuples() if row.occurrences_in_non_delegated_graphs}
    delegated = int(compute["occurrences_in_delegated_graphs"].sum())
    return {"partitions": int(info.num_delegated_subgraphs), "delegated_ops": delegated,
            "total_ops": delegated + sum(outside.values()), "undelegated": outside}


def fuse_int8_embeddings(program) -> int:
    """Turn each lookup in an int8 table, ``dequantize_per_channel(table) -> embedding``, into the quantized
    kernels' ``embedding_byte``, in place; returns how many.

    XNNPACK has no embedding kernel, so the pair stays outside the delegate; run as it stands, the portable
    dequantize would rebuild the whole float table on every inference. ``embedding_byte`` gathers the int8
    rows and dequantizes only those, with the same per-row scales: ``(q - 0) * scale``, the values of the
    PyTorch int8 program. A runtime needs the quantized kernels for it (``runtimes/executorch.py``).
    """
    # Registers quantized_decomposed::embedding_byte and its out variant, which to_executorch looks up.
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401
    import torch

    graph, fused = program.graph_module.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.quantized_decomposed.dequantize_per_channel.default:
            continue
        table, scales, zero_points, axis, quant_min, quant_max, dtype = node.args
        lookups = list(node.users)
        if (axis != 0 or dtype != torch.int8 or table.meta["val"].dim() != 2 or not _all_zero(program, zero_points)
                or not all(u.target == torch.ops.aten.embedding.default and u.args[0] is node for u in lookups)):
            continue
        for lookup in lookups:
            with graph.inserting_before(lookup):
                # Symmetric: every zero point is 0, and embedding_byte takes None for that.
                fused_lookup = graph.call_function(torch.ops.quantized_decomposed.embedding_byte.default,
                                                   (table, scales, None, quant_min, quant_max, lookup.args[1]))
            fused_lookup.meta = dict(lookup.meta)
            lookup.replace_all_uses_with(fused_lookup)
            graph.erase_node(lookup)
        graph.erase_node(node)
        if not zero_points.users:
            _drop_input(program, zero_points)  # else serialised: 8 bytes a row, an eighth of the int8 table
        fused += 1
    if fused:
        program.graph_module.recompile()
    return fused


def _drop_input(program, placeholder) -> None:
    """Remove a stored tensor the graph no longer reads: its placeholder, its input spec and its value."""
    import copy

    signature = copy.deepcopy(program.graph_signature)
    (spec,) = [s for s in signature.input_specs if s.arg.name == placeholder.name]
    signature.input_specs.remove(spec)
    program.state_dict.pop(spec.target, None)
    program.constants.pop(spec.target, None)
    program._graph_signature = signature  # as executorch's remove_unused_parameters_pass does for parameters
    program.graph_module.graph.erase_node(placeholder)


def _all_zero(program, node) -> bool:
    """Whether ``node`` is a stored tensor of zeros (a symmetric scheme's zero points)."""
    signature = program.graph_signature
    target = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
              **signature.inputs_to_lifted_tensor_constants}.get(node.name)
    value = program.state_dict.get(target, program.constants.get(target))
    return value is not None and not value.any()


# Quantize/dequantize kernels: in a PT2E program a compute node and the q/dq nodes after it share one debug handle.
_QDQ = ("quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel")


def portable_intermediates(program, inputs: list) -> list[tuple[str, np.ndarray, float | None]]:
    """``(node, value, int8 step)`` of every tensor an undelegated build of ``program`` computes, on ``inputs``.

    The bundle's .pte cannot show its intermediates: the XNNPACK delegate is one opaque call to ETDump, and
    re-lowering with its outputs tapped changes an int8 program's partitions. So ``program`` is lowered again,
    with no partitioner, to the portable kernels, run with ETDump and a debug buffer that keeps every
    instruction's output, and each output is traced back to the node of ``program`` it computes. This checks
    the lowering (edge decompositions, memory planning, the quantized ops), not XNNPACK's arithmetic.

    Args:
        program: the source program, as export handed it over (left untouched).
        inputs: one array per program input.

    Returns:
        Each node's value as float32 numpy; a quantize node's integers dequantized, with its scale as the step.
    """
    import collections
    import copy
    import tempfile

    # Registers the out variants of quantized_decomposed's q/dq ops, which an int8 program lowers to.
    import executorch.kernels.quantized  # noqa: F401
    import numpy as np
    import torch
    from executorch.devtools import Inspector
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    # No fuse_int8_embeddings: the unfused lookup computes the same values and keeps the program's node names.
    program = copy.deepcopy(program)  # lowering rewrites the program's constants in place
    nodes = {node.name: node for node in program.graph.nodes if node.op == "call_function"}
    order = {name: index for index, name in enumerate(nodes)}
    edge = to_edge_transform_and_lower(program, partitioner=[], generate_etrecord=True)
    # Before to_executorch(), which renumbers the edge program's debug handles in place; the runtime and the
    # ETRecord keep this numbering.
    handles = _handle_nodes(edge.exported_program(), id(program.graph), nodes)
    lowered = edge.to_executorch()
    values = sum(v.numel() * v.element_size() for node in nodes.values()
                 if isinstance(v := node.meta.get("val"), torch.Tensor))
    with tempfile.TemporaryDirectory() as tmp:
        pte, etdump, buffer, etrecord = (f"{tmp}/{name}" for name in ("debug.pte", "etdump", "buffer", "etrecord"))
        Path(pte).write_bytes(lowered.buffer)
        # The buffer is fixed: the run aborts when the intermediates outgrow it. Edge decompositions add tensors
        # (a Linear's transposed weight), hence the margin.
        module = _load_for_executorch(pte, enable_etdump=True, debug_buffer_size=4 * values + (16 << 20))
        module.forward([torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
        module.write_etdump_result_to_file(etdump, buffer)
        # Passed by path: an ETRecord held in memory resolves no event's debug handle (its map's keys are ints,
        # the Inspector looks them up as strings).
        lowered.get_etrecord().save(etrecord)
        inspector = Inspector(etdump_path=etdump, debug_buffer_path=buffer, etrecord=etrecord)
        events = collections.defaultdict(list)  # handle -> its events, in instruction order
        for event in (e for block in inspector.event_blocks for e in block.events):
            # Every instruction logs twice, as native_call_<kernel> and as OPERATOR_CALL.
            if not event.debug_data or event.name == "OPERATOR_CALL" or not isinstance(event.debug_handles, int):
                continue
            events[event.debug_handles].append(event)
    found = []
    for handle, targets in handles.items():
        ran = sorted(events.get(handle, []), key=lambda e: e._instruction_id)
        position = 0
        for name in sorted(targets, key=order.get):
            node = nodes[name]
            kernel = _op(node)
            # A q/dq node takes the next event running its kernel; a compute node the last event before the
            # first q/dq one (a decomposed Linear runs a transpose of its weight first, then addmm).
            if kernel in _QDQ:
                index = next((i for i in range(position, len(ran)) if _kernel(ran[i]) == kernel), None)
            else:
                index = next((i for i in range(position, len(ran)) if _kernel(ran[i]) in _QDQ), len(ran)) - 1
                index = index if index >= position else None
            if index is None:
                continue
            position = index + 1
            value, step = ran[index].debug_data[-1], None
            if not isinstance(value, torch.Tensor):
                continue
            if kernel in ("quantize_per_tensor", "quantize_per_channel"):
                scale, zero = node.args[1:3]
                if kernel != "quantize_per_tensor" or not isinstance(scale, float):
                    continue  # a per-channel quantize is of a weight, which lowering folds
                value, step = (value.to(torch.float32) - zero) * scale, scale
            found.append((name, value.detach().to(torch.float32).numpy().copy(), step))
    return found


def _handle_nodes(edge_program, graph_id: int, nodes: dict) -> dict[int, list[str]]:
    """Each debug handle of the edge program -> the nodes of the program whose graph is ``graph_id`` that it
    computes, by following each edge node's ``from_node`` provenance back through the decompositions."""
    import collections

    handles = collections.defaultdict(list)
    for node in edge_program.graph.nodes:
        if node.op != "call_function" or node.meta.get("debug_handle") is None:
            continue
        source = (node.meta.get("from_node") or [None])[-1]
        while source is not None:
            names = handles[node.meta["debug_handle"]]
            if source.graph_id == graph_id and source.name in nodes and source.name not in names:
                names.append(source.name)
            source = source.from_node[-1] if source.from_node else None
    return handles


def _op(node) -> str:
    """``quantize_per_tensor`` for ``quantized_decomposed.quantize_per_tensor.default``."""
    target = node.target
    overload = getattr(target, "_overloadpacket", None)
    return getattr(overload, "__name__", getattr(target, "__name__", str(target)).split(".")[0])


def _kernel(event) -> str:
    """The kernel an ETDump event ran: ``addmm`` for ``native_call_addmm.out``."""
    return event.name.removeprefix("native_call_").split(".")[0]
