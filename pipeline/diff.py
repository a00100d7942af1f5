"""Where an artifact leaves PyTorch: its intermediate tensors against the source program's, node by node.

Installed as ``difftx_edge.pipeline.diff``. A runtime exposes an artifact's
intermediate tensors as :class:`Tap` values, each naming the node of the source
``torch.export`` program whose value it holds; :func:`reference_values` runs
that program and keeps every node's value; :func:`compare` puts the two side by
side in graph order and marks the first tensor that leaves tolerance, the place
to look first, since every later tensor inherits its error.

Example::

    reference = reference_values(program, (x,))
    report = compare(program, reference, taps, precision="fp32")
    report.first_divergence  # the first Row whose error is beyond tolerance, or None
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ContextManager

import numpy as np
import torch

from difftx_edge.convert.bundle import sqnr_db

# The largest error a tensor may have, relative to the largest magnitude of its reference value, by the
# precision its artifact computes in: fp32 kernels reorder sums (1e-6 .. 1e-5 seen in parity); fp16 keeps
# 11 bits. An int8 tensor is judged in its own quantization steps instead (INT8_STEPS), as parity is.
RELATIVE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
INT8_STEPS = 2.0
# A float tensor inside an int8 artifact carries the rounding of the int8 tensors before it: a couple of steps
# of an activation spanning 255 steps is about 1 % of its range.
INT8_FLOAT_TOLERANCE = 0.02
# PT2E's quantize ops: their int8 results are compared as the values they stand for.
QUANTIZE = {"quantize_per_tensor", "quantize_per_channel"}
# Ops that move or relabel values without computing new ones: a node of these the artifact folded away (a
# view, a no-op dropout, the dequantize of a compared int8 tensor, which a tap gives dequantized) is covered by
# the tensor it reads, which is compared where it is tapped.
DATA_MOVEMENT = {
    "dequantize_per_tensor", "dequantize_per_channel",
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand",
    "contiguous", "clone", "alias", "dropout", "flatten", "unflatten", "detach", "_to_copy", "to",
    "slice", "select", "split", "split_with_sizes", "getitem", "narrow", "lift_fresh_copy",
}


@dataclass(frozen=True)
class Tap:
    """One intermediate tensor an artifact's runtime exposed.

    Attributes:
        node: the name of the source program's node whose value this is.
        value: the value, as float (an int8 tensor dequantized with its own scale and zero point).
        step: an int8 tensor's scale (its quantization step), else None.
    """

    node: str
    value: np.ndarray
    step: float | None = None


@dataclass(frozen=True)
class Row:
    """One node of the source program, compared."""

    index: int  # position among the program's call_function nodes
    node: str
    module: str  # the module that called it ("" for the model itself)
    op: str
    shape: list[int]
    max_abs_error: float
    sqnr_db: float | None  # None: identical
    steps: float | None  # the error in the tensor's int8 steps, for an int8 tensor
    within: bool


@dataclass
class DiffReport:
    """The comparison of one artifact's tensors with the source program's.

    Attributes:
        rows: the compared nodes, in graph order.
        nodes: call_function nodes of the program that compute a tensor.
        compared: nodes compared with a tapped tensor (``len(rows)``).
        covered_by_source: nodes not tapped whose value only moves a compared tensor (a view, a slice, a no-op
            dropout): they hold no error of their own.
        unaligned: the names of the other nodes, which the artifact kept no tensor of.
        precision: the artifact's precision, which sets the tolerance.
    """

    rows: list[Row]
    nodes: int
    covered_by_source: int
    unaligned: list[str] = field(default_factory=list)
    precision: str = "fp32"
    bundle: str = ""
    source: str = ""
    reference: str = "pytorch"  # what the taps were compared with: the source program, or another run's options
    checked: str = ""  # which kernels computed the taps (the format's TAP_CHECKED)

    @property
    def compared(self) -> int:
        return len(self.rows)

    @property
    def coverage(self) -> float:
        """The share of the program's tensor nodes compared directly or covered by the tensor they move."""
        return (self.compared + self.covered_by_source) / self.nodes if self.nodes else 0.0

    @property
    def first_divergence(self) -> Row | None:
        return next((row for row in self.rows if not row.within), None)

    def to_json(self) -> dict:
        first = self.first_divergence
        return {"bundle": self.bundle, "source": self.source, "reference": self.reference,
                "checked": self.checked, "precision": self.precision, "nodes": self.nodes, "compared": self.compared,
                "covered_by_source": self.covered_by_source, "coverage": round(self.coverage, 4),
                "first_divergence": asdict(first) if first else None, "unaligned": self.unaligned,
                "rows": [asdict(row) for row in self.rows]}


def op_name(node: torch.fx.Node) -> str:
    """``linear`` for ``aten.linear.default``; the target's own name for anything else."""
    target = node.target
    schema_name = getattr(target, "__name__", str(target))
    overload = getattr(target, "_overloadpacket", None)
    return getattr(overload, "__name__", schema_name.split(".")[0])


def module_path(node: torch.fx.Node) -> str:
    """The innermost module that called ``node``, as a dotted path from the model (``blocks.0.attn.qkv``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return _plain_path(path)


def _plain_path(path: str) -> str:
    # torch.export writes the path as Dynamo saw it: "L['self'].blocks[0].attn" or "blocks.0.attn"
    for prefix in ("L['self'].", "L['self']"):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path.replace("[", ".").replace("]", "").replace("'", "")


def tensor_nodes(program: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    """The program's call_function nodes whose value is one tensor, in graph order."""
    return [node for node in program.graph.nodes if node.op == "call_function"
            and isinstance(node.meta.get("val"), torch.Tensor)]


def reference_values(program: torch.export.ExportedProgram, args: tuple) -> dict[str, np.ndarray]:
    """Every tensor node's value when ``program`` runs on ``args``, by node name, as float32 numpy.

    Raises:
        ValueError: the inputs do not fit the program.
    """
    module = program.module()
    wanted = {node.name for node in tensor_nodes(program)}
    values: dict[str, np.ndarray] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.name in wanted and isinstance(result, torch.Tensor):
                value = _dequantized(node, result, self) if op_name(node) in QUANTIZE else result
                values[node.name] = value.detach().to(torch.float32).numpy().copy()
            return result

    try:
        with torch.no_grad():
            Recorder(module).run(*args)
    except (RuntimeError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"the inputs do not fit the source program ({first[:160]}): give inputs of the "
                         "manifest's shapes and dtypes") from err
    return values


def _dequantized(node: torch.fx.Node, integers: torch.Tensor, interpreter: torch.fx.Interpreter) -> torch.Tensor:
    """A PT2E quantize node's integers as the values they stand for, as a runtime's tap gives them."""
    scale, zero = (interpreter.env[a] if isinstance(a, torch.fx.Node) else a for a in node.args[1:3])
    if op_name(node) == "quantize_per_channel":  # per-channel scales along node.args[3]
        shape = [1] * integers.dim()
        shape[node.args[3]] = -1
        scale, zero = torch.as_tensor(scale).reshape(shape), torch.as_tensor(zero).reshape(shape)
    return (integers.to(torch.float32) - zero) * scale


def compare(program: torch.export.ExportedProgram, reference: dict[str, np.ndarray], taps: list[Tap],
            precision: str = "fp32", tolerance: float | None = None) -> DiffReport:
    """Each tapped tensor against the source program's value of its node, in graph order.

    Args:
        program: the source program whose nodes the taps name.
        reference: :func:`reference_values` of ``program`` on the inputs the artifact ran.
        taps: the artifact's tensors. A tap of a node the program lacks, or of another number of elements, is
            not compared; one of the same number of elements in another layout is compared flat.
        precision: the artifact's (``fp32``, ``fp16``, ``int8``...), which sets the tolerance.
        tolerance: the largest error relative to the reference tensor's largest magnitude, in place of the
            precision's default; int8 tensors are judged in steps either way.

    Returns:
        The :class:`DiffReport`.
    """
    by_node = {tap.node: tap for tap in taps}
    relative = tolerance if tolerance is not None else (
        INT8_FLOAT_TOLERANCE if precision.startswith("int8") else RELATIVE_TOLERANCE.get(precision, 1e-4))
    rows, unaligned, covered = [], [], 0
    compared: set[str] = set()
    for index, node in enumerate(tensor_nodes(program)):
        tap, expected = by_node.get(node.name), reference.get(node.name)
        if tap is not None and expected is not None and tap.value.size == expected.size:
            got = np.asarray(tap.value, np.float32).reshape(expected.shape)
            error = _max_error(expected, got)
            steps = error / tap.step if tap.step else None
            finite = np.abs(expected[np.isfinite(expected)])
            scale = float(finite.max()) if finite.size else 0.0
            within = steps <= INT8_STEPS if steps is not None else error <= relative * max(scale, 1e-6)
            rows.append(Row(index, node.name, module_path(node), op_name(node), list(expected.shape),
                            error, _sqnr(expected, got), steps, bool(within)))
            compared.add(node.name)
        elif op_name(node) in DATA_MOVEMENT and _moves_compared(node, compared):
            compared.add(node.name)  # its value is a compared tensor's, rearranged
            covered += 1
        else:
            unaligned.append(node.name)
    return DiffReport(rows, len(tensor_nodes(program)), covered, unaligned, precision)


def _max_error(expected: np.ndarray, got: np.ndarray) -> float:
    """The largest absolute difference; equal values count as none (a mask's -inf in both), and a NaN in
    only one of the two as an infinite error."""
    if not expected.size:
        return 0.0
    # Float kernels that clamp to the float32 range (LiteRT's builtin ones) hold -FLT_MAX where PyTorch
    # overflowed to -inf (a mask added to a mask): the same value to every consumer.
    largest = np.finfo(np.float32).max
    expected, got = np.clip(expected, -largest, largest), np.clip(got, -largest, largest)
    with np.errstate(invalid="ignore"):
        difference = np.where(expected == got, 0.0, np.abs(got.astype(np.float64) - expected))
    return float(np.nan_to_num(difference, nan=np.inf).max())


def _sqnr(expected: np.ndarray, got: np.ndarray) -> float | None:
    """SQNR over the finite values both agree are finite (a mask's -inf is no signal)."""
    finite = np.isfinite(expected) & np.isfinite(got)
    return sqnr_db([expected[finite]], [got[finite]]) if finite.any() else None


def _moves_compared(node: torch.fx.Node, compared: set[str]) -> bool:
    source = node.args[0] if node.args else None
    return isinstance(source, torch.fx.Node) and (source.name in compared or source.op in ("placeholder",
                                                                                            "get_attr"))


# ---------------------------------------------------------------------------------------------------------------
# A bundle against its source: the runtimes' taps, the source program, the files written.

# Each format's tap: (bundle, program, sample, threads, options) -> the artifact's tensors in its runtime, each
# naming the node of ``program`` (the source program) whose value it holds.
TAPS: dict[str, Callable] = {}
# The options each format's tap takes (what `diff --against` can vary).
TAP_OPTIONS: dict[str, tuple[str, ...]] = {}
# What each format's tap runs, which the report states: the bundle's own file, or another build of its program.
TAP_CHECKED: dict[str, str] = {}


def register_tap(fmt: str, options: tuple[str, ...] = (), checked: str = ""):
    """Register the function that exposes format ``fmt``'s intermediate tensors, taking ``options``, whose
    tensors come from the kernels ``checked`` says; returns it unchanged."""

    def wrap(function: Callable) -> Callable:
        TAPS[fmt], TAP_OPTIONS[fmt], TAP_CHECKED[fmt] = function, options, checked
        return function

    return wrap


@register_tap("onnx", options=("optimization",),
              checked="ONNX Runtime's kernels, the bundle's .onnx with its tagged values made graph outputs")
def onnx_taps(bundle, program, sample: list[np.ndarray], threads: int, options: dict) -> list[Tap]:
    """ONNX Runtime, with every value the exporter tagged with its source node made a graph output."""
    from difftx_edge.runtimes.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(bundle.artifact, threads, optimization=options.get("optimization", "all"))
    return [Tap(node, value, step) for node, value, step in runner.intermediates(sample)]


@register_tap("litert", checked="LiteRT's builtin kernels, the bundle's .tflite run without the XNNPACK "
                                  "delegate")
def litert_taps(bundle, program, sample: list[np.ndarray], threads: int, options: dict) -> list[Tap]:
    """LiteRT's builtin kernels (not XNNPACK's: see ``LiteRTRunner.intermediates``), each tensor named after
    the nodes the exporter's converter made it from.

    A tensor of one node is that node's value (the last in execution order
    wins). A fused op's tensor lists several nodes, and the converter
    commutes ops inside it (a scalar MUL hoisted above a RESHAPE gave the
    RESHAPE's tensor both names): its value is that of the last listed node
    in graph order, and only when the sizes agree; else it is left out. The
    graph outputs go to the program's outputs by position.
    """
    from difftx_edge.runtimes.litert import OUTPUT, LiteRTRunner

    order = {node.name: index for index, node in enumerate(program.graph.nodes)}
    nodes = {node.name: node for node in tensor_nodes(program)}
    sizes = {name: node.meta["val"].numel() for name, node in nodes.items()}
    outputs = {f"{OUTPUT}{position}": getattr(node, "name", None)
               for position, node in enumerate(program.graph.output_node().args[0])}
    taps: dict[str, Tap] = {}
    for names, value, step in LiteRTRunner(bundle.artifact, threads).intermediates(sample):
        if names[0].startswith(OUTPUT):
            node = outputs.get(names[0])
        else:
            node = max((name for name in names if name in order), key=order.__getitem__, default=None)
        if node not in sizes or (len(names) > 1 and sizes[node] != value.size):
            continue
        if step is not None and op_name(nodes[node]) not in QUANTIZE:
            # An int8 tensor of a node the program computes in float: the converter moved the program's next
            # quantize up through views and cat, so the tensor holds that quantize's value (clipped at its
            # range), which is what it is compared with; the node itself only through a float tensor.
            quantize = _next_quantize(nodes[node], step)
            if quantize is not None:
                if sizes[quantize] == value.size:
                    taps[quantize] = Tap(quantize, value, step)
                continue
        taps[node] = Tap(node, value, step)
    return list(taps.values())


def _next_quantize(node: torch.fx.Node, step: float) -> str | None:
    """The quantize of scale ``step`` that ``node``'s value reaches through views and cat alone, if any."""
    while len(node.users) == 1:
        (node,) = node.users
        if op_name(node) in QUANTIZE:
            scale = node.args[1]
            return node.name if isinstance(scale, float) and abs(scale - step) <= 1e-6 * step else None
        if op_name(node) not in DATA_MOVEMENT | {"cat"}:
            return None
    return None


# ExecuTorch: a .pte cannot expose its intermediates (ETDump sees the XNNPACK delegate as one opaque call, and
# tapping the delegate's tensors as extra outputs, devtools.intermediate_output_tap, splits an int8 program into
# many partitions). So the bundle's program is lowered again without XNNPACK and run on the portable kernels,
# one build for fp32 and int8 alike; the outputs are the bundle's .pte's own (docs/export.md).
@register_tap("executorch", checked="portable kernels, an undelegated build of the bundle's program; its outputs "
                                    "from the bundle's .pte (XNNPACK)")
def executorch_taps(bundle, program, sample: list[np.ndarray], threads: int, options: dict) -> list[Tap]:
    """The intermediates of the bundle's program on ExecuTorch's portable kernels, every instruction's output
    kept by ETDump (``convert/executorch.py``: ``portable_intermediates``), and the outputs of its .pte.

    The program is rebuilt from the run the manifest names, found as ``find_source`` finds it and holding the
    checkpoint the manifest's sha256 names, else it is ``program`` (from ``--source``). Its node names are
    ``program``'s: the same model code exports to the same names.
    """
    from difftx_edge.convert.executorch import portable_intermediates
    from difftx_edge.hashing import sha256_file
    from difftx_edge.runtimes.executorch import ExecuTorchRunner

    recorded = bundle.manifest.get("source") or {}
    try:
        run = find_source(bundle, None)
    except ValueError:
        run = None
    if run is not None and sha256_file(run / "model.safetensors") == recorded.get("sha256"):
        program = source_program(run, bundle.manifest, sample)
    taps = [Tap(node, value, step) for node, value, step in portable_intermediates(program, sample)]
    # Last, so they replace the portable build's values of the output nodes: a .pte that does not hold this
    # program, or whose XNNPACK kernels drift, shows there.
    outputs = torch.utils._pytree.tree_leaves(program.graph.output_node().args[0])
    ran = ExecuTorchRunner(bundle.artifact, threads).run(sample)
    return taps + [Tap(node.name, np.asarray(value, np.float32)) for node, value in zip(outputs, ran, strict=True)
                   if isinstance(node, torch.fx.Node) and node.op == "call_function"]


def find_source(bundle, source: str | os.PathLike | None) -> Path:
    """The run the bundle was exported from: ``source`` when given, else the manifest's run found in the
    working directory or beside the bundle.

    Raises:
        ValueError: no source given and none found.
    """
    if source is not None:
        path = Path(source)
        if not (path / "config.json").is_file():
            raise ValueError(f"--source {path} is not a run folder (it has no config.json): give the run the bundle "
                             "was exported from")
        return path
    recorded = bundle.manifest.get("source") or {}
    name = recorded.get("run") if isinstance(recorded.get("run"), str) else None
    candidates = [Path(name), bundle.path.parent / name, bundle.path.parent.parent / name] if name else []
    found = next((c for c in candidates if (c / "config.json").is_file() and Path(name).name == name), None)
    if found is None:
        made = f"run {name!r}" if name else "a source the manifest does not name"
        raise ValueError(f"{bundle.path} was made from {made}, not found here or beside the bundle: give "
                         "--source RUN (the run folder it was exported from)")
    return found


def source_program(source: Path, manifest: dict, sample: list[np.ndarray]) -> torch.export.ExportedProgram:
    """The program the bundle's artifact was exported from, with the node names its exporter saw.

    A run's fp32 bundle: the run's model exported at the sample's shape, as
    ``export`` does. Its int8 bundle: the int8 program ``quantize`` wrote
    (the manifest's ``quantized_from``), re-exported at the sample's batch.

    Raises:
        ValueError: a run without the int8 program the bundle came from.
    """
    from difftx_edge.convert.api import source_program_of_run

    return source_program_of_run(source, manifest.get("precision", "fp32"), manifest.get("quantized_from"),
                                 tuple(torch.from_numpy(x) for x in sample))


def diff_bundle(bundle_path: str | os.PathLike, *, source: str | os.PathLike | None = None,
                inputs: str | os.PathLike | None = None, tolerance: float | None = None, threads: int = 1,
                options: dict | None = None, against: dict | None = None,
                quiet: Callable[[str], ContextManager] | None = None) -> DiffReport:
    """Run the bundle's artifact in its runtime with its intermediate tensors exposed, and compare each with
    the source program's value of the node it holds, or with the same artifact run another way.

    Args:
        bundle_path: a bundle folder (artifact and ``manifest.json``).
        source: the run it was exported from; None finds the manifest's run beside it. It names, orders and
            places the nodes even when ``against`` replaces PyTorch as the reference.
        inputs: an ``.npz`` of inputs named as in the manifest, ``(S, *shape)``; its first sample runs. None:
            the manifest's example inputs (seed 0).
        tolerance: see :func:`compare`.
        options: the tap's options for the run compared: ``optimization`` for ONNX Runtime.
        against: tap options of a second run of the same artifact to compare with instead of PyTorch (ONNX
            Runtime at another ``optimization``).
        quiet: ``quiet(title)`` is a context that keeps the runtimes' and PyTorch's output off the terminal
            (the CLI's log); it is entered only once the bundle, source and inputs have been checked, so bad
            input leaves nothing behind.

    Raises:
        ValueError: one line, for a bundle that is not sound, a format diff cannot tap, a missing source,
            inputs that do not fit, or a runtime that is not installed.
    """
    from difftx_edge.runtimes.registry import Bundle, runtime_for

    bundle = Bundle.open(bundle_path)
    fmt = bundle.manifest["format"]
    if fmt not in TAPS:
        raise ValueError(f"diff cannot yet expose the tensors of {fmt} artifacts; it taps {', '.join(sorted(TAPS))}")
    runtime_for(fmt).require()
    unknown = sorted((set(options or {}) | set(against or {})) - set(TAP_OPTIONS[fmt]))
    if unknown:
        raise ValueError(f"{fmt} bundles take no {', '.join(unknown)} option (it chooses how ONNX Runtime runs an "
                         ".onnx file): leave it out")
    found = find_source(bundle, source)
    sample = bundle.example_inputs(seed=0)
    program = source_program(found, bundle.manifest, sample)
    if inputs is not None:
        from difftx_edge.convert.inputs import read_samples
        from difftx_edge.io import require_input_file

        path = require_input_file(inputs, "inputs", "give an .npz of arrays named after the bundle's inputs")
        sample = list(read_samples(program, path)[0])
    with (quiet or (lambda title: contextlib.nullcontext()))(f"diff {bundle.path}"):
        taps = TAPS[fmt](bundle, program, sample, threads, options or {})
        if against is None:
            reference = reference_values(program, tuple(torch.from_numpy(x) for x in sample))
        else:
            reference = {tap.node: tap.value for tap in TAPS[fmt](bundle, program, sample, threads, against)}
    report = compare(program, reference, taps, bundle.manifest["precision"], tolerance)
    report.bundle, report.source, report.checked = str(bundle.path), str(found), TAP_CHECKED[fmt]
    report.reference = "pytorch" if against is None else ", ".join(f"{k}={v}" for k, v in sorted(against.items()))
    return report


def write_report(report: DiffReport, out: str | os.PathLike) -> dict[str, Path]:
    """``diff.json``, ``diff.md`` (the per-node table) and ``diff.png`` (SQNR along the graph) in ``out``, each
    written atomically; returns their paths by kind. The plot needs matplotlib (the ``bench`` extra): without
    it the other two are written and the returned dict has no ``png``."""
    from difftx_edge.extras import missing_modules
    from difftx_edge.io import atomic_write_bytes, atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "diff.json", "md": out / "diff.md"}
    atomic_write_json(written["json"], report.to_json())
    atomic_write_bytes(written["md"], render_table(report).encode())
    if not missing_modules(["matplotlib"]):
        written["png"] = out / "diff.png"
        atomic_write_bytes(written["png"], render_plot(report))
    return written


def render_table(report: DiffReport) -> str:
    """The markdown report: what was compared, the first divergence, and every compared node in graph order."""
    from difftx_edge.markdown import markdown_table, number_cell

    first = report.first_divergence
    header = ["#", "node", "module", "op", "shape", "max abs error", "SQNR dB", "int8 steps", ""]
    rows = [[row.index, row.node, row.module or "(model)", row.op, "x".join(map(str, row.shape)),
             f"{row.max_abs_error:.3g}", number_cell(row.sqnr_db, 1), number_cell(row.steps, 2),
             "**first beyond tolerance**" if row is first else ("" if row.within else "beyond")]
            for row in report.rows]
    against = (f"the source program of {report.source}" if report.reference == "pytorch"
               else f"the same artifact run with {report.reference}")
    checked = [f"The artifact's tensors come from {report.checked}.", ""] if report.checked else []
    lines = [f"# diff: {report.bundle} against {against}", "", *checked, summary_line(report), "",
             markdown_table(header, rows)]
    if report.unaligned:
        lines += ["", f"Not compared (the artifact keeps no tensor of them): {', '.join(report.unaligned)}."]
    return "\n".join(lines) + "\n"


def summary_line(report: DiffReport) -> str:
    """One line: the first node beyond tolerance (or none) and how much of the graph was compared."""
    first = report.first_divergence
    where = (f"first beyond tolerance: {first.node} ({first.op}) in {first.module or 'the model'}, max abs error "
             f"{first.max_abs_error:.3g}" + (f" = {first.steps:.1f} int8 steps" if first.steps is not None else "")
             + (f", SQNR {first.sqnr_db:.1f} dB" if first.sqnr_db is not None else "")
             if first else "every compared tensor is within tolerance")
    return (f"{where}; {report.compared} of {report.nodes} nodes compared, {report.covered_by_source} more only "
            f"move a compared tensor ({report.coverage:.0%} covered)")


def render_plot(report: DiffReport) -> bytes:
    """PNG bytes: SQNR of each compared node along the graph, the first divergence marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # An identical tensor has no noise (SQNR None): drawn at the top of the axis, not left out.
    finite = [row.sqnr_db for row in report.rows if row.sqnr_db is not None]
    ceiling = max(finite + [60.0]) + 10
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot([row.index for row in report.rows], [ceiling if row.sqnr_db is None else row.sqnr_db
                                                 for row in report.rows], marker=".", linewidth=0.8)
    first = report.first_divergence
    if first is not None:
        ax.axvline(first.index, color="tab:red", linestyle="--")
        ax.annotate(f"first beyond tolerance: {first.node}\n({first.module or 'model'})",
                    (first.index, first.sqnr_db if first.sqnr_db is not None else 0), fontsize=8,
                    color="tab:red", xytext=(5, 5), textcoords="offset points")
    ax.set(xlabel="node (graph order)", ylabel="SQNR against the source (dB)",
           title=f"{Path(report.bundle).name}: SQNR along the graph (identical: top of the axis)")
    ax.grid(True, alpha=0.3)
    from difftx_edge.runtimes.results import figure_png

    return figure_png(fig)
