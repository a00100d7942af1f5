"""Optional backends: which of their modules are importable, the installed versions, and the one-line error
naming the pip extra."""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version

# Every package whose version can change a number we report: the toolchains that quantize and export, and
# the runtimes that run and time the artifacts (on a board, only some of them are installed).
PACKAGES = ("torch", "numpy", "torchao", "executorch", "litert-torch", "ai-edge-litert", "tflite-runtime",
            "coremltools", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript")


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


def versions() -> dict[str, str]:
    """The versions of difftx-edge and of the ``PACKAGES`` installed here, by package name.

    Manifests, quantize configs, results files and the pipeline's records all
    carry this one list, so that any number can be traced to its toolchain.
    """
    from difftx_edge import __version__

    found = {"difftx-edge": __version__}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
