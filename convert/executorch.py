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
