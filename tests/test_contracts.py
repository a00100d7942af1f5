"""The plug-in contracts: every registered format, runtime and target holds what its callers read of it.

Each test is parametrized over its registry, so a plug-in added later is held to the same contract.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from difftx_edge.convert import FORMATS, PRECISIONS, FormatSpec
from difftx_edge.convert import bundle as bundle_code
from difftx_edge.convert.registry import register_format
from difftx_edge.quantize import QUANTIZERS
from difftx_edge.quantize.registry import QuantizerSpec
from difftx_edge.runtimes import RUNTIMES, RuntimeSpec, runtime_for
from difftx_edge.runtimes.targets import TARGETS, CommandTarget, Target


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


# Formats ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_fills_in_what_the_bundle_code_reads(name):
    spec = FORMATS[name]
    assert isinstance(spec, FormatSpec) and spec.name == name
    assert spec.filename == Path(spec.filename).name, "the artifact is a plain name inside its bundle"
    assert spec.precisions and set(spec.precisions) <= set(PRECISIONS)
    assert spec.quantizer in QUANTIZERS, "its int8 programs come from a registered quantizer"
    assert spec.extra and spec.requires and all(isinstance(m, str) for m in spec.requires)
    assert parameters(spec.export) == ["program", "path", "precision", "options"]
    if spec.check == "runtime":
        assert runtime_for(name).format == name  # parity runs the artifact in this runtime
    else:
        assert parameters(spec.reference) == ["artifact", "facts"] and spec.reference_name
    if spec.artifact_io is not None:
        assert parameters(spec.artifact_io) == ["artifact", "facts", "inputs", "outputs"]
    for key, holds in spec.manifest_keys:
        assert isinstance(key, str) and holds, key
        assert key not in bundle_code.MANIFEST_SCHEMA, f"{key} is every manifest's, not one format's"
    # Adding a format touches one new file: its hooks live in the module that registers its exporter.
    for hook in (spec.artifact_io, spec.reference):
        assert hook is None or hook.__module__ == spec.export.__module__


def test_the_bundle_code_names_no_format():
    """bundle.py and the registry read formats only through FormatSpec: no format's name or file in them."""
    named = {name for spec in FORMATS.values() for name in (spec.name, spec.filename)}
    for module in (bundle_code, inspect.getmodule(FormatSpec)):
        found = {node.value for node in ast.walk(ast.parse(inspect.getsource(module)))
                 if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not found & named, f"{module.__name__} names {sorted(found & named)}"


def manifest_of(spec: FormatSpec) -> dict:
    """The smallest manifest that passes the common schema, with every fact this format's exporter returns."""
    tensor = {"name": "x", "shape": [1, 4], "dtype": "float32"}
    parity = {"max_abs_error": 0.0, "mean_abs_error": 0.0, "top1_agreement": 1.0, "samples": 1, "passed": True,
              "tolerance": "max abs error <= 0.0001", "check": "runtime", "machine": {}}
    return {"format": spec.name, "precision": spec.precisions[0], "artifact": spec.filename, "artifact_bytes": 1,
            "artifact_sha256": "0" * 64, "inputs": [tensor], "outputs": [tensor], "task": None, "source": {},
            "versions": {}, "parity": parity, "accuracy": None, "export_seconds": 0.0,
            **{key: {} for key, _ in spec.manifest_keys}}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_a_manifest_without_a_format_fact_is_refused(name):
    spec = FORMATS[name]
    manifest = manifest_of(spec)
    bundle_code.validate_manifest(manifest)
    for key, _ in spec.manifest_keys:
        with pytest.raises(ValueError, match=f"{spec.name} bundle lacks '{key}'") as error:
            bundle_code.validate_manifest({k: v for k, v in manifest.items() if k != key})
        assert "\n" not in str(error.value)


def test_a_reference_check_comes_with_its_reference():
    def export(program, path, precision, options):
        return {}

    with pytest.raises(ValueError, match="check must be"):
        register_format("probe", filename="m", precisions=("fp32",), quantizer="xnnpack", extra="x",
                        requires=("x",), check="eyeballed")(export)
    with pytest.raises(ValueError, match="reference and its name"):
        register_format("probe", filename="m", precisions=("fp32",), quantizer="xnnpack", extra="x",
                        requires=("x",), check="reference")(export)
    assert "probe" not in FORMATS


# Quantizers ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_every_quantizer_has_what_quantize_and_export_read(name):
    from torchao.quantization.pt2e.quantizer import Quantizer

    spec = QUANTIZERS[name]
    assert isinstance(spec, QuantizerSpec) and spec.name == name
    assert spec.extra and spec.requires and isinstance(spec.int32_bias, bool)
    assert isinstance(spec.runtime, str) and spec.runtime, "it names where its integer kernels run"
    assert any(fmt.quantizer == name for fmt in FORMATS.values()), "some format converts its programs"
    assert parameters(spec.build) == (["qat", "dynamic"] if spec.dynamic else ["qat"])
    for qat in (False, True):
        assert isinstance(spec.quantizer(qat), Quantizer)
    if spec.dynamic:  # int8-dynamic, for convert: a format that lists it converts with this quantizer
        assert isinstance(spec.dynamic_quantizer(), Quantizer)
    formats_with_it = [fmt for fmt in FORMATS.values() if fmt.quantizer == name and "int8-dynamic" in fmt.precisions]
    assert bool(formats_with_it) == spec.dynamic, "int8-dynamic is listed exactly where the quantizer has it"


# Runtimes -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_every_runtime_has_what_its_callers_read(name):
    """RuntimeSpec's runner: ``runner(path, threads[, device])`` with ``run`` and ``info``, and a static
    ``import_runtime`` (the measure module times it as the memory baseline)."""
    spec = RUNTIMES[name]
    assert isinstance(spec, RuntimeSpec) and spec.name == name
    # Eager torch runs a training run's directory, the baseline; every other runtime runs a registered format.
    assert spec.format in FORMATS or spec.format == "torch"
    assert "cpu" in spec.devices and set(spec.devices) <= {"cpu", "cuda"}
    assert spec.requires and all(group and all(isinstance(m, str) for m in group) for group in spec.requires)
    assert parameters(spec.runner)[:2] == ["path", "threads"]
    if "cuda" in spec.devices:
        assert "device" in parameters(spec.runner)  # RuntimeSpec.load passes it off the CPU
    for method in ("run", "info"):
        assert callable(getattr(spec.runner, method, None)), f"{name} lacks {method}"
    assert isinstance(inspect.getattr_static(spec.runner, "import_runtime", None), staticmethod)


# Targets ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", sorted(TARGETS))
def test_every_command_target_implements_its_hooks(scheme):
    """A CommandTarget runs rows through stage, command, fetch, python and native_dir: each is its own."""
    cls = TARGETS[scheme]
    assert issubclass(cls, Target)
    if not issubclass(cls, CommandTarget):
        assert cls.run is not Target.run and cls.describe is not Target.describe
        return
    for hook in ("stage", "command", "fetch", "python", "native_dir"):
        assert getattr(cls, hook) is not getattr(CommandTarget, hook), f"{scheme} does not implement {hook}"


def test_every_target_has_what_the_harness_reads():
    """Each attribute the harness reads of a target (``target.x``, or ``target_class(url).x`` before one is
    made) is declared on Target, and every registered target subclasses it and implements its methods. The adb
    target once copied the interface by hand, missed ``measures_accuracy``, and --accuracy ended in a traceback."""
    from difftx_edge.runtimes import bench as harness

    def is_target(node: ast.expr) -> bool:
        if isinstance(node, ast.Call):
            return isinstance(node.func, ast.Name) and node.func.id == "target_class"
        return isinstance(node, ast.Name) and node.id == "target"

    read = {node.attr for node in ast.walk(ast.parse(inspect.getsource(harness)))
            if isinstance(node, ast.Attribute) and is_target(node.value)}
    read -= set(dir(dict))  # table() names the results' target dict "target" too: dict methods are the dict's
    assert {"describe", "run", "device", "runtimes", "measures_accuracy"} <= read
    declared = set(dir(Target("probe")))  # url and timeout are set by its constructor
    assert read <= declared, f"the harness reads {sorted(read - declared)}, which Target does not declare"

    assert {"local", "cuda", "ssh", "adb"} <= set(TARGETS)
    for scheme, cls in TARGETS.items():
        assert issubclass(cls, Target), scheme
        for method in ("describe", "run"):
            assert getattr(cls, method) is not getattr(Target, method), f"{scheme} does not implement {method}"
        assert isinstance(cls.emulated, bool) and isinstance(cls.measures_accuracy, bool), scheme
        assert cls.device in ("cpu", "cuda"), scheme
        assert cls.runtimes is None or set(cls.runtimes) <= set(RUNTIMES), scheme
        assert "timeout" in inspect.signature(cls).parameters, scheme  # make_target passes --timeout
