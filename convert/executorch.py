"""ExecuTorch: a .pte lowered with the XNNPACK partitioner."""

from __future__ import annotations

from pathlib import Path

from difftx_edge.convert.registry import register_format


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
