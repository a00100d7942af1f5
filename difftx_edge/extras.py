"""Optional backends: which of their modules are importable, and the one-line error naming the pip extra."""

from __future__ import annotations

import importlib.util


def missing_modules(modules) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (checked without importing them)."""
    return [module for module in modules if importlib.util.find_spec(module) is None]


def require_extra(what: str, modules, extra: str) -> None:
    """Raises ValueError naming ``pip install 'difftx-edge[extra]'`` when any of ``modules`` is missing."""
    missing = missing_modules(modules)
    if missing:
        raise not_installed(what, ", ".join(missing), extra)


def not_installed(what: str, needs: str, extra: str) -> ValueError:
    """The one-line error for ``what`` lacking ``needs``, naming the pip extra that installs it."""
    return ValueError(f"{what} needs {needs}, which is not installed: pip install 'difftx-edge[{extra}]'")
