"""Test accuracy of fp32, PTQ and QAT int8 for every backend quantizer, measured in PyTorch on the converted model.

Targets (issue 3): on `digits`, QAT int8 is within 0.5 points of fp32 for each
backend, and QAT is no worse than PTQ; the same table for `listops` at the CPU
setting. Each task's fp32 run is trained once with the default model; every
backend then quantizes that same checkpoint, so the rows compare quantizers.
The runtimes re-measure these accuracies in the export benchmark.

    python benchmarks/quantization_accuracy.py [--tasks digits,listops] [--backends xnnpack,...] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from common import machine_info, machine_markdown, write_json, write_text

from difftx_edge.markdown import markdown_table
from difftx_edge.quantize import QUANTIZERS, QuantConfig, quantize
from difftx_edge.tasks import TaskConfig
from difftx_edge.threads import pin_threads
from difftx_edge.train import TrainConfig, train

TARGET_POINTS = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,listops")
    parser.add_argument("--backends", default=",".join(sorted(QUANTIZERS)))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--listops-epochs", type=int, default=20,
                        help="fp32 epochs for listops (8000 sequences of up to 128 tokens)")
    parser.add_argument("--qat-epochs", type=int, default=QuantConfig.__dataclass_fields__["epochs"].default)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantization_accuracy"))
    args = parser.parse_args()
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in QUANTIZERS]
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)}: use {', '.join(sorted(QUANTIZERS))}")
    threads = pin_threads(args.threads)
    tasks = {"digits": (TaskConfig("digits", seed=args.seed), TrainConfig(threads=threads, seed=args.seed)),
             "listops": (TaskConfig("listops", seed=args.seed, listops_setting="cpu"),
                         TrainConfig(threads=threads, seed=args.seed, epochs=args.listops_epochs))}
    rows = []
    for task_name in args.tasks.split(","):
        task_cfg, train_cfg = tasks[task_name]
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            started = time.perf_counter()
            train(dataclasses.replace(train_cfg, out=str(run)), task_cfg, {}, progress=False)
            train_seconds = time.perf_counter() - started
            model = json.loads((run / "config.json").read_text())["model"]
            print(f"{task_name}: fp32 trained in {train_seconds:.0f} s", flush=True)
            for backend in backends:
                cfg = QuantConfig(run=str(run), out=str(Path(tmp) / backend), backend=backend,
                                  epochs=args.qat_epochs, threads=threads, seed=args.seed)
                report = quantize(cfg, progress=False)
                acc = {k: report["test"][k]["accuracy"] for k in ("fp32", "ptq", "qat")}
                rows.append({"task": task_name, "backend": backend, "attention": model["attention"],
                             "test_accuracy": acc,
                             "qat_minus_fp32_points": round(100 * (acc["qat"] - acc["fp32"]), 3),
                             "qat_minus_ptq_points": round(100 * (acc["qat"] - acc["ptq"]), 3),
                             "int8_linear_layers": report["int8_linear_layers"],
                             "linear_layers": report["linear_layers"],
                             "int8_weights": report["int8_weights"], "ops": report["ops"], "qat": {
                                 k: report["qat"][k] for k in ("steps", "selected_step", "prepared_vs_converted")},
                             "seconds": report["seconds"], "train_seconds": round(train_seconds, 1),
                             "config": dataclasses.asdict(cfg) | {"run": None, "out": None}})
                print(f"  {backend}: fp32 {100 * acc['fp32']:.2f}  PTQ {100 * acc['ptq']:.2f}  "
                      f"QAT {100 * acc['qat']:.2f}  ({report['seconds']['total']:.0f} s)", flush=True)

    info = machine_info(threads)
    for row in rows:
        row["meets_target"] = row["task"] != "digits" or (
            row["qat_minus_fp32_points"] >= -TARGET_POINTS and row["qat_minus_ptq_points"] >= 0)
    out = Path(args.out)
    write_json(out / "results.json", {"machine": info, "target_points": TARGET_POINTS, "rows": rows})
    accuracy = markdown_table(
        ["task", "backend", "fp32", "PTQ int8", "QAT int8", "QAT − fp32", "int8 Linears", "QAT time (s)"],
        [[r["task"], r["backend"], *(f"{100 * r['test_accuracy'][k]:.2f} %" for k in ("fp32", "ptq", "qat")),
          f"{r['qat_minus_fp32_points']:+.2f}", f"{r['int8_linear_layers']}/{r['linear_layers']}",
          f"{r['seconds'].get('qat', 0):.0f}"] for r in rows])
    ops = markdown_table(
        ["backend", "integer ops (int8 in and out)", "float ops"],
        [[r["backend"], _ops(r["ops"]["integer"]), _ops(r["ops"]["float"])]
         for r in rows if r["task"] == rows[0]["task"]])
    text = (f"{accuracy}\n\nOps of the converted {rows[0]['task']} graph ({rows[0]['attention']} attention), "
            f"counted per backend:\n\n{ops}\n\n{machine_markdown(info)}")
    write_text(out / "results.md", text)
    print(text)


def _ops(counts: dict[str, int]) -> str:
    return ", ".join(f"{name.removeprefix('aten.')} {n}" for name, n in counts.items()) or "none"


if __name__ == "__main__":
    main()
