"""``convert`` of any program: several inputs, and int8 of a float program calibrated with ``--calibration``.

A program of several tensor inputs converts like one of a single input: each sample is one array per input,
named after it. ``--calibration FILE.npz`` holds real samples laid out the same way; the observers see the
first 80% of them and the int8 artifact is measured on the rest (its parity against the PyTorch int8 program,
its SQNR and top-1 agreement against fp32). A calibration file that does not fit is one line, exit 2, and
nothing written, before any quantizer runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import MLP, Payload, assert_refused, write_npz

from difftx_edge.cli import main
from difftx_edge.convert import ExportConfig, convert_pt2
from difftx_edge.convert.bundle import MANIFEST, sqnr_db, top1_agreement
from difftx_edge.convert.inputs import HOLD_BACK, RANDOM_CALIBRATION, calibration_args, example_args

VOCAB = 7
IDS, FEATURES = (2, 5), (2, 3)  # the two inputs' example shapes: (batch, sequence) ids, (batch, features) floats


class IdsAndFeatures(nn.Module):
    """Two inputs of two dtypes: token ids and a float feature vector, the output a function of both."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.proj, self.head = nn.Embedding(VOCAB, 8), nn.Linear(3, 8), nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.emb(ids).mean(1) + self.proj(features)))  # (B, 4)


@pytest.fixture(scope="module")
def two_inputs_pt2(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("two") / "two_inputs.pt2"
    example = (torch.randint(0, VOCAB, IDS), torch.randn(FEATURES))
    torch.export.save(torch.export.export(IdsAndFeatures().eval(), example), path)
    return path


@pytest.fixture(scope="module")
def mlp_pt2(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mlp") / "mlp.pt2"
    torch.export.save(torch.export.export(MLP().eval(), (torch.randn(2, 12),)), path)
    return path


def _ids(samples: int, high: int = VOCAB, low: int = 0) -> np.ndarray:
    return np.random.default_rng(0).integers(low, high, (samples, *IDS))


def _features(samples: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((samples, *FEATURES)).astype(np.float32)


# -----------------------------------------------------------------------------
# Several inputs


def test_random_samples_of_several_inputs_follow_each_input(two_inputs_pt2):
    from difftx_edge.untrusted import load_exported_program

    program = load_exported_program(two_inputs_pt2)
    samples, source = example_args(program, seed=0, n=3)
    assert len(samples) == 3 and all(len(sample) == 2 for sample in samples)
    ids, features = samples[0]
    assert (ids.dtype, ids.shape, features.dtype, features.shape) == (np.int64, IDS, np.float32, FEATURES)
    assert max(int(sample[0].max()) for sample in samples) < VOCAB
    assert source["inputs"] == {"ids": {"dtype": "int64", "low": 0, "high": VOCAB, "high_from": "embedding"},
                                "features": {"dtype": "float32", "distribution": "standard normal"}}


def test_a_two_input_program_converts_with_parity(two_inputs_pt2, tmp_path):
    inputs = write_npz(tmp_path / "real.npz", ids=_ids(3), features=_features(3))
    (manifest,) = convert_pt2(two_inputs_pt2, tmp_path / "out", "onnx", threads=1, inputs=inputs)
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_error"] <= 1e-4
    assert manifest["parity"]["samples"] == 3 * IDS[0]
    assert [(t["name"], t["shape"], t["dtype"]) for t in manifest["inputs"]] == [
        ("ids", list(IDS), "int64"), ("features", list(FEATURES), "float32")]
    assert manifest["quantization"] is None, "fp32: nothing quantized"
    assert json.loads((tmp_path / "out" / "onnx-fp32" / MANIFEST).read_text())["inputs"] == manifest["inputs"]


# -----------------------------------------------------------------------------
# Calibration samples: the last fifth is held back


def test_the_last_fifth_of_the_calibration_is_held_back(two_inputs_pt2, tmp_path):
    from difftx_edge.untrusted import load_exported_program

    program = load_exported_program(two_inputs_pt2)
    path = write_npz(tmp_path / "cal.npz", ids=_ids(10), features=_features(10))
    observed, held, source = calibration_args(program, path)
    assert (len(observed), len(held)) == (8, 2) and HOLD_BACK == 0.2
    np.testing.assert_array_equal(held[-1][1], _features(10)[-1])  # file order: the last rows are held back
    assert source["from"] == "npz" and not source["weak"]
    assert (source["samples"], source["observed"], source["held_back"]) == (10, 8, 2)
    _, held, _ = calibration_args(program, write_npz(tmp_path / "two.npz", ids=_ids(2), features=_features(2)))
    assert len(held) == 1, "at least one sample is held back"


def test_without_a_file_random_samples_and_the_saved_example_calibrate_and_are_weak(two_inputs_pt2):
    from difftx_edge.untrusted import load_exported_program

    program = load_exported_program(two_inputs_pt2)
    observed, held, source = calibration_args(program, None, seed=3)
    assert source["weak"] and source["from"] == "random" and source["program_example_samples"] == 1
    assert len(observed) + len(held) == RANDOM_CALIBRATION + 1
    saved = program.example_inputs[0]
    np.testing.assert_array_equal(observed[0][1], saved[1].numpy())  # the program's own example comes first


def test_sqnr_and_top1_measure_what_they_say():
    signal = [np.array([[3.0, 4.0]])]
    assert sqnr_db(signal, [np.array([[3.0, 4.3]])]) == pytest.approx(10 * np.log10(25 / 0.09), abs=0.01)
    assert sqnr_db(signal, signal) is None, "no noise: no finite SQNR"
    assert top1_agreement([np.array([[1.0, 2.0], [2.0, 1.0]])], [np.array([[0.0, 3.0], [0.0, 3.0]])]) == 0.5
    assert top1_agreement([np.array([[1.0], [2.0]])], [np.array([[1.0], [2.0]])]) is None, "one column: no logits"


# -----------------------------------------------------------------------------
# A bad --calibration: one line, exit 2, nothing written, no quantizer run


BAD = {
    # name: (extra flags, how the --calibration file is made in tmp, words the error line must hold)
    "missing-file": ([], lambda tmp: tmp / "none.npz", ("calibration", "does not exist")),
    "not-an-npz": ([], lambda tmp: (tmp / "c.npz").write_text("ids\n") and tmp / "c.npz", ("not an .npz",)),
    "object-array": ([], lambda tmp: write_npz(tmp / "o.npz", ids=np.array([{"a": 1}], dtype=object),
                                            features=_features(4)), ("plain arrays",)),
    "pickle-payload": ([], lambda tmp: write_npz(tmp / "p.npz", ids=np.array([Payload(tmp / "PWNED")], dtype=object),
                                              features=_features(4)), ("plain arrays",)),
    "one-input-left-out": ([], lambda tmp: write_npz(tmp / "half.npz", ids=_ids(4)),
                           ("no array 'features'", "give every input")),
    "both-left-out": ([], lambda tmp: write_npz(tmp / "none_given.npz"), ("no arrays 'ids', 'features'",)),
    "unknown-name": ([], lambda tmp: write_npz(tmp / "n.npz", ids=_ids(4), features=_features(4), x=_features(4)),
                     ("'x' is not an input", "'ids', 'features'")),
    "floats-for-ids": ([], lambda tmp: write_npz(tmp / "f.npz", ids=_ids(4).astype(np.float32), features=_features(4)),
                       ("'ids' is float32", "give integer values")),
    "no-sample-axis": ([], lambda tmp: write_npz(tmp / "s.npz", ids=_ids(4)[0], features=_features(4)),
                       ("'ids' has shape (2, 5)", "(S, 2, 5)")),
    "nan": ([], lambda tmp: write_npz(tmp / "nan.npz", ids=_ids(4), features=np.full((4, *FEATURES), np.nan)),
            ("'features' has NaN",)),
    "inf": ([], lambda tmp: write_npz(tmp / "inf.npz", ids=_ids(4), features=np.full((4, *FEATURES), np.inf)),
            ("'features' has NaN or inf",)),
    "id-past-the-vocabulary": ([], lambda tmp: write_npz(tmp / "v.npz", ids=_ids(4, high=VOCAB + 3),
                                                      features=_features(4)), ("embedding of 7 rows", "0..6")),
    "sample-counts-differ": ([], lambda tmp: write_npz(tmp / "d.npz", ids=_ids(4), features=_features(5)),
                             ("ids 4, features 5", "same number of rows")),
    "one-sample": ([], lambda tmp: write_npz(tmp / "one.npz", ids=_ids(1), features=_features(1)),
                   ("holds 1 sample", "at least 2")),
    "fp32": (["--precision", "fp32"], lambda tmp: write_npz(tmp / "ok.npz", ids=_ids(4), features=_features(4)),
             ("--calibration calibrates int8", "--precision int8")),
    "int8-dynamic-for-onnx": (["--precision", "int8-dynamic"], lambda tmp: write_npz(tmp / "ok.npz", ids=_ids(4),
                                                                                features=_features(4)),
                              ("format onnx does not support precision int8-dynamic",)),
    "with-inputs": (["--inputs", "INPUTS"], lambda tmp: write_npz(tmp / "ok.npz", ids=_ids(4), features=_features(4)),
                    ("--calibration or --inputs, not both",)),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_calibration_is_one_line_exit_2_and_writes_nothing(name, two_inputs_pt2, tmp_path, capfd):
    flags, make, needles = BAD[name]
    calibration = make(tmp_path)
    flags = [str(calibration) if flag == "INPUTS" else flag for flag in flags]
    out = tmp_path / "out"
    capfd.readouterr()
    code = main(["convert", str(two_inputs_pt2), "--format", "onnx", "--out", str(out), "--precision", "int8",
                 "--calibration", str(calibration), *flags])
    assert_refused(code, capfd.readouterr().err, needles, out)


def test_export_of_a_run_takes_no_int8_dynamic(tmp_path):
    with pytest.raises(ValueError, match="export takes precision fp32, fp16, int8, not int8-dynamic"):
        ExportConfig(run=str(tmp_path), out=str(tmp_path / "out"), format="executorch", precision="int8-dynamic")


# -----------------------------------------------------------------------------
# int8 of a float program


def check_quantization(manifest: dict, *, samples: int, held_back: int, weak: bool) -> dict:
    quantization = manifest["quantization"]
    assert manifest["precision"] == "int8" and manifest["parity"]["passed"], manifest["parity"]
    assert quantization["scheme"] == "static" and quantization["quantizer"]
    calibration = quantization["calibration"]
    assert (calibration["samples"], calibration["held_back"], calibration["weak"]) == (samples, held_back, weak)
    assert manifest["parity_inputs"] == {"from": "calibration", "held_back": held_back}
    (sqnr,), (top1,) = quantization["sqnr_db"], quantization["top1_agreement_fp32"]
    assert sqnr is not None and sqnr > 15, "int8 of a small, well-scaled model is well above 15 dB from fp32"
    assert top1 is not None and 0.5 <= top1 <= 1
    steps = quantization["vs_pytorch_int8"]
    assert steps["max_steps"] <= 2 and steps["output_step"] > 0 and steps["samples"] == manifest["parity"]["samples"]
    return quantization


def test_int8_of_a_float_program_is_calibrated_on_the_file_and_measured_on_what_it_held_back(mlp_pt2, tmp_path):
    samples = np.random.default_rng(0).standard_normal((40, 2, 12)).astype(np.float32)
    path = write_npz(tmp_path / "cal.npz", x=samples)
    (manifest,) = convert_pt2(mlp_pt2, tmp_path / "out", "onnx", "int8", threads=1, calibration=path)
    quantization = check_quantization(manifest, samples=40, held_back=8, weak=False)
    assert quantization["calibration"]["file"] == "cal.npz" and len(quantization["calibration"]["sha256"]) == 64
    written = json.loads((tmp_path / "out" / "onnx-int8" / MANIFEST).read_text())
    assert written["quantization"] == json.loads(json.dumps(quantization))


def test_int8_without_calibration_warns_once_and_says_weak(mlp_pt2, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="difftx_edge.convert"):
        (manifest,) = convert_pt2(mlp_pt2, tmp_path / "out", "onnx", "int8", threads=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name ==
                "difftx_edge.convert"]
    assert len(warnings) == 1 and "weak" in warnings[0] and "--calibration" in warnings[0], warnings
    total = RANDOM_CALIBRATION + 1  # and the example saved in the .pt2
    check_quantization(manifest, samples=total, held_back=round(total * HOLD_BACK), weak=True)
