"""QDQ for ONNX Runtime: every Linear with int8 per-channel weights and int8 activations; float tables int8.

ONNX Runtime fuses DequantizeLinear -> MatMul/Gemm -> QuantizeLinear into its
integer kernels (QGemm, MatMulIntegerToFloat); everything between Linears stays
float, which is what its CPU provider runs fastest at these widths anyway.
Built on torchao's public quantizer API, so the ``onnx`` extra needs no ExecuTorch.
"""

from __future__ import annotations

from difftx_edge.quantize.registry import annotate_float_tables, in_float_module, register_quantizer, table_spec


@register_quantizer("onnx", extra="onnx", requires=("onnx", "onnxruntime", "onnxscript", "torchao"),
                    runtime="ONNX Runtime (QDQ fused into integer MatMul/Gemm)", int32_bias=True)
def build(qat: bool):
    import torch
    from torchao.quantization.pt2e import (
        FakeQuantize,
        HistogramObserver,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        PerChannelMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

    def spec(observer, **kwargs):
        return observer.with_args(eps=2 ** -12, **kwargs) if not qat else FakeQuantize.with_args(
            observer=observer, eps=2 ** -12, **kwargs)

    activation = QuantizationSpec(
        dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=spec(MovingAverageMinMaxObserver if qat else HistogramObserver))
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric, ch_axis=0,
        observer_or_fake_quant_ctr=spec(MovingAveragePerChannelMinMaxObserver if qat else PerChannelMinMaxObserver))
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
            annotate_float_tables(model, table_spec(qat, per_channel=True))
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            pass

    return ORTQuantizer()
