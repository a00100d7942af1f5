"""QDQ for ONNX Runtime: every Linear with int8 per-channel weights and int8 activations; float tables int8.

ONNX Runtime fuses DequantizeLinear -> MatMul/Gemm -> QuantizeLinear into its
integer kernels (QGemm, MatMulIntegerToFloat); everything between Linears stays
float, which is what its CPU provider runs fastest at these widths anyway.
Built on torchao's public quantizer API, so the ``onnx`` extra needs no ExecuTorch.
"""

from __future__ import annotations

from difftx_edge.quantize.registry import annotate_float_tables, in_float_module, int8_weight_spec, register_quantizer


@register_quantizer("onnx", extra="onnx", requires=("onnx", "onnxruntime", "onnxscript", "torchao"),
                    runtime="ONNX Runtime (QDQ fused into integer MatMul/Gemm)", int32_bias=True)
def build(qat: bool):
    import torch
    from torchao.quantization.pt2e import FakeQuantize, HistogramObserver, MovingAverageMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

    observer = MovingAverageMinMaxObserver if qat else HistogramObserver
    activation = QuantizationSpec(
        dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=observer, eps=2 ** -12) if qat
        else observer.with_args(eps=2 ** -12))
    # 7 bits, for weights and weight-only tables alike (a low-rank projection feeds a MatMul too): ORT's u8s8
    # kernels on x86 without VNNI add two uint8 x int8 products into an int16, and 2 * 255 * 127 overflows it.
    weight = int8_weight_spec(qat, per_channel=True, quant_max=63)
    class ORTQuantizer(Quantizer):
        """Annotates aten.linear outside the float modules; nothing else."""

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            for node in model.graph.nodes:
                if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
                    continue
                if in_float_module(node):
                    continue
                x, w = node.args[0], node.args[1]
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={x: activation, w: weight}, output_qspec=activation, _annotated=True)
            annotate_float_tables(model, weight)
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            pass

    return ORTQuantizer()
