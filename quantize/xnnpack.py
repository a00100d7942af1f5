"""ExecuTorch's XNNPACK quantizer: int8 kernels in the XNNPACK delegate of a .pte."""

from __future__ import annotations

from difftx_edge.quantize.registry import (
    annotate_embedding_tables,
    annotate_float_tables,
    float_module_types,
    int8_weight_spec,
    register_quantizer,
    unannotate_float_modules,
)


@register_quantizer("xnnpack", extra="executorch", requires=("executorch", "torchao"),
                    runtime="ExecuTorch (XNNPACK delegate)", int32_bias=True, dynamic=True)
def build(qat: bool, dynamic: bool = False):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    from difftx_edge.quantize.pt2e import consistent_fake_quant

    class TransformerXNNPACKQuantizer(XNNPACKQuantizer):
        """XNNPACKQuantizer whose module-type exclusions hold for every op.

        Stock, its cat annotator ignores module filters, and the attention's
        neighbour-block cats came out int8 (14 of them in a 2-layer local
        model), costing QAT accuracy on listops.
        """

        def annotate(self, model):
            super().annotate(model)
            unannotate_float_modules(model)
            # Per tensor: the delegate runs a per-tensor dequantize of a constant, not a per-channel one.
            annotate_float_tables(model, int8_weight_spec(qat, per_channel=False))
            # Per row: convert/executorch.py fuses the pair into the quantized kernels' embedding_byte. A lookup by
            # constant ids is folded and its rows stored int8 as the int8 position add's input (BERT: 1 lookup
            # outside the delegate, not 3, and a smaller .pte).
            annotate_embedding_tables(model, int8_weight_spec(qat, per_channel=True), constant_ids=False)
            return model

    # Dynamic: int8 weights per channel, each Linear's input quantized per tensor at run time.
    config = consistent_fake_quant(get_symmetric_quantization_config(is_per_channel=True, is_qat=qat,
                                                                     is_dynamic=dynamic))
    quantizer = TransformerXNNPACKQuantizer().set_global(config)
    for kind in float_module_types():
        quantizer.set_module_type(kind, None)
    return quantizer
