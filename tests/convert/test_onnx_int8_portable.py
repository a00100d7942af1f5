"""ONNX int8 that is right on every x86 CPU, not only on the one the tests run on.

ONNX Runtime fuses each DequantizeLinear -> MatMul -> QuantizeLinear into an
integer kernel (ORT_ENABLE_ALL, its default). On x86 without VNNI (AVX2, and
AVX-512 without VNNI) that kernel multiplies uint8 activations by int8 weights
with ``vpmaddubsw``, which adds each pair of products into a saturating int16:
with 8-bit weights, 255 * 127 * 2 overflows it, and an artifact that passes
parity on a VNNI machine is 20-140 output steps off on an AVX2 one. The
unfused graph (ORT_ENABLE_BASIC) computes in float and cannot saturate.

So each int8 file, for every attention kind and for PTQ and QAT programs, must
give the same outputs at full optimisation as at basic optimisation and as the
PyTorch int8 program, on inputs that drive the activations to the ends of their
range, both on this CPU and on an emulated Haswell (AVX2, no AVX-512, no VNNI)
under QEMU, which takes MLAS down the AVX2 path whatever the host has.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import unavailable

from difftx_edge.convert import ExportConfig, export_run
from difftx_edge.model import ATTENTION
from difftx_edge.quantize import QuantConfig, load_quantized, quantize
from difftx_edge.quantize.pt2e import output_step
from difftx_edge.tasks import TaskConfig, load_task
from difftx_edge.train import TrainConfig, train

pytestmark = pytest.mark.slow
KINDS = sorted(ATTENTION)
METHODS = ("ptq", "qat")
MAX_STEPS = 2.0
# What ORT's AVX2 u8s8 kernel can add without saturating an int16: two products of a uint8 and a weight.
WEIGHT_LIMIT = 32767 // (2 * 255)

# Runs inside the emulated CPU: numpy and onnxruntime only, since torch under QEMU would take minutes to import.
ORT_LEVELS = """
import sys
import numpy as np
import onnxruntime as ort

inputs = np.load(sys.argv[1])["x"]
outputs = {}
for model in sys.argv[3:]:
    for level in ("basic", "all"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, "ORT_ENABLE_" + level.upper())
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        outputs[model + ":" + level] = np.concatenate([session.run(None, {name: x[None]})[0] for x in inputs])
np.savez(sys.argv[2], **outputs)
"""


def near_saturation(task, n: int = 24, seed: int = 0) -> np.ndarray:
    """Test inputs, plus inputs whose every feature sits at the ends of the range seen in training."""
    rng = np.random.default_rng(seed)
    x = task.train.inputs.numpy()
    low, high = x.min(), x.max()
    corners = np.where(rng.random((n, *x.shape[1:])) < 0.5, low, high).astype(np.float32)
    return np.concatenate([task.test.inputs[:n].numpy(), corners, np.full_like(corners[:1], high)])


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """An int8 ONNX bundle per attention kind and method, with the PyTorch int8 program's outputs."""
    task = load_task(TaskConfig("digits"))
    inputs = near_saturation(task)
    built = {}
    for kind in KINDS:
        run = tmp_path_factory.mktemp(f"run_{kind}")
        train(TrainConfig(out=str(run), epochs=6, threads=2), TaskConfig("digits"),
              {"attention": kind, "d_model": 32, "n_heads": 4, "n_layers": 2, "rank": 8}, progress=False)
        for method in METHODS:
            quantized = tmp_path_factory.mktemp(f"int8_{kind}_{method}")
            quantize(QuantConfig(run=str(run), out=str(quantized / "onnx"), backend="onnx", method=method,
                                 epochs=1, calib_batches=4, threads=2), progress=False)
            out = tmp_path_factory.mktemp(f"bundle_{kind}_{method}")
            (manifest,) = export_run(ExportConfig(run=str(run), out=str(out), format="onnx", precision="int8",
                                                  quantized=str(quantized), parity_batches=8, accuracy=False,
                                                  threads=2))
            program = load_quantized(quantized / "onnx")[0].module()
            with torch.no_grad():
                expected = np.concatenate([program(torch.from_numpy(x[None])).numpy() for x in inputs])
            built[kind, method] = {"model": out / "onnx-int8" / "model.onnx", "manifest": manifest,
                                   "expected": expected, "step": output_step(program)}
    return inputs, built


def ort_outputs(inputs: np.ndarray, models: list, tmp_path, emulate: str | None) -> dict:
    """Each model's outputs at basic and at full optimisation, here or under ``qemu-x86_64-static -cpu``."""
    data, result = tmp_path / "inputs.npz", tmp_path / "outputs.npz"
    np.savez(data, x=inputs)
    command = [sys.executable, "-P", "-c", ORT_LEVELS, str(data), str(result), *map(str, models)]
    if emulate:
        qemu = shutil.which("qemu-x86_64-static")
        if qemu is None:
            unavailable("qemu-x86_64-static is not installed: apt-get install qemu-user-static (.ci/run does)")
        command = [qemu, "-cpu", emulate, *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(np.load(result))


def steps(a: np.ndarray, b: np.ndarray, step: float) -> float:
    return float(np.abs(a - b).max() / step)


@pytest.mark.parametrize("cpu", ["host", "Haswell"])
def test_full_optimisation_equals_basic_and_pytorch(bundles, cpu, tmp_path):
    inputs, built = bundles
    found = ort_outputs(inputs, [b["model"] for b in built.values()], tmp_path, None if cpu == "host" else cpu)
    worst = {}
    for (kind, method), b in built.items():
        full, basic = found[f"{b['model']}:all"], found[f"{b['model']}:basic"]
        worst[f"{kind}-{method}"] = (steps(full, basic, b["step"]), steps(full, b["expected"], b["step"]))
    bad = {name: w for name, w in worst.items() if max(w) > MAX_STEPS + 1e-3}
    assert not bad, f"on {cpu}, output steps (full vs basic, full vs PyTorch) beyond {MAX_STEPS:g}: {bad}"


def test_weights_leave_headroom_for_the_u8s8_kernels(bundles):
    """Every int8 weight that feeds an integer MatMul fits |w| <= 63, so no pair of products saturates."""
    _, built = bundles
    for (kind, method), b in built.items():
        model = onnx.load(str(b["model"]))
        initializers = {t.name: t for t in model.graph.initializer}
        consumers = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        matmul_weights = []
        for node in model.graph.node:
            if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
                continue
            if any(user.op_type in ("MatMul", "Gemm") for user in consumers.get(node.output[0], [])):
                matmul_weights.append(numpy_helper.to_array(initializers[node.input[0]]))
        assert matmul_weights, f"{kind}-{method}: no int8 weight feeds a MatMul"
        widest = max(int(np.abs(w.astype(np.int32)).max()) for w in matmul_weights)
        assert widest <= WEIGHT_LIMIT, f"{kind}-{method}: an int8 weight reaches {widest}"


def test_manifest_names_the_cpu_features_parity_ran_on(bundles):
    _, built = bundles
    machine = next(iter(built.values()))["manifest"]["parity"]["machine"]
    assert machine["cpu_features"]["int8_dot_product"] in (True, False)
    flags = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
    assert ("avx2" in machine["cpu_features"]["int8"]) == (" avx2" in flags)
    json.dumps(machine)
