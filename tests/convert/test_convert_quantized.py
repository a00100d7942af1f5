"""A program the user quantized already with PT2E converts as int8: every format, parity in output steps.

The program is made as a user would: ``prepare_pt2e`` with ExecuTorch's XNNPACK quantizer, calibration,
``convert_pt2e``, ``torch.export.export`` and ``torch.export.save``; difftx-edge's own quantizers are not
involved.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import MLP

from difftx_edge.cli import main
from difftx_edge.convert import FORMATS, convert_pt2
from difftx_edge.convert.bundle import MANIFEST


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """``(quantized.pt2, float.pt2)`` of the same small MLP."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    root = tmp_path_factory.mktemp("quantized")
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(16, 2, 12)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model, (x[0],)).module(), quantizer)
    for batch in x:
        prepared(batch)
    torch.export.save(torch.export.export(convert_pt2e(prepared), (x[0],)), root / "quantized.pt2")
    torch.export.save(torch.export.export(model, (x[0],)), root / "float.pt2")
    return root / "quantized.pt2", root / "float.pt2"


def check_int8(manifest: dict) -> None:
    assert manifest["precision"] == "int8", "the manifest says what the program is"
    parity = manifest["parity"]
    assert parity["passed"] and parity["output_step"] > 0 and parity["max_steps"] <= 2, parity


def test_a_quantized_program_converts_as_int8_without_being_asked(programs, tmp_path):
    (manifest,) = convert_pt2(programs[0], tmp_path, "onnx", threads=1, parity_batches=4)
    check_int8(manifest)
    assert json.loads((tmp_path / "onnx-int8" / MANIFEST).read_text())["precision"] == "int8"


@pytest.mark.slow
def test_a_quantized_program_converts_to_every_format(programs, tmp_path):
    manifests = convert_pt2(programs[0], tmp_path, "all", precision="int8", threads=1, parity_batches=4)
    assert sorted(m["format"] for m in manifests) == sorted(FORMATS)
    for manifest in manifests:
        check_int8(manifest)


@pytest.mark.parametrize("which, args, needle", [
    ("quantized", ["--format", "coreml", "--precision", "fp16"], "quantized already"),
    ("quantized", ["--format", "onnx", "--precision", "int8", "--calibration", __file__], "nothing to calibrate"),
])
def test_a_precision_the_program_cannot_be_is_one_line(programs, tmp_path, capfd, which, args, needle):
    pt2 = programs[0] if which == "quantized" else programs[1]
    capfd.readouterr()
    code = main(["convert", str(pt2), "--out", str(tmp_path / "out"), *args])
    lines = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "out").exists()
