"""Quantization: QAT gradients, prepared-versus-converted numerics, int8 weights, accuracy, bad input.

Every backend quantizer runs for real; under CI a missing backend fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from difftx_edge.model import ATTENTION, DiffTransformer, ModelConfig
from difftx_edge.quantize import QUANTIZERS, QuantConfig, load_quantized, pt2e, quantize
from difftx_edge.quantize.registry import QuantizerSpec, get_quantizer_spec, in_float_module

BACKENDS = sorted(QUANTIZERS)


def one_backend_fast(backends, fast: str = "onnx") -> list:
    """Every backend, the fast tier (``-m "not slow"``) running only ``fast``: a property checked per backend
    in the full suite, and once in the inner loop (the quickest backend to quantize)."""
    return [pytest.param(b, marks=() if b == fast else pytest.mark.slow) for b in backends]

KINDS = sorted(ATTENTION)


def small_model(kind: str, causal: bool = False, seed: int = 0) -> DiffTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(input_dim=4, n_outputs=10, max_len=16, d_model=32, n_heads=4, n_layers=2,
                      attention=kind, causal=causal, window=2, rank=8, chunk=8, dropout=0.0)
    return DiffTransformer(cfg).eval()


def qat_prepared(model: nn.Module, backend: str, x: torch.Tensor) -> torch.fx.GraphModule:
    graph = pt2e.export_for_quantization(model, x[:2])
    return pt2e.prepare(graph, get_quantizer_spec(backend).quantizer(qat=True), qat=True)


def qat_steps(prepared: torch.fx.GraphModule, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """A few real optimizer steps, so the weights move away from what the observers first saw."""
    from torchao.quantization.pt2e import move_exported_model_to_train

    move_exported_model_to_train(prepared)
    optimizer = torch.optim.Adam(prepared.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(prepared(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    return torch.randn(64, 16, 4), torch.randint(0, 10, (64,))


@pytest.mark.parametrize("backend", one_backend_fast(BACKENDS))
def test_qat_gradients_reach_every_trainable_parameter(backend, data):
    x, y = data
    model = small_model("hybrid")
    prepared = qat_prepared(model, backend, x)
    params = [p for p in prepared.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == model.num_parameters()
    nn.functional.cross_entropy(prepared(x), y).backward()
    no_grad = [tuple(p.shape) for p in params if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


# The fast tier keeps one case per backend, the hybrid model (local and linear heads); the rest are slow.
CASES = [pytest.param(backend, kind, causal, marks=() if (kind, causal) == ("hybrid", False) else pytest.mark.slow)
         for causal, kinds in ((False, KINDS), (True, ("hybrid", "linear", "lowrank")))
         for backend in BACKENDS for kind in kinds]


@pytest.mark.parametrize("backend, kind, causal", CASES)
def test_prepared_and_converted_agree_within_one_output_step(backend, kind, causal, data):
    x, y = data
    prepared = qat_prepared(small_model(kind, causal), backend, x)
    pt2e.calibrate(prepared, [x[:32], x[32:]])
    qat_steps(prepared, x, y, steps=5)
    pt2e.freeze(prepared)
    converted = pt2e.convert(prepared)
    step = pt2e.output_step(converted)
    assert step is not None and step > 0, "the logits should leave the graph through a dequantize"
    with torch.no_grad():
        gap = (prepared(x) - converted(x)).abs().max().item()
    assert gap <= step, f"{gap / step:.2f} output steps apart"
    # Not vacuous: the quantized model differs from the float one by more than rounding.
    assert any(w["dtype"] == "int8" for w in pt2e.linear_weights(converted))


def test_snapped_biases_lie_on_the_int32_grid_the_kernels_store(data):
    x, _ = data
    model = small_model("local")
    with torch.no_grad():  # biases start at zero, which is on every grid
        for linear in (m for m in model.modules() if isinstance(m, nn.Linear)):
            linear.bias.normal_(0, 0.1)
    prepared = pt2e.prepare(pt2e.export_for_quantization(model, x[:2]),
                            get_quantizer_spec("xnnpack").quantizer(qat=False), qat=False)
    pt2e.calibrate(prepared, [x])
    converted = pt2e.convert(prepared)
    before = converted(x)
    biases = {n: pt2e._attr(converted, n.args[2]).detach().clone() for n in converted.graph.nodes
              if n.target == torch.ops.aten.linear.default}
    assert pt2e.snap_biases(converted) == 10
    assert any(not torch.equal(pt2e._attr(converted, n.args[2]), b) for n, b in biases.items())
    for node in converted.graph.nodes:
        if node.target == torch.ops.aten.linear.default:
            act, weight, bias = node.args[:3]
            w_scale = pt2e._attr(converted, weight.args[1])
            grid = torch.tensor(act.args[1], dtype=torch.float32) * w_scale
            units = pt2e._attr(converted, bias).double() / grid.double()
            assert torch.allclose(units, units.round(), atol=1e-3)
    after = converted(x)
    assert (after - before).abs().max() <= 1.001 * pt2e.output_step(converted)  # one rounding flipped at most
    assert pt2e.snap_biases(converted) == 10 and torch.equal(converted(x), after)  # idempotent
    assert QUANTIZERS["xnnpack"].int32_bias and not QUANTIZERS["coreml"].int32_bias  # Core ML keeps float biases


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["hybrid", "lowrank"])
def test_attention_and_layernorm_stay_float_on_every_backend(backend, kind, data):
    """No annotator may quantize inside a float module, even one that ignores module filters (XNNPACK's cat).

    The one exception is storage: a parameter table read there (the low-rank projections) may be stored
    int8, weight-only; its reader still computes in float.
    """
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    x, _ = data
    graph = pt2e.export_for_quantization(small_model(kind), x[:2])
    quantizer = get_quantizer_spec(backend).quantizer(qat=False)
    graph = quantizer.annotate(quantizer.transform_for_annotation(graph))
    parameters = dict(graph.named_parameters())

    def computes_int8(node) -> bool:
        annotation = node.meta[Q_ANNOTATION_KEY]
        return annotation.output_qspec is not None or any(
            source.op != "get_attr" or source.target not in parameters for source in annotation.input_qspec_map)

    annotated = [n for n in graph.graph.nodes if Q_ANNOTATION_KEY in n.meta]
    inside = [f"{n.target} in {pt2e.module_path(n)}" for n in annotated if in_float_module(n) and computes_int8(n)]
    assert annotated and not inside, inside
    # The hybrid model has cats only inside attention: none may come out integer.
    prepared = pt2e.prepare(pt2e.export_for_quantization(small_model("hybrid"), x[:2]),
                            get_quantizer_spec(backend).quantizer(qat=False), qat=False)
    pt2e.calibrate(prepared, [x])
    assert "aten.cat" not in pt2e.op_table(pt2e.convert(prepared))["integer"]


@pytest.mark.parametrize("backend", one_backend_fast(BACKENDS))
def test_converted_linear_weights_are_int8_per_channel(backend, data):
    x, _ = data
    prepared = qat_prepared(small_model("hybrid"), backend, x)
    pt2e.calibrate(prepared, [x])
    pt2e.freeze(prepared)
    converted = pt2e.convert(prepared)
    weights = pt2e.linear_weights(converted)
    # qkv, out and two MLP linears per block (2 blocks), the input projection, the head.
    assert len(weights) == 10
    assert all(w["dtype"] == "int8" and w["per_channel"] for w in weights), weights
    table = pt2e.op_table(converted)
    assert table["integer"].get("aten.linear", 0) == 10
    assert table["float"].get("aten.bmm", 0) > 0  # the attention cores stay float by design
    assert pt2e.int8_weight_count(converted) >= sum(w["shape"][0] * w["shape"][1] for w in weights)


@pytest.mark.parametrize("backend", one_backend_fast(["litert", "onnx", "xnnpack"]))
def test_position_table_and_lowrank_projections_are_stored_int8(backend, data):
    """They grow with max_len: in float they were most of an int8 .tflite or .onnx at N=1024."""
    x, y = data
    model = small_model("lowrank")
    prepared = qat_prepared(model, backend, x)
    pt2e.calibrate(prepared, [x])
    qat_steps(prepared, x, y, steps=3)  # the tables train through their fake quantization
    pt2e.freeze(prepared)
    converted = pt2e.convert(prepared)
    read = {node.target for node in converted.graph.nodes if node.op == "get_attr"}
    assert [name for name, p in converted.named_parameters() if name in read and p.dim() >= 2] == []
    tables = model.position.table.numel() + sum(b.attn.core.proj_k.numel() * 2 for b in model.blocks)
    linears = sum(w["shape"][0] * w["shape"][1] for w in pt2e.linear_weights(converted))
    assert pt2e.int8_weight_count(converted) >= linears + tables
    # Weight-only: the attention that reads the projections still computes in float.
    assert pt2e.op_table(converted)["float"].get("aten.bmm", 0) > 0


def test_a_masked_op_that_int8_cannot_hold_is_refused_by_name(data):
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            mask = torch.log((x > 0).float())  # 0 where x > 0, -inf elsewhere
            return self.proj(x) + mask

    x, _ = data
    graph = pt2e.export_for_quantization(Masked(), x[:2])
    prepared = pt2e.prepare(graph, get_quantizer_spec("xnnpack").quantizer(qat=False), qat=False)
    with pytest.raises(ValueError, match=r"cannot quantize op aten\.log in the top-level model: .*infinite or NaN"):
        with pt2e.refuse_nonfinite(prepared, "xnnpack"):
            pt2e.calibrate(prepared, [x])


# -----------------------------------------------------------------------------
# From a trained run, through the CLI


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "difftx_edge", *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def quantized(digits_run, tmp_path_factory):
    run, _ = digits_run
    outs = {}
    for backend in BACKENDS:
        out = tmp_path_factory.mktemp(f"int8_{backend}")
        done = cli("quantize", "--run", str(run), "--backend", backend, "--method", "qat", "--epochs", "2",
                   "--threads", "2", "--out", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
        outs[backend] = out
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_qat_from_a_trained_run_stays_within_one_point_of_fp32(quantized, backend):
    report = json.loads((quantized[backend] / "quant_report.json").read_text())
    fp32, ptq, qat = (report["test"][k]["accuracy"] for k in ("fp32", "ptq", "qat"))
    assert qat >= fp32 - 0.01, (fp32, ptq, qat)
    assert report["int8_linear_layers"] == report["linear_layers"] == 10
    assert report["qat"]["prepared_vs_converted"]["max_steps"] <= 1.0
    assert "aten.bmm" in report["ops"]["float"] and "aten.linear" in report["ops"]["integer"]
    assert report["seconds"]["total"] > 0 and report["int8_weights"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_program_reloads_with_int8_weights_and_same_outputs(quantized, digits_run, backend):
    from difftx_edge.tasks import TaskConfig, load_task

    program, config = load_quantized(quantized[backend])
    assert config["backend"]["name"] == backend and config["source"]["sha256"]
    int8 = [t for t in program.constants.values() if isinstance(t, torch.Tensor) and t.dtype == torch.int8]
    int8 += [t for t in program.state_dict.values() if t.dtype == torch.int8]
    report = json.loads((quantized[backend] / "quant_report.json").read_text())
    assert sum(t.numel() for t in int8) == report["int8_weights"]
    task = load_task(TaskConfig(**config["task"]))
    from difftx_edge.train import evaluate

    metrics = evaluate(program.module(), task.test.inputs, task.test.targets, switch_mode=False)
    assert metrics["accuracy"] == pytest.approx(report["test"][report["shipped"]]["accuracy"])


@pytest.mark.slow
def test_saved_program_loads_in_a_fresh_process(quantized):
    # Nothing imported beforehand: load_quantized has to register the quantized ops itself.
    code = ("import sys, torch; from difftx_edge.quantize import load_quantized; "
            "program, config = load_quantized(sys.argv[1]); "
            "x = torch.zeros(3, *config['input']['shape'][1:]); print(tuple(program.module()(x).shape))")
    done = subprocess.run([sys.executable, "-c", code, str(quantized["litert"])], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "(3, 10)"


@pytest.mark.slow
def test_a_tampered_program_is_refused(quantized, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(quantized["xnnpack"], copy)
    with open(copy / "quantized.pt2", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="does not match its config"):
        load_quantized(copy)


@pytest.mark.slow
def test_ptq_method_writes_a_ptq_program(digits_run, tmp_path):
    run, _ = digits_run
    report = quantize(QuantConfig(run=str(run), out=str(tmp_path), backend="onnx", method="ptq", threads=2),
                      progress=False)
    assert report["method"] == "ptq" and report["test"]["qat"] is None and report["qat"] is None
    assert report["test"]["ptq"]["accuracy"] >= report["test"]["fp32"]["accuracy"] - 0.02


@pytest.mark.parametrize("ptq, qat, shipped", [
    ([0.95, -0.30], None, "ptq"),  # QAT not run
    ([0.95, -0.30], [0.95, -0.30], "ptq"),  # a tie ships PTQ
    ([0.95, -0.30], [0.94, -0.10], "ptq"),  # lower accuracy, whatever the loss
    ([0.95, -0.30], [0.95, -0.20], "qat"),  # same accuracy, lower loss
    ([0.95, -0.30], [0.96, -0.90], "qat"),  # higher accuracy
])
def test_qat_ships_only_when_strictly_better_on_validation(ptq, qat, shipped):
    from difftx_edge.quantize.api import choose_shipped

    chosen, reason = choose_shipped(ptq, qat, "accuracy")
    assert chosen == shipped and reason


@pytest.mark.slow
def test_report_names_the_shipped_program_and_the_program_is_it(tmp_path):
    # A tiny run, so the case is quick; which method wins does not matter, only that the report tells the truth.
    from difftx_edge.tasks import TaskConfig, load_task
    from difftx_edge.train import TrainConfig, evaluate, primary, train

    small = {"d_model": 32, "n_heads": 2, "n_layers": 1}
    train(TrainConfig(out=str(tmp_path / "run"), epochs=2, threads=1), TaskConfig("digits"), small, progress=False)
    report = quantize(QuantConfig(run=str(tmp_path / "run"), out=str(tmp_path / "q"), backend="xnnpack",
                                  method="qat", steps=4, threads=1), progress=False)
    scores = report["val_score"]
    assert report["shipped"] == ("qat" if scores["qat"] > scores["ptq"] else "ptq"), report["reason"]
    assert report["reason"].startswith("QAT beats" if report["shipped"] == "qat" else "QAT does not beat")
    program, config = load_quantized(tmp_path / "q")
    task = load_task(TaskConfig(**config["task"]))
    val = evaluate(program.module(), task.val.inputs, task.val.targets, switch_mode=False)
    assert [primary(val, "accuracy"), -val["loss"]] == pytest.approx(scores[report["shipped"]])
    test = evaluate(program.module(), task.test.inputs, task.test.targets, switch_mode=False)
    assert test["accuracy"] == pytest.approx(report["test"][report["shipped"]]["accuracy"])
    ptq_only = quantize(QuantConfig(run=str(tmp_path / "run"), out=str(tmp_path / "p"), backend="xnnpack",
                                    method="ptq", threads=1), progress=False)
    assert ptq_only["shipped"] == "ptq" and ptq_only["val_score"]["qat"] is None


# -----------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing half-written


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr
    last = lines[-1]
    assert last.startswith("difftx-edge quantize: error:") or "usage" not in last, last
    for needle in needles:
        assert needle in last, last


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (["--backend", "tensorrt"], "invalid choice: 'tensorrt'"),
    (["--method", "awq"], "invalid choice: 'awq'"),
    (["--observer-freeze", "1.5"], "observer_freeze is a fraction"),
])
def test_bad_flags(digits_run, tmp_path, args, needle):
    run, _ = digits_run
    one_line_error(cli("quantize", "--run", str(run), "--out", str(tmp_path / "o"), *args), needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_run_without_checkpoint(digits_run, tmp_path):
    run, _ = digits_run
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((run / "config.json").read_text())
    one_line_error(cli("quantize", "--run", str(empty), "--out", str(tmp_path / "o")), "no checkpoint")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_missing_backend_extra_names_the_pip_extra(digits_run, tmp_path):
    # A registered backend whose package is absent: the real check, with a module that does not exist.
    QUANTIZERS["absent"] = QuantizerSpec("absent", "absent-extra", ("difftx_edge_no_such_module",), "nowhere",
                                         False, lambda qat: None)
    try:
        with pytest.raises(ValueError, match=r"pip install 'difftx-edge\[absent-extra\]'"):
            quantize(QuantConfig(run=str(digits_run[0]), out=str(tmp_path / "o"), backend="absent"))
    finally:
        del QUANTIZERS["absent"]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_out_holding_another_runs_results_needs_force(quantized, tmp_path):
    import shutil

    run2 = tmp_path / "run2"
    shutil.copytree(json.loads((quantized["onnx"] / "quant_config.json").read_text())["source"]["run"], run2)
    with open(run2 / "model.safetensors", "r+b") as f:  # same shapes, different weights
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x3f")
    before = (quantized["onnx"] / "quant_report.json").read_bytes()
    args = ("quantize", "--run", str(run2), "--backend", "onnx", "--method", "ptq", "--out", str(quantized["onnx"]))
    one_line_error(cli(*args), "already holds results of another run", "--force")
    assert (quantized["onnx"] / "quant_report.json").read_bytes() == before
    out_file = tmp_path / "file"
    out_file.write_text("")
    one_line_error(cli(*args[:-1], str(out_file)), "is a file")


def every_add_quantizer(qat: bool):
    """A real PT2E quantizer that quantizes every add, the attention masks' included."""
    from torchao.quantization.pt2e import HistogramObserver
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

    spec = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
                            observer_or_fake_quant_ctr=HistogramObserver.with_args(eps=2 ** -12))

    class EveryAdd(Quantizer):
        def annotate(self, model):
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target == torch.ops.aten.add.Tensor:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=spec, _annotated=True)
            return model

        def validate(self, model):
            pass

    return EveryAdd()


@pytest.mark.slow
def test_unquantizable_attention_leaves_nothing_behind(digits_run, tmp_path):
    # The model's attention masks hold -inf: a quantizer that observes the mask add must be
    # stopped by name at calibration, and nothing may be written.
    QUANTIZERS["every-add"] = QuantizerSpec("every-add", "onnx", ("torchao",), "test", False, every_add_quantizer)
    try:
        with pytest.raises(ValueError, match=r"backend every-add cannot quantize op aten\.add in "
                                             r"blocks\.\d\.attn\.core\.local: .*infinite or NaN"):
            quantize(QuantConfig(run=str(digits_run[0]), out=str(tmp_path / "o"), backend="every-add",
                                 method="ptq"), progress=False)
    finally:
        del QUANTIZERS["every-add"]
    assert not (tmp_path / "o").exists()
