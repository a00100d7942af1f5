"""litert-torch's PT2E quantizer: int8 TFLite kernels in a .tflite."""

from __future__ import annotations

from difftx_edge.quantize.registry import (
    annotate_embedding_tables,
    annotate_float_tables,
    float_module_types,
    int8_weight_spec,
    qualified_name,
    register_quantizer,
    share_through_moves,
    store_leading_ones_flat,
)


@register_quantizer("litert", extra="litert", requires=("litert_torch", "ai_edge_litert", "torchao"),
                    runtime="LiteRT / TFLite (XNNPACK delegate)", int32_bias=True, dynamic=True)
def build(qat: bool, dynamic: bool = False):
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

    from difftx_edge.quantize.pt2e import consistent_fake_quant

    class LiteRTQuantizer(PT2EQuantizer):
        # The QAT-only conv+bn annotators crash under torch 2.13, and a Transformer has no conv+bn.
        STATIC_QAT_ONLY_OPS = []
        # Its GRU annotator quantizes only a GRU's input and hidden state, and fails (IndexError) on a GRU
        # without an initial state passed in (h0 made inside, the common case). The GRU computes in float
        # either way; without the annotator its input and output stay float too.
        STATIC_OPS = [op for op in PT2EQuantizer.STATIC_OPS if op != "gru_io_only"]

        def transform_for_annotation(self, model):
            model = super().transform_for_annotation(model)
            store_leading_ones_flat(model)
            return model

        def annotate(self, model):
            super().annotate(model)
            share_through_moves(model)
            # Kept as DEQUANTIZE ops by the export's strict-QDQ conversion (convert/litert.py). A table still of
            # leading dimension 1 (one row: a class token) stays float, as store_leading_ones_flat explains.
            annotate_float_tables(model, int8_weight_spec(qat, per_channel=True), leading_one=False)
            # Lookups by constant ids too: folded, their rows would be a float constant beside a float residual
            # add (BERT's int8 .tflite: 0.33x fp32's size, against 0.36x).
            annotate_embedding_tables(model, int8_weight_spec(qat, per_channel=True), constant_ids=True)
            return model

    # Dynamic: int8 weights per channel, activations quantized at run time (the converter reads is_dynamic).
    quantizer = LiteRTQuantizer().set_global(consistent_fake_quant(
        get_symmetric_quantization_config(is_per_channel=True, is_qat=qat, is_dynamic=dynamic)))
    for kind in float_module_types():
        # Its module-type filter compares against the strings in nn_module_stack.
        quantizer.set_module_type(qualified_name(kind), None)
    return quantizer
