"""Bundles for the runtime benchmarks: the model at a given width and length, exported like ``difftx-edge export``.

Latency and memory do not depend on the weights, so each attention kind is
built untrained from a fixed seed, on ListOps tokens (the embedding lookup is
in the graph). int8 programs are PTQ-calibrated on random token batches with
the format's own quantizer, biases snapped as ``difftx-edge quantize`` does.
Every bundle goes through the product's ``build_bundle``: it is checked
against PyTorch in its runtime before it is written, and it carries a
manifest the harness reads. A bundle already in ``work`` is reused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difftx_edge.convert import FORMATS
from difftx_edge.convert.api import _dtype_name
from difftx_edge.convert.bundle import MANIFEST, build_bundle
from difftx_edge.extras import versions
from difftx_edge.model import DiffTransformer, ModelConfig
from difftx_edge.quantize import get_quantizer_spec, pt2e
from difftx_edge.tasks.listops import VOCAB

KINDS = ("softmax", "local", "linear", "lowrank", "hybrid")
PARITY_BATCHES = 3


def build_model(kind: str, N: int, d_model: int, seed: int = 0) -> DiffTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(VOCAB), n_outputs=10, max_len=N, attention=kind, d_model=d_model, n_heads=4,
                      n_layers=2, window=16, rank=16, dropout=0.0)
    return DiffTransformer(cfg).eval()


def tokens(batch: int, N: int, seed: int) -> torch.Tensor:
    return torch.randint(0, len(VOCAB), (batch, N), generator=torch.Generator().manual_seed(seed))


def int8_module(model: DiffTransformer, fmt: str, N: int, seed: int) -> torch.fx.GraphModule:
    """PTQ with the format's quantizer on random tokens; biases on the int32 grid where its kernels keep them."""
    spec = get_quantizer_spec(FORMATS[fmt].quantizer)
    graph = pt2e.export_for_quantization(model, tokens(2, N, seed))
    prepared = pt2e.prepare(graph, spec.quantizer(qat=False), qat=False)
    pt2e.calibrate(prepared, [tokens(4, N, seed + i) for i in range(4)])
    converted = pt2e.convert(prepared)
    if spec.int32_bias:
        pt2e.snap_biases(converted)
    return converted


def planned_activation_bytes(kind: str, precision: str, N: int, d_model: int, seed: int = 0) -> int:
    """The activation memory ExecuTorch's planner allots this model when it plans every tensor itself.

    A delegated .pte plans only its inputs and outputs: XNNPACK keeps the intermediate tensors in a workspace of
    its own, which no API reports. The same program lowered without a partitioner shows what the activations
    need under ExecuTorch's greedy memory planning; that is the "planned activation memory" of the model.
    """
    import executorch.kernels.quantized  # noqa: F401  (registers the out variants of quantize/dequantize)
    from executorch.exir import to_edge

    model = build_model(kind, N, d_model, seed)
    module = int8_module(model, "executorch", N, seed) if precision == "int8" else model
    program = torch.export.export(module, (tokens(1, N, seed),))
    plan = to_edge(program).to_executorch().executorch_program.execution_plan[0]
    return int(sum(plan.non_const_buffer_sizes))


def make_bundle(kind: str, fmt: str, precision: str, N: int, d_model: int, work: Path, *, threads: int = 1,
                seed: int = 0) -> Path:
    """The bundle ``work/<kind>-d<d_model>-N<N>/<fmt>-<precision>``, built and parity-checked unless it exists."""
    out = Path(work) / f"{kind}-d{d_model}-N{N}"
    bundle = out / f"{fmt}-{precision}"
    if (bundle / MANIFEST).is_file():
        return bundle
    model = build_model(kind, N, d_model, seed)
    x = tokens(1, N, seed)
    module, step = model, None
    if precision == "int8":
        module = int8_module(model, fmt, N, seed)
        step = pt2e.output_step(module)
    program = torch.export.export(module, (x,))

    def reference(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(a)).numpy()

    meta = {"inputs": [{"name": "x", "shape": [1, N], "dtype": _dtype_name(torch.int64, fmt)}],
            "outputs": [{"name": "logits", "shape": [1, 10], "dtype": "float32"}], "task": None,
            "model": model.cfg.to_dict(), "source": {"benchmark": "untrained, seed " + str(seed)},
            "versions": versions(), "quantized_from": None}
    build_bundle(FORMATS[fmt], program, precision, out=out, reference=reference, output_step=step, meta=meta,
                 parity_inputs=[tokens(1, N, seed + 100 + i).numpy() for i in range(PARITY_BATCHES)],
                 options={"example": (x,)}, threads=threads)
    return bundle
