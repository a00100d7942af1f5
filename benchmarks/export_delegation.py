"""Delegation of every attention kind to XNNPACK (ExecuTorch, LiteRT), and .pte latency against eager PyTorch.

Targets (issue 4):
- ExecuTorch, every kind, fp32 and int8: all compute ops except the embedding
  lookup run inside one XNNPACK subgraph;
- LiteRT: at most 2 XNNPACK partitions;
- the fp32 .pte is faster than eager PyTorch at N=256 and N=1024, for every
  kind, with 1 thread.

The model is the default one (d_model 64, 4 heads, 2 layers) on ListOps tokens,
so the embedding lookup is in the graph, with max_len 1024, window 16 and
rank 16. Delegation and latency do not depend on the weights, so each kind is
built from a fixed seed, untrained; its int8 programs are PTQ-calibrated on
random token batches with the backend's quantizer (the same flow as
``difftx-edge quantize --method ptq``). Eager PyTorch runs the model as users
do: ``eval()`` under ``torch.inference_mode()``, with its fused kernels.
Latency is the p50 of timed calls after warm-up, batch 1, on ``--threads``
threads in both runtimes. A missed target is recorded, not raised.

    python benchmarks/export_delegation.py [--kinds softmax,local,...] [--seq-lens 256,1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine_info, machine_markdown, write_json, write_text

from difftx_edge.convert import FORMATS
from difftx_edge.markdown import markdown_table
from difftx_edge.model import DiffTransformer, ModelConfig
from difftx_edge.quantize import get_quantizer_spec, pt2e
from difftx_edge.runtimes.executorch import ExecuTorchRunner
from difftx_edge.runtimes.measure import latency_columns, summarize, timed_loop
from difftx_edge.tasks.listops import VOCAB
from difftx_edge.threads import pin_threads

KINDS = ("softmax", "local", "linear", "lowrank", "hybrid")
MAX_LITERT_PARTITIONS = 2
# int8 programs look up their int8 table with the quantized kernels' embedding_byte (convert/executorch.py).
EMBEDDING_OPS = {"aten_embedding_default", "aten.embedding.default", "quantized_decomposed_embedding_byte_default"}


def build_model(kind: str, max_len: int, seed: int) -> DiffTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(VOCAB), n_outputs=10, max_len=max_len, attention=kind, window=16, rank=16,
                      dropout=0.0)
    return DiffTransformer(cfg).eval()


def tokens(batch: int, N: int, seed: int) -> torch.Tensor:
    return torch.randint(0, len(VOCAB), (batch, N), generator=torch.Generator().manual_seed(seed))


def int8_program(model: DiffTransformer, backend: str, N: int, seed: int) -> torch.export.ExportedProgram:
    """PTQ with ``backend``'s quantizer on random tokens, re-exported at batch 1."""
    graph = pt2e.export_for_quantization(model, tokens(2, N, seed))
    prepared = pt2e.prepare(graph, get_quantizer_spec(backend).quantizer(qat=False), qat=False)
    pt2e.calibrate(prepared, [tokens(8, N, seed + i) for i in range(4)])
    return torch.export.export(pt2e.convert(prepared), (tokens(1, N, seed),))


def executorch_case(program, path: Path, precision: str) -> dict:
    started = time.perf_counter()
    facts = FORMATS["executorch"].export(program, path, precision, {})
    delegation = facts["delegation"]
    outside = {op: n for op, n in delegation["undelegated"].items() if op not in EMBEDDING_OPS}
    return {**delegation, "undelegated_except_embedding": outside, "bytes": path.stat().st_size,
            "export_seconds": round(time.perf_counter() - started, 1),
            "meets_target": delegation["partitions"] == 1 and not outside}


def litert_case(program, path: Path, precision: str, example: torch.Tensor) -> dict:
    started = time.perf_counter()
    facts = FORMATS["litert"].export(program, path, precision, {"example": (example,)})
    return {"partitions": facts["partitions"], "bytes": path.stat().st_size,
            "export_seconds": round(time.perf_counter() - started, 1),
            "meets_target": facts["partitions"] <= MAX_LITERT_PARTITIONS}


def latency(model: DiffTransformer, pte: Path, x: torch.Tensor, threads: int) -> dict:
    runner = ExecuTorchRunner(pte, threads=threads)
    x_np = x.numpy()
    with torch.inference_mode():
        eager = _latency(lambda: model(x))
        reference = model(x).numpy()
    pte_times = _latency(lambda: runner.run([x_np]))
    error = float(np.abs(runner.run([x_np])[0] - reference).max())
    return {"eager": eager, "pte": pte_times, "max_abs_error": error,
            "speedup": eager["p50_ms"] / pte_times["p50_ms"],
            "meets_target": pte_times["p50_ms"] < eager["p50_ms"]}


def _latency(call) -> dict:
    """The harness's timing of ``call``: two warm-up calls, then 1 s of timed calls (at least 3)."""
    times = timed_loop(call, runs=None, seconds=1.0, warmup=2)
    return {**latency_columns(summarize(times)), "runs": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--seq-lens", default="256,1024", help="fp32 .pte vs eager latency at each length")
    parser.add_argument("--int8-seq-len", type=int, default=256, help="length of the int8 delegation checks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "export_delegation"))
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kind(s) {', '.join(unknown)}: use {', '.join(KINDS)}")
    seq_lens = [int(n) for n in args.seq_lens.split(",")]
    for name in ("executorch", "litert"):
        FORMATS[name].require("int8")
    threads = pin_threads(args.threads)
    max_len = max([*seq_lens, args.int8_seq_len])

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            model = build_model(kind, max_len, args.seed)
            row = {"kind": kind, "executorch": {}, "litert": {}, "latency": {}}
            for N in seq_lens:
                x = tokens(1, N, args.seed)
                program = torch.export.export(model, (x,))
                pte = Path(tmp) / f"{kind}-{N}.pte"
                row["executorch"][f"fp32_N{N}"] = executorch_case(program, pte, "fp32")
                row["latency"][N] = latency(model, pte, x, threads)
                print(f"{kind} N={N}: eager {row['latency'][N]['eager']['p50_ms']:.2f} ms, "
                      f".pte {row['latency'][N]['pte']['p50_ms']:.2f} ms", flush=True)
            N = args.int8_seq_len
            x = tokens(1, N, args.seed)
            row["executorch"][f"int8_N{N}"] = executorch_case(
                int8_program(model, "xnnpack", N, args.seed), Path(tmp) / f"{kind}-int8.pte", "int8")
            row["litert"][f"fp32_N{N}"] = litert_case(
                torch.export.export(model, (x,)), Path(tmp) / f"{kind}.tflite", "fp32", x)
            row["litert"][f"int8_N{N}"] = litert_case(
                int8_program(model, "litert", N, args.seed), Path(tmp) / f"{kind}-int8.tflite", "int8", x)
            print(f"{kind}: ExecuTorch " + ", ".join(
                f"{case} {r['partitions']} subgraph(s) {r['delegated_ops']}/{r['total_ops']}"
                for case, r in row["executorch"].items()) + "; LiteRT " + ", ".join(
                f"{case} {r['partitions']} partition(s)" for case, r in row["litert"].items()), flush=True)
            rows.append(row)

    info = machine_info(threads)
    out = Path(args.out)
    write_json(out / "results.json", {"machine": info, "seq_lens": seq_lens, "int8_seq_len": args.int8_seq_len,
                                      "max_litert_partitions": MAX_LITERT_PARTITIONS, "rows": rows})
    delegation = markdown_table(
        ["kind", "ExecuTorch case", "XNNPACK subgraphs", "delegated / total ops", "outside (besides embedding)",
         ".pte KB", "target"],
        [[r["kind"], case, c["partitions"], f"{c['delegated_ops']}/{c['total_ops']}",
          _ops(c["undelegated_except_embedding"]), f"{c['bytes'] / 1024:.0f}", _mark(c["meets_target"])]
         for r in rows for case, c in r["executorch"].items()])
    litert = markdown_table(
        ["kind", "LiteRT case", "XNNPACK partitions", ".tflite KB", "target (≤ 2)"],
        [[r["kind"], case, c["partitions"], f"{c['bytes'] / 1024:.0f}", _mark(c["meets_target"])]
         for r in rows for case, c in r["litert"].items()])
    speed = markdown_table(
        ["kind", "N", "eager PyTorch (ms)", "fp32 .pte (ms)", "speedup", "max abs error", "target"],
        [[r["kind"], N, f"{lat['eager']['p50_ms']:.2f}", f"{lat['pte']['p50_ms']:.2f}",
          f"{lat['speedup']:.2f}x", f"{lat['max_abs_error']:.1e}", _mark(lat["meets_target"])]
         for r in rows for N, lat in r["latency"].items()])
    text = (f"ExecuTorch delegation (XNNPACK partitioner; the embedding lookup is the one op allowed outside):\n\n"
            f"{delegation}\n\nLiteRT delegation (XNNPACK delegate partitions in the interpreter):\n\n{litert}\n\n"
            f"Latency, batch 1, p50 of timed calls, {threads} thread(s) in both runtimes:\n\n{speed}\n\n"
            f"{machine_markdown(info)}")
    write_text(out / "results.md", text)
    print(text)


def _ops(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "none"


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


if __name__ == "__main__":
    main()
