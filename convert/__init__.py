"""Exporters, one module per format (ExecuTorch, LiteRT, Core ML, ONNX). Installed as ``difftx_edge.convert``."""
