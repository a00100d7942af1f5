"""The Core ML quantizer shipped with ExecuTorch: int8 weights and activations in an .mlpackage."""

from __future__ import annotations

from difftx_edge.quantize.registry import float_module_types, qualified_name, register_quantizer, share_through_moves

# Annotators for ops a Transformer graph lacks, keyed by the token in their name and the op they need.
_NEEDS_OP = {"conv": "conv", "bn": "batch_norm", "pool": "pool"}
# "<op>_act" annotators match <op> feeding an activation; the aten ops each stands for.
_ACT_PRODUCERS = {"linear": ("aten.linear",), "add": ("aten.add",), "mul": ("aten.mul",),
                  "matmul": ("aten.matmul", "aten.bmm", "aten.mm")}
_ACTIVATIONS = ("relu", "hardtanh", "leaky_relu", "silu", "elu", "celu", "selu", "mish", "hardswish",
                "hardsigmoid", "gelu", "sigmoid", "tanh")


def _needed(name: str, graph) -> bool:
    """Whether annotator ``name`` can match anything in ``graph``."""
    calls = [n for n in graph.nodes if n.op == "call_function"]
    targets = " ".join(str(n.target) for n in calls)
    if any(token in name and op not in targets for token, op in _NEEDS_OP.items()):
        return False
    producer = name.removesuffix("_act")
    if name.endswith("_act") and producer in _ACT_PRODUCERS:
        return any(str(n.target).startswith(_ACT_PRODUCERS[producer])
                   and any(a in str(u.target) for u in n.users for a in _ACTIVATIONS) for n in calls)
    return True


@register_quantizer("coreml", extra="coreml", requires=("coremltools", "executorch", "torchao"),
                    runtime="Core ML (mlprogram)", int32_bias=False)
def build(qat: bool):
    import torch
    from coremltools.optimize.torch.quantization.quantization_config import (
        LinearQuantizerConfig,
        ModuleLinearQuantizerConfig,
    )

    # coremltools' own CoreMLQuantizer does not import under torch 2.13; ExecuTorch's copy does.
    from executorch.backends.apple.coreml.quantizer import CoreMLQuantizer
    from executorch.backends.apple.coreml.quantizer._annotation_config import AnnotationConfig
    from executorch.backends.apple.coreml.quantizer._coreml_quantizer import _AnnotationPatternRegistry

    class TransformerCoreMLQuantizer(CoreMLQuantizer):
        """CoreMLQuantizer without its passes that cannot match this graph.

        Stock, it builds (by torch.export) and subgraph-matches the patterns
        of all 24 annotators once per module-type config, even for a config
        of None: 7 minutes to annotate a 1-layer hybrid model on a busy
        2-core machine, against 5 s here. Here None configs are skipped (the
        global pass's filter already leaves those modules float), and so are
        annotators whose ops, or whose op-into-activation pairs, the graph
        lacks; run alone on that model's graph, those annotate no node
        (checked once by hand: 45 s, too slow for the suite).

        The result is not stock's: a None config marks its modules' nodes as
        annotated without a spec, and stock then keeps the input of each
        Linear fed by a LayerNorm in float. Here that input is quantized, so
        every Linear computes in int8, as on the other backends. No test
        compares the two; tests/test_quantize.py checks this result: attention
        and LayerNorm stay float, and all ten Linears of a 2-layer model
        compute in int8 with per-channel weights.
        """

        def _annotate_all_patterns(self, model, quantization_config, filter_fn=None):
            annotation_config = AnnotationConfig.from_quantization_config(quantization_config)
            if annotation_config is None:
                return
            for name, annotator in _AnnotationPatternRegistry.get_annotators().items():
                if _needed(name, model.graph):
                    annotator(model, annotation_config, filter_fn)

        def annotate(self, model):
            super().annotate(model)
            share_through_moves(model)
            return model

    # Symmetric int8 weights per channel, 8-bit activations; with qat=False prepare_pt2e
    # only calibrates the same fake-quant modules.
    global_config = ModuleLinearQuantizerConfig(
        quantization_scheme="symmetric", weight_per_channel=True,
        activation_dtype=torch.quint8, weight_dtype=torch.qint8,
    )
    skip = {qualified_name(kind): None for kind in float_module_types()}
    return TransformerCoreMLQuantizer(LinearQuantizerConfig(global_config=global_config, module_type_configs=skip))
