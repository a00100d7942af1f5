"""Core ML packages on Linux: the saved program, evaluated by coremltools' per-op numpy code, against PyTorch.

The Core ML runtime needs macOS, so nothing here runs Core ML: these tests check that
the saved .mlpackage (ops, wiring, stored weights, dequantization) computes what the
source model computes, through difftx_edge.convert.coreml_reference.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from difftx_edge import zoo
from difftx_edge.convert.coreml_reference import describe, reference_predict
from difftx_edge.model import ATTENTION, DiffTransformer, ModelConfig

KINDS = sorted(ATTENTION)
# Measured on these models (seed 0, and seeds 1-2 when the tolerances were chosen):
# fp32 <= 2.5e-7 abs; fp16 <= 1.3e-3 of the largest logit; int8 weights <= 1.1e-2 of it;
# the PT2E program <= 3 output steps from its torch graph.
FP32_ATOL = 1e-4
FP16_REL = 1e-2  # float16 carries 11 significant bits (4.9e-4 relative) through ~10 layers
INT8_REL = 3e-2  # per-channel int8 rounds each weight by up to 1/254 of its row's largest
PT2E_STEPS = 4  # ulp-level float differences can flip an intermediate requantization


@pytest.fixture(autouse=True)
def _one_thread():
    # The test machine is shared: keep this file to one core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(kind: str, causal: bool = False) -> tuple[DiffTransformer, torch.Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig(input_dim=4, n_outputs=10, max_len=16, d_model=32, n_heads=4, n_layers=2, attention=kind,
                      causal=causal, head="lm" if causal else "classify", window=2, rank=8, chunk=8, dropout=0.0)
    return DiffTransformer(cfg).eval(), torch.randn(2, 16, 4)


def save_package(module: nn.Module, x: torch.Tensor, path: Path, precision: str = "FLOAT32", target: str = "iOS17"):
    import coremltools as ct

    program = torch.export.export(module, (x,)).run_decompositions({})
    mlmodel = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target),
                         compute_precision=getattr(ct.precision, precision), skip_model_load=True)
    mlmodel.save(str(path))
    return mlmodel


def only_output(package: Path, x: torch.Tensor) -> np.ndarray:
    (out,) = reference_predict(package, {"x": x.numpy()}).values()
    return out


def eager(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return module(x).numpy()


def linear_weight_elements(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["classify", "causal-lm"])
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_package_matches_eager(kind, causal, tmp_path):
    model, x = small_model(kind, causal)
    save_package(model, x, tmp_path / "m.mlpackage")
    out, ref = only_output(tmp_path / "m.mlpackage", x), eager(model, x)
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=FP32_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_fp16_package_matches_eager_within_fp16_rounding(kind, tmp_path):
    model, x = small_model(kind)
    save_package(model, x, tmp_path / "m.mlpackage", precision="FLOAT16")
    out, ref = only_output(tmp_path / "m.mlpackage", x), eager(model, x)
    assert out.dtype == np.float16, "a FLOAT16 program's logits leave it as float16"
    scale = np.abs(ref).max()
    error = np.abs(out.astype(np.float64) - ref).max()
    assert error <= FP16_REL * scale, f"{error / scale:.2e} of the largest logit"
    # Not vacuous: the ops ran in float16 (a float32 evaluation lands within 1e-6).
    assert error > 1e-6
    info = describe(tmp_path / "m.mlpackage")
    assert set(info["weights"]) == {"fp16"} and info["ops"]["cast"] >= 1


def save_int8_weights(mlmodel, path) -> None:
    """Store ``mlmodel``'s weights as symmetric int8 with coremltools' own weight compression, at ``path``."""
    import coremltools as ct

    # weight_threshold 64: the default (2048 elements) would leave these small models' layers float.
    op_config = ct.optimize.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=64)
    ct.optimize.coreml.linear_quantize_weights(
        mlmodel, config=ct.optimize.coreml.OptimizationConfig(global_config=op_config)).save(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("target, decompress", [("iOS17", "constexpr_affine_dequantize"),
                                                ("iOS18", "constexpr_blockwise_shift_scale")])
def test_int8_weight_package_is_int8_and_close_to_eager(target, decompress, tmp_path):
    model, x = small_model("hybrid")
    mlmodel = save_package(model, x, tmp_path / "fp32.mlpackage", target=target)
    save_int8_weights(mlmodel, tmp_path / "int8.mlpackage")

    info = describe(tmp_path / "int8.mlpackage")
    assert info["deployment_target"] == target
    assert info["ops"].get(decompress, 0) >= 10  # every linear layer's weight, at least
    assert info["weights"]["int8"] >= linear_weight_elements(model)
    # Quantizing re-types weights; it neither drops nor invents any.
    assert sum(info["weights"].values()) == describe(tmp_path / "fp32.mlpackage")["weights"]["fp32"]

    out, ref = only_output(tmp_path / "int8.mlpackage", x), eager(model, x)
    scale = np.abs(ref).max()
    error = np.abs(out - ref).max()
    assert error <= INT8_REL * scale, f"{error / scale:.2e} of the largest logit"
    # Not vacuous: the dequantized int8 weights were used, not the float ones.
    assert error > 1e-6


@pytest.mark.slow
def test_pt2e_int8_package_matches_its_torch_graph(tmp_path):
    from difftx_edge.quantize import get_quantizer_spec, pt2e

    model, x = small_model("hybrid")
    graph = pt2e.export_for_quantization(model, x)
    prepared = pt2e.prepare(graph, get_quantizer_spec("coreml").quantizer(qat=False), qat=False)
    pt2e.calibrate(prepared, [x])
    converted = pt2e.convert(prepared)
    save_package(converted, x, tmp_path / "pt2e.mlpackage")

    info = describe(tmp_path / "pt2e.mlpackage")
    assert info["weights"]["int8"] >= linear_weight_elements(model)
    assert info["ops"]["quantize"] > 0 and info["ops"]["dequantize"] > 0  # int8 activations too
    step = pt2e.output_step(converted)
    gap = np.abs(only_output(tmp_path / "pt2e.mlpackage", x) - eager(converted, x)).max()
    assert gap <= PT2E_STEPS * step, f"{gap / step:.1f} output steps apart"


@pytest.mark.slow
def test_a_planted_weight_fault_is_caught(tmp_path):
    model, x = small_model("hybrid")
    save_package(model, x, tmp_path / "m.mlpackage")
    faulty = tmp_path / "faulty.mlpackage"
    shutil.copytree(tmp_path / "m.mlpackage", faulty)

    # Change one element of one stored weight, in the package's bytes and in a copy of the model alike.
    blob = faulty / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(blob.read_bytes())
    weight = model.blocks[0].mlp[0].weight
    stored = weight.detach().numpy().astype("<f4").tobytes()
    assert data.count(stored) == 1
    at = data.find(stored)
    data[at:at + 4] = np.array([weight[0, 0].item() + 1.0], dtype="<f4").tobytes()
    blob.write_bytes(bytes(data))
    with torch.no_grad():
        weight[0, 0] += 1.0

    out = only_output(faulty, x)
    np.testing.assert_allclose(out, eager(model, x), rtol=0, atol=FP32_ATOL)  # the fault, read as stored
    with torch.no_grad():
        weight[0, 0] -= 1.0
    assert np.abs(out - eager(model, x)).max() > 100 * FP32_ATOL  # and the original no longer matches
    np.testing.assert_allclose(only_output(tmp_path / "m.mlpackage", x), eager(model, x), rtol=0, atol=FP32_ATOL)


def test_describe_reports_interface_ops_and_weights(tmp_path):
    model, x = small_model("hybrid")
    save_package(model, x, tmp_path / "m.mlpackage")
    info = describe(tmp_path / "m.mlpackage")
    assert info["inputs"] == [{"name": "x", "shape": [2, 16, 4], "dtype": "float32"}]
    (output,) = info["outputs"]
    assert output["shape"] == [2, 10] and output["dtype"] == "float32"
    assert list(reference_predict(tmp_path / "m.mlpackage", {"x": x.numpy()})) == [output["name"]]
    assert info["deployment_target"] == "iOS17" and info["spec_version"] == 8
    # Ten linear layers: the input projection, qkv/out/two MLP layers per block, the head.
    assert info["ops"]["linear"] == 10
    assert info["ops"]["softmax"] >= 1 and info["ops"]["const"] > 0
    assert all(isinstance(n, int) and n > 0 for n in info["ops"].values())
    (dtype,) = info["weights"]
    assert dtype == "fp32"
    assert linear_weight_elements(model) <= info["weights"]["fp32"] <= model.num_parameters()


def test_an_op_without_numpy_code_is_refused_by_name(tmp_path):
    upsample = nn.ConvTranspose1d(2, 3, kernel_size=3).eval()
    save_package(upsample, torch.randn(1, 2, 8), tmp_path / "up.mlpackage")
    with pytest.raises(ValueError, match="no numpy implementation for op conv_transpose$"):
        reference_predict(tmp_path / "up.mlpackage", {"input": np.zeros((1, 2, 8), np.float32)})


def test_inputs_must_match_the_program(tmp_path):
    model, x = small_model("softmax")
    save_package(model, x, tmp_path / "m.mlpackage")
    with pytest.raises(ValueError, match="do not match the program's inputs"):
        reference_predict(tmp_path / "m.mlpackage", {"input": x.numpy()})
    with pytest.raises(ValueError, match="does not match the declared"):
        reference_predict(tmp_path / "m.mlpackage", {"x": x[:1].numpy()})
    with pytest.raises(ValueError, match="cannot cast"):
        reference_predict(tmp_path / "m.mlpackage", {"x": x.numpy().astype(np.complex64)})


def test_importing_the_module_does_not_import_coremltools():
    code = ("import sys, difftx_edge.convert.coreml_reference\n"
            "assert 'coremltools' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


class Functional(nn.Module):
    """One torch.nn.functional call with fixed weights: what the MIL op must compute."""

    def __init__(self, fn, *tensors: torch.Tensor, **kwargs) -> None:
        super().__init__()
        self.fn, self.kwargs = fn, kwargs
        self.tensors = nn.ParameterList(tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.tensors, **self.kwargs)


def conv_case(spatial: int, c_in: int, c_out: int, kernel, groups: int = 1, bias: bool = True, **kwargs):
    kernel = (kernel,) * spatial if isinstance(kernel, int) else kernel
    weight = torch.randn(c_out, c_in // groups, *kernel)
    tensors = (weight, torch.randn(c_out)) if bias else (weight,)
    return Functional(F.conv1d if spatial == 1 else F.conv2d, *tensors, groups=groups, **kwargs)


CONVS = {  # name -> (module, input shape); torch's padding ints become MIL pad_type "custom"
    "1d": (lambda: conv_case(1, 3, 5, 3), (2, 3, 17)),
    "1d-strided-dilated-grouped-padded": (
        lambda: conv_case(1, 4, 6, 3, groups=2, stride=2, padding=2, dilation=2), (2, 4, 19)),
    "2d": (lambda: conv_case(2, 3, 8, 3), (2, 3, 9, 11)),
    "2d-depthwise": (lambda: conv_case(2, 6, 12, 3, groups=6, padding=1), (1, 6, 8, 8)),
    "2d-strided-padded-no-bias": (
        lambda: conv_case(2, 4, 6, (3, 2), bias=False, stride=(2, 3), padding=(1, 2)), (2, 4, 10, 13)),
    "2d-same-odd-dilated": (lambda: conv_case(2, 4, 6, 4, padding="same", dilation=2), (1, 4, 9, 10)),
    "2d-same-even": (lambda: conv_case(2, 4, 6, (4, 2), padding="same"), (1, 4, 9, 10)),
}


@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_matches_torch_functional(case, tmp_path):
    torch.manual_seed(0)
    build, shape = CONVS[case]
    module, x = build().eval(), torch.randn(*shape)
    mlmodel = save_package(module, x, tmp_path / "m.mlpackage")
    (conv,) = (op for op in mlmodel._mil_program.functions["main"].operations if op.op_type != "const")
    assert conv.op_type == "conv", "the package must hold the one MIL conv this test is about"
    assert conv.pad_type.val == ("same" if "same" in case else "valid" if case in ("1d", "2d") else "custom")
    out, ref = only_output(tmp_path / "m.mlpackage", x), eager(module, x)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=FP32_ATOL * np.abs(ref).max())


POOLS = {  # name -> (torch pooling module, input shape)
    "max-1d": (nn.MaxPool1d(3, 2), (2, 3, 17)),
    "max-2d-padded-ceil": (nn.MaxPool2d(3, 2, padding=1, ceil_mode=True), (1, 4, 10, 9)),
    "avg-2d": (nn.AvgPool2d(2), (1, 3, 8, 8)),
    "avg-2d-padding-excluded": (nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), (1, 3, 9, 8)),
    "avg-2d-padding-counted-ceil": (nn.AvgPool2d(3, 2, padding=1, ceil_mode=True), (1, 3, 10, 9)),
    "avg-1d-ceil": (nn.AvgPool1d(3, 2, ceil_mode=True), (1, 3, 10)),
}


@pytest.mark.parametrize("case", sorted(POOLS))
def test_pool_matches_torch(case, tmp_path):
    torch.manual_seed(0)
    pool, shape = POOLS[case]
    module, x = Functional(pool), torch.randn(*shape)  # Functional names the input "x"
    mlmodel = save_package(module, x, tmp_path / "m.mlpackage")
    kind = "max_pool" if case.startswith("max") else "avg_pool"
    assert kind in {op.op_type for op in mlmodel._mil_program.functions["main"].operations}
    out, ref = only_output(tmp_path / "m.mlpackage", x), eager(module, x)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("target, decompress", [("iOS17", "constexpr_affine_dequantize"),
                                                ("iOS18", "constexpr_blockwise_shift_scale")])
def test_int8_conv_weights_are_dequantized_into_the_conv(target, decompress, tmp_path):
    torch.manual_seed(0)
    model = Functional(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=16),
                                     nn.Conv2d(16, 8, 1))).eval()
    x = torch.randn(1, 8, 10, 10)
    mlmodel = save_package(model, x, tmp_path / "fp32.mlpackage", target=target)
    save_int8_weights(mlmodel, tmp_path / "int8.mlpackage")

    info = describe(tmp_path / "int8.mlpackage")
    assert info["ops"]["conv"] == 3 and info["ops"].get(decompress, 0) == 3  # 8*16*9, 16*9 and 16*8 elements
    assert info["weights"]["int8"] == sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    out, ref = only_output(tmp_path / "int8.mlpackage", x), eager(model, x)
    scale = np.abs(ref).max()
    error = np.abs(out - ref).max()
    assert error <= INT8_REL * scale, f"{error / scale:.2e} of the largest output"
    assert error > 1e-6  # not vacuous: the int8 weights were used, not the float ones


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_recurrent_classifier_converts_and_matches_eager(cell, tmp_path):
    # The registered exporter, as convert_pt2 calls it: coremltools 9.0 has no converter for aten.gru/lstm.
    from difftx_edge.convert.coreml import export

    model, ids = zoo.build("gru", hidden=16, seq_len=8, cell=cell)
    facts = export(torch.export.export(model, (ids,)), tmp_path / "m.mlpackage", "fp32", {})
    assert cell not in facts["program"]["ops"] and facts["program"]["ops"]["linear"] >= 8  # unrolled over 8 steps
    (name,) = (tensor["name"] for tensor in facts["program"]["inputs"])
    (out,) = reference_predict(tmp_path / "m.mlpackage", {name: ids.numpy()}).values()
    ref = eager(model, ids)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=FP32_ATOL)
