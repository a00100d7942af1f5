"""Quantization-aware training and PTQ to int8 with the PT2E flow, one quantizer per backend.

Installed as ``difftx_edge.quantize``. Importing it loads no backend: each
quantizer module imports its packages only when its quantizer is built.

Example::

    from difftx_edge.quantize import QuantConfig, quantize

    report = quantize(QuantConfig(run="runs/digits", backend="xnnpack", method="qat", out="runs/digits-int8"))
"""

from difftx_edge.quantize import coreml, litert, onnx, xnnpack  # noqa: F401  (each registers its quantizer)
from difftx_edge.quantize.api import METHODS, QuantConfig, load_quantized, quantize
from difftx_edge.quantize.registry import QUANTIZERS, QuantizerSpec, get_quantizer_spec, register_quantizer

__all__ = ["METHODS", "QUANTIZERS", "QuantConfig", "QuantizerSpec", "get_quantizer_spec", "load_quantized",
           "quantize", "register_quantizer"]
