"""``quantize``: from a trained fp32 run to a saved int8 program, with PTQ as the baseline QAT must beat.

An output directory holds:

- ``quantized.pt2``: the converted program (``torch.export.save``), dynamic in
  the batch; the exporters load it without re-running QAT;
- ``quant_config.json``: this config, the source run and its checkpoint's
  sha256, the model and task configs, the program's sha256 and input spec;
- ``quant_report.json``: which of PTQ and QAT the program is and why
  (``shipped``, ``reason``: QAT only when its validation score is strictly
  better), both validation scores (``val_score``), test accuracy of fp32,
  PTQ and QAT in PyTorch, the shipped program's int8 weight counts and which
  of its ops are integer and which stay float, the prepared-versus-converted
  check, and the time each stage took.

Each file is written atomically, and the report is written last and names the
program's hash: ``load_quantized`` accepts only a complete, consistent set.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from difftx_edge.extras import versions
from difftx_edge.hashing import sha256_bytes, sha256_file
from difftx_edge.io import require_output_dir
from difftx_edge.quantize import pt2e
from difftx_edge.quantize.registry import get_quantizer_spec

log = logging.getLogger("difftx_edge.quantize")

METHODS = ("qat", "ptq")
PROGRAM, CONFIG, REPORT = "quantized.pt2", "quant_config.json", "quant_report.json"
INT8 = "int8"


def int8_dir(root: str | os.PathLike, backend: str | None = None) -> Path:
    """``ROOT/int8/BACKEND``: where quantize writes a run's program for ``backend`` unless told otherwise, and
    where export and the pipeline look for it; ``ROOT/int8``, the folder of every backend's, without one.

    ``root`` is a run directory, or the pipeline's output directory, which holds its int8 programs the same way.
    """
    folder = Path(root) / INT8
    return folder if backend is None else folder / backend


@dataclass
class QuantConfig:
    """How to quantize a run. Every field is also a ``difftx-edge quantize`` flag."""

    run: str
    out: str | None = None  # None: RUN/int8/BACKEND, where export looks for it
    backend: str = "xnnpack"
    method: str = "qat"
    epochs: int = 3  # QAT passes over the training split
    steps: int | None = None  # QAT optimizer steps; overrides epochs
    lr: float = 1e-5  # peak QAT learning rate: small, since moving-average observers lag the weights
    observer_freeze: float = 0.3  # fraction of QAT steps, at the end, with observers frozen
    calib_batches: int = 16  # training batches that calibrate PTQ (and seed QAT's observers)
    batch_size: int = 64
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        get_quantizer_spec(self.backend)
        if self.out is None:
            self.out = str(int8_dir(self.run, self.backend))
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.epochs < 1 or (self.steps is not None and self.steps < 1):
            raise ValueError("epochs and steps must be at least 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.observer_freeze < 1:
            raise ValueError(f"observer_freeze is a fraction of the QAT steps in [0, 1), got {self.observer_freeze}")
        if self.calib_batches < 1:
            raise ValueError(f"calib_batches must be at least 1, got {self.calib_batches}")
        if not 2 <= self.batch_size <= pt2e.MAX_BATCH:
            raise ValueError(f"batch_size must be in [2, {pt2e.MAX_BATCH}], got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")


def quantize(cfg: QuantConfig, *, force: bool = False, progress: bool = True) -> dict:
    """Quantize a trained run for one backend and write the output directory.

    Args:
        cfg: the run, backend, method and schedule.
        force: replace another run's (or another config's) results in ``cfg.out``.
        progress: show a progress bar during QAT.

    Returns:
        The report written to ``quant_report.json``.

    Raises:
        ValueError: bad config, run directory or output directory; a missing
            backend extra; or a model the backend cannot quantize.
    """
    from difftx_edge.io import load_run
    from difftx_edge.tasks import TaskConfig, load_task
    from difftx_edge.train import evaluate, primary, set_threads

    spec = get_quantizer_spec(cfg.backend)
    spec.require()  # one line naming the extra, before any work
    started = time.perf_counter()
    model, run_config = load_run(cfg.run)
    threads = set_threads(cfg.threads, 1, model.num_parameters())
    source = {"run": str(Path(cfg.run).resolve()), "sha256": sha256_file(Path(cfg.run) / "model.safetensors")}
    out = Path(cfg.out)
    _check_out(out, cfg, source, force)

    task = load_task(TaskConfig(**run_config["task"]))
    train_cfg = run_config.get("train", {})
    x_train, y_train = task.train.inputs, task.train.targets
    test = task.test
    timings = {}

    t = time.perf_counter()
    fp32 = evaluate(model, test.inputs, test.targets)
    timings["fp32_eval"] = _seconds(t)
    example = x_train[:2]
    generator = torch.Generator().manual_seed(cfg.seed)
    calib_idx = torch.randperm(len(x_train), generator=generator)[:cfg.calib_batches * cfg.batch_size]
    calib = [x_train[calib_idx[i:i + cfg.batch_size]] for i in range(0, len(calib_idx), cfg.batch_size)]

    log.info("%s: PTQ with %d calibration batches", cfg.backend, len(calib))
    t = time.perf_counter()
    ptq_prepared = pt2e.prepare(pt2e.export_for_quantization(model, example), spec.quantizer(qat=False), qat=False)
    with pt2e.refuse_nonfinite(ptq_prepared, cfg.backend):
        pt2e.calibrate(ptq_prepared, calib)
    val = task.val

    def val_score(graph):
        # The task metric first; a validation split is small, so its ties go to the lower loss.
        metrics = evaluate(graph, val.inputs, val.targets, switch_mode=False)
        return [primary(metrics, task.metric), -metrics["loss"]]

    ptq = _deployable(pt2e.convert(ptq_prepared), spec)
    ptq_metrics = evaluate(ptq, test.inputs, test.targets, switch_mode=False)
    val_scores = {"ptq": val_score(ptq), "qat": None}
    timings["ptq"] = _seconds(t)
    del ptq_prepared

    qat_metrics, qat_info, qat = None, None, None
    if cfg.method == "qat":
        steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
        steps = cfg.steps or cfg.epochs * steps_per_epoch
        freeze_at = steps - int(round(cfg.observer_freeze * steps))
        log.info("%s: QAT for %d steps (observers frozen from step %d)", cfg.backend, steps, freeze_at)
        t = time.perf_counter()
        prepared = pt2e.prepare(pt2e.export_for_quantization(model, example), spec.quantizer(qat=True), qat=True)
        with pt2e.refuse_nonfinite(prepared, cfg.backend):
            pt2e.calibrate(prepared, calib)  # start the fake-quant ranges from the data, not from zero
        bar = _bar(steps, f"QAT {cfg.backend}", progress)
        best, info = pt2e.qat_finetune(
            prepared, x_train, y_train, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, freeze_at=freeze_at,
            label_smoothing=train_cfg.get("label_smoothing", 0.0), grad_clip=train_cfg.get("grad_clip", 1.0),
            seed=cfg.seed, select_every=steps_per_epoch, score=val_score,
            on_step=lambda step, loss: bar.update(1) if bar is not None else None)
        if bar is not None:
            bar.close()
        qat = pt2e.convert(best)
        timings["qat"] = _seconds(t)
        losses = info["losses"]
        qat_info = {"steps": steps, "observers_frozen_from": freeze_at, "selected_step": info["best_step"],
                    "val_scores": info["scores"], "first_loss": losses[0],
                    "last_loss": sum(losses[-10:]) / len(losses[-10:]),
                    "prepared_vs_converted": prepared_vs_converted(best, qat, test.inputs[:256])}
        qat = _deployable(qat, spec)
        qat_metrics = evaluate(qat, test.inputs, test.targets, switch_mode=False)
        val_scores["qat"] = val_score(qat)
        del prepared, best
    # Both candidates are scored as they would ship (converted, biases snapped), on validation, never on test.
    shipped, reason = choose_shipped(val_scores["ptq"], val_scores["qat"], task.metric)
    chosen = qat if shipped == "qat" else ptq
    log.info("%s: shipping %s: %s", cfg.backend, shipped.upper(), reason)

    t = time.perf_counter()
    batch = torch.export.Dim("batch", min=1, max=pt2e.MAX_BATCH)
    program = torch.export.export(chosen, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    program_bytes = buffer.getvalue()
    timings["save"] = _seconds(t)
    timings["total"] = _seconds(started)

    weights = pt2e.linear_weights(chosen)
    report = {
        "backend": cfg.backend, "method": cfg.method, "runtime": spec.runtime,
        "task": task.name, "attention": run_config["model"]["attention"], "metric": task.metric,
        "shipped": shipped, "reason": reason,
        "val_score": val_scores,
        "test": {"fp32": fp32, "ptq": ptq_metrics, "qat": qat_metrics},
        "int8_weights": pt2e.int8_weight_count(chosen),
        "linear_layers": len(weights),
        "int8_linear_layers": sum(w["dtype"] == "int8" for w in weights),
        "linear_weights": weights,
        "ops": pt2e.op_table(chosen),
        "output_step": pt2e.output_step(chosen),
        "qat": qat_info,
        "threads": threads,
        "seconds": timings,
        "program_sha256": sha256_bytes(program_bytes),
    }
    config = {
        "quant": asdict(cfg), "source": source, "backend": {"name": spec.name, "extra": spec.extra,
                                                            "runtime": spec.runtime},
        "model": run_config["model"], "task": run_config["task"], "task_info": run_config.get("task_info"),
        "input": {"shape": ["batch", *example.shape[1:]], "dtype": str(example.dtype).removeprefix("torch."),
                  "max_batch": pt2e.MAX_BATCH},
        "program": PROGRAM, "program_sha256": report["program_sha256"], "versions": versions(),
    }
    from difftx_edge.io import atomic_write_bytes, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).unlink(missing_ok=True)  # until the new report lands, the directory reads as incomplete
    atomic_write_bytes(out / PROGRAM, program_bytes)
    atomic_write_json(out / CONFIG, config)
    atomic_write_json(out / REPORT, report)
    log.info("%s: test %s fp32 %.4f, PTQ %.4f%s -> %s", cfg.backend, task.metric, fp32["accuracy"],
             ptq_metrics["accuracy"], f", QAT {qat_metrics['accuracy']:.4f}" if qat_metrics else "", out)
    return report


def choose_shipped(ptq_score: list[float], qat_score: list[float] | None, metric: str) -> tuple[str, str]:
    """Which program ships: PTQ, unless QAT's validation score is strictly better.

    Args:
        ptq_score, qat_score: ``[task metric (higher is better), -loss]`` on
            the validation split, compared in order; ``qat_score`` is None
            when QAT did not run.
        metric: the task metric's name, for the reason.

    Returns:
        ``("qat" or "ptq", a one-line reason)``.
    """
    if qat_score is None:
        return "ptq", "QAT was not run (method ptq)"
    (ptq_m, ptq_l), (qat_m, qat_l) = ptq_score, qat_score
    compared = (f"validation {metric} QAT {_fmt(qat_m, metric)} vs PTQ {_fmt(ptq_m, metric)}, "
                f"loss {-qat_l:.4f} vs {-ptq_l:.4f}")
    if list(qat_score) > list(ptq_score):
        why = f"better validation {metric}" if qat_m > ptq_m else f"equal validation {metric}, lower loss"
        return "qat", f"QAT beats PTQ on validation ({why}): {compared}"
    return "ptq", f"QAT does not beat PTQ on validation, so the simpler PTQ ships: {compared}"


def _fmt(value: float, metric: str) -> str:
    return f"{-value:.4f}" if metric == "bits_per_byte" else f"{value:.4f}"


def prepared_vs_converted(prepared: torch.fx.GraphModule, converted: torch.fx.GraphModule,
                          inputs: torch.Tensor) -> dict:
    """How far the converted model is from the frozen fake-quant model it came from, in output quantization steps."""
    with torch.no_grad():
        diff = (prepared(inputs) - converted(inputs)).abs()
    step = pt2e.output_step(converted)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "output_step": step,
            "max_steps": float(diff.max()) / step if step else None}


def load_quantized(out_dir: str | os.PathLike):
    """Load a quantized program written by ``quantize``.

    Returns:
        ``(program, config)``: the ``torch.export.ExportedProgram`` and the
        ``quant_config.json`` dict.

    Raises:
        ValueError: the directory is missing, incomplete or inconsistent.
    """
    out = Path(out_dir)
    missing = [name for name in (PROGRAM, CONFIG, REPORT) if not (out / name).is_file()]
    if missing:
        raise ValueError(f"{out} holds no complete quantized model (missing {', '.join(missing)}): "
                         "run difftx-edge quantize first")
    try:
        config = json.loads((out / CONFIG).read_text())
        report = json.loads((out / REPORT).read_text())
        expected = config["program_sha256"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"{out} has a corrupt {CONFIG} or {REPORT}: quantize again with --force") from err
    if sha256_file(out / PROGRAM) != expected or report.get("program_sha256") != expected:
        raise ValueError(f"{out}/{PROGRAM} does not match its config and report (an interrupted run?): "
                         "quantize again with --force")
    if importlib.util.find_spec("torchao") is None:
        raise ValueError("loading a quantized program needs torchao: pip install 'difftx-edge[executorch]' "
                         "(or any backend extra)")
    from difftx_edge.untrusted import load_exported_program

    # The hash proves the set is complete, not that it is ours (whoever wrote the program can rewrite the
    # config too), so the program is read as untrusted: no pickle in it is ever run.
    program = load_exported_program(out / PROGRAM)
    return program, config


def _deployable(converted: torch.fx.GraphModule, spec) -> torch.fx.GraphModule:
    """The converted graph as the backend's integer kernels compute it: biases on their int32 grid where they are."""
    if spec.int32_bias:
        pt2e.snap_biases(converted)
    return converted


def _check_out(out: Path, cfg: QuantConfig, source: dict, force: bool) -> None:
    require_output_dir(out)
    previous = out / CONFIG
    if force or not previous.exists():
        return
    try:
        saved = json.loads(previous.read_text())
        # The same checkpoint and settings may be redone in place; --out itself may be spelled differently.
        same = (saved["source"]["sha256"] == source["sha256"]
                and saved["quant"] == {**asdict(cfg), "out": saved["quant"]["out"]})
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        same = False
    if not same:
        raise ValueError(f"{out} already holds results of another run or config: pass --force to replace them "
                         "or choose another --out")


def _seconds(since: float) -> float:
    return round(time.perf_counter() - since, 3)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)
