"""``difftx-edge pipeline``: train, quantize, export, check, benchmark and report, resuming where it stopped.

It drives every layer below it, so it sits on top of them. Its modules, each
importing only those before it: ``plan`` (the config, what it builds, the
folder's layout), ``cache`` (digests, keys, unit records), ``report`` (the
report, rendered from the folder's JSON), ``stages`` (each stage's units) and
``run`` (the loop that runs them).
"""

from __future__ import annotations

from difftx_edge.pipeline.cache import read_record
from difftx_edge.pipeline.plan import STAGES, PipelineConfig, Plan, parse_stages
from difftx_edge.pipeline.report import render_report
from difftx_edge.pipeline.run import pipeline

__all__ = ["STAGES", "PipelineConfig", "Plan", "parse_stages", "pipeline", "read_record", "render_report"]
