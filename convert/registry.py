"""The format registry: one exporter per artifact format, each in its own module.

An exporter turns a static-shape ``torch.export.ExportedProgram`` into an
artifact file. Its packages are imported when it runs, never at registration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from difftx_edge.extras import missing_modules, require_extra
from difftx_edge.markdown import markdown_table

# int8: weights and activations int8, activation scales from calibration (static PTQ or QAT). int8-dynamic: int8
# weights, activations quantized at run time with a scale per tensor computed from the values (float output).
PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")


@dataclass(frozen=True)
class FormatSpec:
    """An artifact format: everything the export and bundle code reads of one, filled in by its module.

    Attributes:
        name: the ``--format`` name.
        filename: the artifact's file name inside its bundle.
        precisions: the precisions it can be exported at.
        quantizer: the backend quantizer whose int8 program it converts.
        extra: the pip extra that installs its toolchain and runtime.
        requires: importable modules the exporter needs.
        check: ``"runtime"`` (parity in the real runtime, the registered runtime of this format) or
            ``"reference"`` (``reference`` evaluates it, where the runtime cannot run here).
        export: ``export(program, path, precision, options) -> dict`` of facts for the manifest.
        manifest_keys: ``(key, what it holds)`` for each fact its exporter always returns; a manifest
            without one is refused.
        artifact_io: ``artifact_io(artifact, facts, inputs, outputs) -> {"inputs": [...], "outputs": [...]}``,
            the I/O the file itself declares (names, dtypes, quantization) given the program's; None: the file
            keeps the program's.
        reference: with ``check="reference"``, ``reference(artifact, facts) -> run``, where ``run(x)`` is the
            first output for one input batch, evaluated without the runtime.
        reference_name: with ``check="reference"``, what the manifest's ``parity.check`` says checked it.
        token_dtype: the dtype the artifact takes token ids in (the program's are int64).
        rewrites: whether ``convert`` hands it the program after the mobile rewrites (``convert/rewrites.py``),
            which put patterns XNNPACK refuses into forms it delegates; a runtime that fuses the original
            patterns itself (ONNX Runtime's LayerNorm and attention fusions) is better off without them.
    """

    name: str
    filename: str
    precisions: tuple[str, ...]
    quantizer: str
    extra: str
    requires: tuple[str, ...]
    check: str
    export: Callable
    manifest_keys: tuple[tuple[str, str], ...] = ()
    artifact_io: Callable | None = None
    reference: Callable | None = None
    reference_name: str | None = None
    token_dtype: str = "int64"
    rewrites: bool = False

    def __post_init__(self) -> None:
        if self.check not in ("runtime", "reference"):
            raise ValueError(f"format {self.name}: check must be 'runtime' or 'reference', not {self.check!r}")
        if (self.check == "reference") != (self.reference is not None and self.reference_name is not None):
            raise ValueError(f"format {self.name}: a reference and its name come with check='reference', "
                             "and only with it")

    def missing(self) -> list[str]:
        return missing_modules(self.requires)

    def installed(self) -> bool:
        return not self.missing()

    def supports(self, precision: str) -> None:
        """Raises ValueError for a precision the format lacks."""
        if precision not in self.precisions:
            raise ValueError(f"format {self.name} does not support precision {precision}: "
                             f"use {', '.join(self.precisions)}")

    def require(self, precision: str) -> None:
        """Raises ValueError for a precision the format lacks or a toolchain that is not installed."""
        self.supports(precision)
        require_extra(f"format {self.name}", self.requires, self.extra)


FORMATS: dict[str, FormatSpec] = {}


def register_format(name: str, *, filename: str, precisions: tuple[str, ...], quantizer: str, extra: str,
                    requires: tuple[str, ...], check: str = "runtime", manifest_keys: dict[str, str] | None = None,
                    artifact_io: Callable | None = None, reference: Callable | None = None,
                    reference_name: str | None = None, token_dtype: str = "int64", rewrites: bool = False):
    """Register ``export(program, path, precision, options) -> dict`` as format ``name``; returns it unchanged.

    The keyword arguments are :class:`FormatSpec`'s fields; ``manifest_keys`` maps each key to what it holds.
    """

    def wrap(export: Callable) -> Callable:
        FORMATS[name] = FormatSpec(name, filename, tuple(precisions), quantizer, extra, tuple(requires), check,
                                   export, tuple((manifest_keys or {}).items()), artifact_io, reference,
                                   reference_name, token_dtype, rewrites)
        return export

    return wrap


def get_format(name: str) -> FormatSpec:
    """Raises ValueError naming the known formats when ``name`` is not one."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}: use one of {', '.join(sorted(FORMATS))} "
                         "(difftx-edge formats lists them)")
    return FORMATS[name]


def formats_table(installed: bool = True) -> str:
    """The markdown table of formats, precisions and extras, and whether each is installed here.

    The README embeds it with ``installed=False`` (a test keeps the two equal).
    """
    header = ["format", "file", "precisions", "int8 from quantizer", "extra", "check on Linux"]
    header += ["installed"] if installed else []
    rows = []
    for spec in FORMATS.values():
        cells = [f"`{spec.name}`", f"`{spec.filename}`", ", ".join(spec.precisions), f"`{spec.quantizer}`",
                 f"`{spec.extra}`", "parity in its runtime" if spec.check == "runtime" else "reference evaluation"]
        cells += ["yes" if spec.installed() else "no"] if installed else []
        rows.append(cells)
    return markdown_table(header, rows)
