"""Datasets that need no download, as sequences for a small Transformer.

Importing the package registers every task in ``TASKS``:

* ``digits``: scikit-learn's 8x8 digits as 16 patches of 2x2 pixels.
* ``listops``: Long Range Arena ListOps, regenerated offline.
* ``text``: byte-level language modelling on text files or the Python stdlib.
* ``npz``: the user's own classification data from a ``.npz`` file.
"""

from __future__ import annotations

# Imported for their side effect: each module registers its task.
from difftx_edge.tasks import digits, listops, npz, text  # noqa: F401
from difftx_edge.tasks.base import TASKS, Split, TaskConfig, TaskData, load_task, register_task

__all__ = ["TASKS", "Split", "TaskConfig", "TaskData", "load_task", "register_task"]
