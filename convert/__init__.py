"""Exporters, one module per format (ExecuTorch, LiteRT, Core ML, ONNX), and bundles checked in their runtimes.

Installed as ``difftx_edge.convert``. Importing it loads no toolchain: each
exporter imports its packages when it runs.
"""

from difftx_edge.convert import coreml, executorch, litert, onnx  # noqa: F401  (each registers its format)
from difftx_edge.convert.api import ExportConfig, convert_pt2, export_run
from difftx_edge.convert.registry import FORMATS, PRECISIONS, FormatSpec, formats_table, get_format, register_format

__all__ = ["FORMATS", "PRECISIONS", "ExportConfig", "FormatSpec", "convert_pt2", "export_run", "formats_table",
           "get_format", "register_format"]
