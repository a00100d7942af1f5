"""ExecuTorch's XNNPACK quantizer: int8 kernels in the XNNPACK delegate of a .pte."""

from __future__ import annotations

from difftx_edge.quantize.registry import float_module_types, register_quantizer


@register_quantizer("xnnpack", extra="executorch", requires=("executorch", "torchao"),
                    runtime="ExecuTorch (XNNPACK delegate)")
def build(qat: bool):
    from difftx_edge.quantize.pt2e import consistent_fake_quant
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    config = consistent_fake_quant(get_symmetric_quantization_config(is_per_channel=True, is_qat=qat))
    quantizer = XNNPACKQuantizer().set_global(config)
    for kind in float_module_types():
        quantizer.set_module_type(kind, None)
    return quantizer
