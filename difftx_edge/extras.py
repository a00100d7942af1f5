"""Optional backends: each is imported only inside the function that needs it."""

from __future__ import annotations

import importlib.util


def require(module: str, extra: str, purpose: str) -> None:
    """Fail with one clear line when an optional backend is not installed.

    Args:
        module: the top-level module the backend needs, e.g. ``"executorch"``.
        extra: the pip extra that installs it, e.g. ``"executorch"``.
        purpose: what needs it, for the message, e.g. ``"the xnnpack quantizer"``.

    Raises:
        ValueError: the module cannot be found.
    """
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{purpose} needs {module}, which is not installed: pip install 'difftx-edge[{extra}]'")
