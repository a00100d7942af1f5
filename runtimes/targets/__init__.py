"""Benchmark targets, one module per kind: this machine (local, cuda), a Linux board over SSH, a phone over adb.

Importing this package starts nothing: a target connects when the harness opens it.
"""

from difftx_edge.runtimes.targets import adb, local, ssh  # noqa: F401  (each registers its target)
from difftx_edge.runtimes.targets.registry import (
    TARGETS,
    CommandTarget,
    Job,
    Target,
    make_target,
    register_target,
    target_class,
)

__all__ = ["TARGETS", "CommandTarget", "Job", "Target", "make_target", "register_target", "target_class"]
