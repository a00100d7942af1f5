"""benchmarks/foreign_models.py: a quick row (the 1-D CNN to ONNX, fp32) carries every field its table reads."""

import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def foreign_models(monkeypatch):
    # The benchmark scripts import their sibling ``common`` as a top-level module, as when run as files.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()
    import foreign_models

    yield foreign_models
    torch.set_num_threads(threads)  # the benchmark pins 1 thread; later tests keep the suite's setting


@pytest.mark.slow  # about 8 s on 2 cores, most of it the ONNX exporter's first import
def test_quick_onnx_row_has_its_fields(foreign_models, tmp_path):
    cfg = foreign_models.MatrixConfig(models=["cnn-1d"], formats=["onnx"], precisions=["fp32"], quick=True,
                                      runs=3, warmup=1, parity_batches=2, work=str(tmp_path / "work"))
    results = foreign_models.run_matrix(cfg)

    (row,) = results["rows"]
    assert (row["model"], row["format"], row["precision"], row["status"], row["reason"]) == (
        "cnn-1d", "onnx", "fp32", "ok", None)
    assert row["artifact_bytes"] > 0 and row["p50_ms"] > 0 and row["eager_p50_ms"] > 0
    assert row["speedup_vs_eager"] == pytest.approx(row["eager_p50_ms"] / row["p50_ms"])
    assert row["latency"]["runs"] == 3
    assert row["max_abs_error"] <= 1e-4 and row["top1_agreement"] == 1.0 and row["parity_samples"] == 2
    assert row["parity_check"] == "onnx runtime" and row["output_absmax"] > 0
    assert row["partitions"] is None and row["undelegated"] is None  # no XNNPACK delegate in ONNX Runtime
    assert "size_ratio_vs_fp32" not in row
    assert results["threads"] == 1 and results["machine"]["threads"] == 1
    assert "int8_dot_product" in results["machine"]["cpu_features"]
    assert results["scaling"] == []  # not a Transformer

    text = foreign_models.write_results(results, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"] == json.loads(json.dumps([row]))
    assert "| cnn-1d | onnx | fp32 | ✓ | n/a | n/a |" in text
    assert (tmp_path / "out" / "results.md").read_text() == text + "\n"


def test_config_refuses_unknown_names(foreign_models):
    with pytest.raises(ValueError, match="unknown or no model"):
        foreign_models.MatrixConfig(models=["resnet"])
    with pytest.raises(ValueError, match="unknown or no precision"):
        foreign_models.MatrixConfig(precisions=["int4"])
