"""Runners, one module per runtime, and the benchmark harness. Installed as ``difftx_edge.runtimes``."""
