"""LiteRT / TFLite: a .tflite from litert-torch; int8 folds the PT2E program into integer TFLite kernels."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from difftx_edge.convert.registry import register_format
from difftx_edge.runtimes.litert import LiteRTRunner, interpreter_class

QUANTIZER = "litert"  # the backend (difftx_edge.quantize) whose int8 programs this format converts


def artifact_io(artifact: Path, facts: dict, inputs: list[dict], outputs: list[dict]) -> dict:
    """The .tflite's own I/O: token ids become int32, and an int8 tensor carries its scale and zero point."""
    interpreter = interpreter_class()(model_path=str(artifact))
    return {"inputs": [_tensor(d) for d in interpreter.get_input_details()],
            "outputs": [_tensor(d) for d in interpreter.get_output_details()]}


def _tensor(detail: dict) -> dict:
    tensor = {"name": detail["name"], "shape": [int(n) for n in detail["shape"]],
              "dtype": np.dtype(detail["dtype"]).name}
    scale, zero_point = detail["quantization"]
    if scale:  # an int8 tensor: real value = (q - zero_point) * scale
        tensor["quantization"] = {"scale": float(scale), "zero_point": int(zero_point)}
    return tensor


@register_format("litert", filename="model.tflite", precisions=("fp32", "int8", "int8-dynamic"), quantizer=QUANTIZER,
                 extra="litert", requires=("litert_torch", "ai_edge_litert"), artifact_io=artifact_io,
                 manifest_keys={"partitions": "how many pieces the XNNPACK delegate runs"},
                 rewrites=True, token_dtype="int32")  # LiteRT's embedding lookup takes int32 ids
def export(program, path: Path, precision: str, options: dict) -> dict:
    import litert_torch

    module = program.module()
    example = tuple(options["example"])
    quant_config = None
    quantized = precision in ("int8", "int8-dynamic")
    if quantized:
        module = unfold_int8_weights(module)
        from litert_torch.quantize.quant_config import QuantConfig

        from difftx_edge.quantize import get_quantizer_spec

        # Without the quantizer the file keeps float weights plus quantize/dequantize pairs; the converter reads
        # from it whether activation scales are static or computed at run time.
        spec = get_quantizer_spec(QUANTIZER)
        quantizer = spec.dynamic_quantizer() if precision == "int8-dynamic" else spec.quantizer(qat=False)
        quant_config = QuantConfig(pt2e_quantizer=quantizer)
    with fx_tensor_names(), strict_qdq() if quantized else contextlib.nullcontext():
        litert_torch.convert(module, example, quant_config=quant_config).export(str(path))
    facts = rewrite_int8(path) if quantized else {}
    delegation = LiteRTRunner(path, threads=1).delegation()
    return {**facts, "partitions": delegation["partitions"], "delegation": delegation}


def rewrite_int8(path: Path) -> dict:
    """The int8 .tflite made XNNPACK-friendly in place, in one read and one write; returns the counts."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    facts = {"float_gelus": gelu_in_float(model), "int8_tables": dequantize_where_used(model)}
    if any(facts.values()):
        flatbuffer_utils.write_model(model, str(path))
    return facts


def _builtin(model, op) -> int:
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])


def gelu_in_float(model) -> int:
    """Rewrite each int8 GELU of a .tflite model as DEQUANTIZE -> float GELU -> QUANTIZE; returns how many.

    The converter turns the MLP's ``dequantize -> gelu -> quantize`` into an
    int8 GELU, which LiteRT's XNNPACK delegate does not take: each layer's
    GELU ran outside it and split the graph into n_layers + 1 partitions. In
    float the delegate runs it, so the graph is one partition. The values are
    those of the PyTorch program, which computes GELU in float between the
    same quantize and dequantize (parity checks it).
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    codes = model.operatorCodes

    def opcode(code: int) -> int:
        for index, existing in enumerate(codes):
            if flatbuffer_utils.get_builtin_code_from_operator_code(existing) == code:
                return index
        new = schema.OperatorCodeT()
        new.builtinCode, new.deprecatedBuiltinCode, new.version = code, min(code, 127), 1
        codes.append(new)
        return len(codes) - 1

    def operator(code: int, inputs: list[int], outputs: list[int]):
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = opcode(code), inputs, outputs
        return op

    rewritten = 0
    for graph in model.subgraphs:
        def float_twin(index: int) -> int:  # a float32 tensor of the same shape, with no data
            int8 = graph.tensors[index]
            twin = schema.TensorT()
            twin.shape, twin.shapeSignature, twin.hasRank = int8.shape, int8.shapeSignature, int8.hasRank
            twin.type, twin.buffer, twin.name = schema.TensorType.FLOAT32, 0, (int8.name or b"") + b"/float"
            graph.tensors.append(twin)
            return len(graph.tensors) - 1

        operators = []
        for op in graph.operators:
            if (_builtin(model, op) != schema.BuiltinOperator.GELU
                    or graph.tensors[op.inputs[0]].type != schema.TensorType.INT8):
                operators.append(op)
                continue
            (x,), (y,) = op.inputs, op.outputs
            op.inputs, op.outputs = [float_twin(x)], [float_twin(y)]
            operators += [operator(schema.BuiltinOperator.DEQUANTIZE, [x], op.inputs), op,
                          operator(schema.BuiltinOperator.QUANTIZE, op.outputs, [y])]
            rewritten += 1
        graph.operators = operators
    return rewritten


FX_NAME = "fx:"  # a .tflite tensor name lists the FX nodes it holds the value of: "fx:add_1;;fx:mean;"


@contextlib.contextmanager
def fx_tensor_names():
    """Convert with each tensor named after the FX node(s) of the program handed to the converter.

    litert-torch 0.10 names a tensor after the module path of its op
    (``difftx_edge.zoo.EncoderClassifier/torch.nn.modules...;``), and keeps
    the FX node name only in a nested MLIR location that the flatbuffer
    drops. ``diff`` needs the node (``LiteRTRunner.intermediates``), and the
    paths were 5-10 % of an int8 file. ``build_nodename_debuginfo`` walks
    ``from_node`` back through the converter's own re-export and
    decompositions, so the name is that of the program's node; an op the
    converter fused lists each node it came from. Only names change: the
    ops and values are the same.
    """
    from litert_torch.backend import debuginfo

    build = debuginfo.build_mlir_debuginfo

    def fx_name(node):
        return f"{FX_NAME}{debuginfo.build_nodename_debuginfo(node) or node.name};"

    debuginfo.build_mlir_debuginfo = fx_name
    try:
        yield
    finally:
        debuginfo.build_mlir_debuginfo = build


@contextlib.contextmanager
def strict_qdq():
    """Convert with strict QDQ, so that the DEQUANTIZE of an int8 constant stays in the file.

    By default the converter folds it into a float32 constant, which stored
    the weight-only int8 tables (``quantize.registry.annotate_float_tables``)
    in float again: an int8 hybrid .tflite at N=1024 was 0.52 of fp32. The
    integer kernels come out the same either way (tests compare the ops).
    litert-torch 0.10 sets ``strict_qdq_mode`` only in its TensorFlow-based
    converter_v2; its default converter builds the config inside and hands it
    to ``run_convert_to_tfl_passes``, so that call is where the flag is set.
    """
    from litert_torch._convert import litert_converter

    api = litert_converter.converter_api_ext
    run = api.run_convert_to_tfl_passes

    def strict(module, pass_manager, config):
        config.strict_qdq_mode = True
        return run(module, pass_manager, config)

    api.run_convert_to_tfl_passes = strict
    try:
        yield
    finally:
        api.run_convert_to_tfl_passes = run


def dequantize_where_used(model) -> int:
    """Move each DEQUANTIZE of an int8 constant to just before its first reader; returns how many there are.

    The converter puts them first. Ahead of the embedding lookup, which the
    XNNPACK delegate does not take, they formed a partition of their own that
    dequantized the tables on every inference; beside their readers, the
    delegate unpacks them once, when it is built.
    """
    from ai_edge_litert import schema_py_generated as schema

    moved = 0
    for graph in model.subgraphs:
        tables, operators = [], []
        for op in graph.operators:
            source = graph.tensors[op.inputs[0]]
            constant = source.buffer > 0 and model.buffers[source.buffer].data is not None
            is_table = _builtin(model, op) == schema.BuiltinOperator.DEQUANTIZE and constant
            (tables if is_table else operators).append(op)
        for table in tables:
            (output,) = table.outputs
            at = next(i for i, op in enumerate(operators) if output in op.inputs)
            operators.insert(at, table)
        graph.operators = operators
        moved += len(tables)
    return moved


def unfold_int8_weights(graph_module):
    """Give each folded int8 weight back its quantize node, as litert-torch's lowering expects.

    ``convert_pt2e`` folds ``quantize(w)`` into an int8 constant; litert-torch
    only recognises quantized weights written as ``quantize -> dequantize`` on
    a float constant. The float constant is the dequantized int8 one, so
    quantizing it again gives back exactly the same int8 values.
    """
    import torch

    qd = torch.ops.quantized_decomposed
    pairs = {qd.dequantize_per_channel.default: qd.quantize_per_channel.default,
             qd.dequantize_per_tensor.default: qd.quantize_per_tensor.default}
    graph = graph_module.graph
    for index, node in enumerate(list(graph.nodes)):
        if node.op != "call_function" or node.target not in pairs or node.args[0].op != "get_attr":
            continue
        stored = _attr(graph_module, node.args[0].target)
        if stored.dtype != torch.int8:
            continue
        args = [_attr(graph_module, a.target) if isinstance(a, torch.fx.Node) else a for a in node.args[1:]]
        weight = node.target(stored, *args)  # exact: int8 values times their scale
        name = f"_unfolded_weight_{index}"
        graph_module.register_buffer(name, weight)
        with graph.inserting_before(node):
            float_weight = graph.get_attr(name)
            requantized = graph.call_function(pairs[node.target], (float_weight, *node.args[1:]))
        node.replace_input_with(node.args[0], requantized)
    graph.eliminate_dead_code()
    graph_module.recompile()
    return graph_module


def _attr(module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module
