"""Quantization-aware training and PTQ to int8 (PT2E), one quantizer per backend. Installed as ``difftx_edge.quantize``."""
