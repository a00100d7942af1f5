"""int8 of any torch.export program (quantize_program), exported to every format and held to parity there.

Each bundle must come within 2 output steps of the PyTorch int8 program in its runtime (build_bundle's
parity). The int8 program's top-1 is also compared with fp32's, with a loose bound: these tiny models have
random weights, whose top-2 logits lie closer than int8's rounding on about 1 input in 50 (at d_model 32 and
128 held-out inputs, agreement was 98.4-100 %), so 16 inputs cannot hold them to 99 %.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from difftx_edge import zoo
from difftx_edge.convert import FORMATS
from difftx_edge.convert.bundle import build_bundle
from difftx_edge.convert.inputs import example_args
from difftx_edge.quantize.program import quantize_program

# Tiny zoo models: seconds per format on 2 cores.
SIZES = {"encoder-prenorm": dict(d_model=16, heads=2, layers=1, seq_len=16),
         "cnn-1d": dict(channels=16, seq_len=16)}
CALIBRATION, PARITY = 16, 16
FP32_TOP1 = 0.8  # see the module docstring


@pytest.fixture(scope="module")
def zoo_programs():
    """name -> (fp32 program, calibration samples, parity inputs) for each model in SIZES."""
    found = {}
    for name, sizes in SIZES.items():
        model, example = zoo.build(name, **sizes)
        program = torch.export.export(model, (example,))
        arrays, _ = example_args(program, 0, CALIBRATION + PARITY)
        found[name] = (program, [(torch.from_numpy(a),) for a in arrays[:CALIBRATION]], arrays[CALIBRATION:])
    return found


def bundle(fmt: str, quantized, parity: list[np.ndarray], out, precision: str = "int8") -> dict:
    """build_bundle as convert_pt2 calls it, with the int8 program's PyTorch module as the reference."""
    def reference(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return quantized.module(torch.from_numpy(x)).numpy()

    meta = {"inputs": [{"name": "x", "shape": list(parity[0].shape), "dtype": str(parity[0].dtype)}],
            "outputs": [{"name": "output", "shape": list(reference(parity[0]).shape), "dtype": "float32"}],
            "task": None, "source": {"zoo": "test"}, "versions": {}}
    return build_bundle(FORMATS[fmt], quantized.program, precision, out=out, reference=reference,
                        parity_inputs=parity, output_step=quantized.output_step, meta=meta, threads=1,
                        options={"example": (torch.from_numpy(parity[0]),), "deployment_target": "iOS17"})


def fp32_agreement(program, quantized, parity: list[np.ndarray]) -> float:
    with torch.no_grad():
        fp32 = np.concatenate([program.module()(torch.from_numpy(x)).numpy() for x in parity])
        int8 = np.concatenate([quantized.module(torch.from_numpy(x)).numpy() for x in parity])
    return float((fp32.argmax(-1) == int8.argmax(-1)).mean())


def within_steps(manifest: dict, step: float) -> float:
    return manifest["parity"]["max_abs_error"] / step


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SIZES))
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_static_int8_of_a_zoo_model_passes_parity_in_every_format(zoo_programs, tmp_path, name, fmt):
    program, calibration, parity = zoo_programs[name]
    quantized = quantize_program(program, FORMATS[fmt].quantizer, calibration)
    facts = quantized.facts
    assert facts["scheme"] == "static" and facts["quantizer"] == FORMATS[fmt].quantizer
    assert facts["weights"] == "per-channel int8" and facts["calibration_samples"] == CALIBRATION
    assert facts["int8_weights"] > 0 and facts["ops"]["integer"], facts
    assert quantized.output_step == facts["output_step"] > 0
    manifest = bundle(fmt, quantized, parity, tmp_path)
    assert manifest["parity"]["passed"] and within_steps(manifest, quantized.output_step) <= 2 + 1e-3
    assert fp32_agreement(program, quantized, parity) >= FP32_TOP1, "int8 keeps fp32's top-1"


@pytest.mark.slow
def test_int8_dynamic_runs_in_executorch(zoo_programs, tmp_path):
    program, calibration, parity = zoo_programs["encoder-prenorm"]
    quantized = quantize_program(program, "xnnpack", calibration, dynamic=True)
    assert quantized.facts["scheme"] == "dynamic" and "/ 255" in quantized.facts["output_step_from"]
    assert quantized.facts["ops"]["integer"].get("aten.linear"), quantized.facts["ops"]
    manifest = bundle("executorch", quantized, parity, tmp_path, precision="int8-dynamic")
    assert manifest["parity"]["passed"] and within_steps(manifest, quantized.output_step) <= 2 + 1e-3
    assert fp32_agreement(program, quantized, parity) >= FP32_TOP1


class Masked(nn.Module):
    """Scores plus an additive -inf mask, then softmax: what attention does to padding."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 6, 8)
        scores = self.proj(x) @ x.transpose(1, 2)  # (B, 6, 6)
        mask = torch.full((6, 6), float("-inf")).triu(1)
        return self.head(torch.softmax(scores + mask, dim=-1) @ x).mean(1)


def test_a_mask_int8_cannot_hold_stays_float():
    torch.manual_seed(0)
    model, samples = Masked().eval(), [(torch.randn(1, 6, 8),) for _ in range(8)]
    quantized = quantize_program(torch.export.export(model, samples[0]), "xnnpack", samples)
    assert any(op.startswith("aten.add") for op in quantized.facts["kept_float"]), quantized.facts
    with torch.no_grad():
        y, reference = quantized.module(*samples[0]), model(*samples[0])
    assert torch.isfinite(y).all() and (y - reference).abs().max() < 0.1


def one_line_error(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_nan_in_calibration_is_refused_in_one_line():
    model = nn.Linear(4, 3).eval()
    samples = [(torch.randn(2, 4),), (torch.tensor([[float("nan")] * 4] * 2),)]
    message = one_line_error(lambda: quantize_program(torch.export.export(model, samples[0]), "xnnpack", samples))
    assert "sample 1" in message and "NaN" in message


@pytest.mark.parametrize("samples, needle", [
    ([], "no calibration samples"),
    ([(torch.randn(2, 4), torch.randn(2, 4))], "has 2 tensors"),
    ([(torch.randn(2, 4),), (torch.randn(3, 4),)], "one static shape"),
    ([(torch.randn(2, 4).double(),)], "float64"),
])
def test_calibration_that_does_not_fit_is_one_line(samples, needle):
    program = torch.export.export(nn.Linear(4, 3).eval(), (torch.randn(2, 4),))
    assert needle in one_line_error(lambda: quantize_program(program, "xnnpack", samples))


@pytest.mark.parametrize("quantizer", ["onnx", "coreml"])
def test_int8_dynamic_where_the_toolchain_lacks_it_is_one_line(quantizer):
    samples = [(torch.randn(2, 4),)]
    program = torch.export.export(nn.Linear(4, 3).eval(), samples[0])
    message = one_line_error(lambda: quantize_program(program, quantizer, samples, dynamic=True))
    assert "does not support int8-dynamic" in message and "use int8" in message
