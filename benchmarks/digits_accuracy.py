"""Test accuracy and training time on `digits` for every attention kind, with the default config.

Target (issue 2): the default config (hybrid attention) reaches at least 98 %
test accuracy in at most 5 minutes on 2 CPU cores. Every other kind is trained
with the same settings, so the table compares attention kinds, not tuning.

    python benchmarks/digits_accuracy.py [--kinds hybrid,softmax,...] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from common import machine_info, markdown_table, pin_threads, write_json, write_text

from difftx_edge.model import ATTENTION, ModelConfig
from difftx_edge.tasks import TaskConfig
from difftx_edge.train import TrainConfig, train

TARGET_ACCURACY, TARGET_SECONDS = 0.98, 300.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="hybrid,softmax,local,linear,lowrank")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "digits_accuracy"))
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in ATTENTION]
    if unknown:
        parser.error(f"unknown attention kind(s) {', '.join(unknown)}: use {', '.join(sorted(ATTENTION))}")
    threads = pin_threads(args.threads)
    train_cfg = TrainConfig(threads=threads, seed=args.seed)
    rows = []
    for kind in kinds:
        with tempfile.TemporaryDirectory() as run_dir:
            started = time.perf_counter()
            test = train(dataclasses.replace(train_cfg, out=run_dir), TaskConfig("digits", seed=args.seed),
                         {"attention": kind}, progress=False)
            seconds = time.perf_counter() - started
            params = json.loads((Path(run_dir) / "config.json").read_text())["model"]
        rows.append({"attention": kind, "test_accuracy": test["accuracy"], "seconds": round(seconds, 1),
                     "model": params})
        print(f"{kind}: {100 * test['accuracy']:.2f} % in {seconds:.0f} s", flush=True)

    default_kind = ModelConfig.__dataclass_fields__["attention"].default
    default = next((r for r in rows if r["attention"] == default_kind), None)
    target = None
    if default is not None:
        target = {"accuracy_at_least": TARGET_ACCURACY, "seconds_at_most": TARGET_SECONDS,
                  "met": default["test_accuracy"] >= TARGET_ACCURACY and default["seconds"] <= TARGET_SECONDS}
    out = Path(args.out)
    write_json(out / "results.json", {"machine": machine_info(threads), "train": dataclasses.asdict(train_cfg), "rows": rows,
                                      "default_target": target})
    table = markdown_table(["attention", "test accuracy", "train time (s)"],
                           [[r["attention"] + (" (default)" if r["attention"] == default_kind else ""),
                             f"{100 * r['test_accuracy']:.2f} %", f"{r['seconds']:.0f}"] for r in rows])
    info = machine_info(threads)
    footer = f"\n\n{info['cpu']}, {threads} threads, torch {info['torch']}."
    if target:
        footer += (f" Target for the default: >= {100 * TARGET_ACCURACY:.0f} % in <= {TARGET_SECONDS:.0f} s: "
                   f"{'met' if target['met'] else 'missed'}.")
    write_text(out / "results.md", table + footer)
    print(table + footer)


if __name__ == "__main__":
    main()
