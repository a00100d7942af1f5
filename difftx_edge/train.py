"""End-to-end training: AdamW, warm-up plus cosine, clipping, per-epoch evaluation, best checkpoint.

A run directory holds:

- ``model.safetensors``: the best weights so far (by validation metric);
- ``config.json``: model, task and training config, label names, vocabulary;
- ``metrics.jsonl``: one JSON line per epoch, then one for the test split;
- ``state.pt``: the resumable state after the last finished epoch (current
  weights, optimizer, schedule, RNG), loaded with ``weights_only=True``.

Every file is written to a temporary name and renamed, so a killed run never
leaves a half-written checkpoint and loses at most the epoch in progress
(``difftx_edge.checkpoint``).
The same code runs under ``torchrun`` with DistributedDataParallel.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from difftx_edge.checkpoint import RunFiles, append_line, keep_epochs, load_state, save_state
from difftx_edge.distributed import Dist
from difftx_edge.io import (
    CONFIG_SCHEMA,
    atomic_write_json,
    load_run,
    missing_dirs,
    remove_empty_dirs,
    require_output_dir,
    save_weights,
)
from difftx_edge.memory import require_training_memory
from difftx_edge.model import DiffTransformer, ModelConfig
from difftx_edge.tasks import TaskConfig, TaskData, load_task
from difftx_edge.threads import pin_threads

log = logging.getLogger("difftx_edge.train")

# Model fields the user chooses; the others (input kind, outputs, max_len, head) follow from the task.
MODEL_CHOICES = ("d_model", "n_heads", "n_layers", "d_ff", "attention", "causal", "window", "n_global",
                 "rank", "chunk", "eps", "position", "dropout")


@dataclass
class TrainConfig:
    """How to train. Every field is also a ``difftx-edge train`` flag."""

    out: str = "runs/digits"
    epochs: int = 150
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of all steps spent warming the learning rate up
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    # The task's label-keeping random changes of training batches (digits: one-pixel shifts); tasks without
    # any ignore it. On by default: with window 4 it lifted digits' test accuracy on every seed tried.
    augment: bool = True
    ema: float = 0.0  # decay of an exponential moving average of the weights, which is scored and saved; 0: off
    seed: int = 0
    # None: 1 for a model under ONE_THREAD_PARAMS, else the cores divided among the processes
    threads: int | None = None
    device: str = "auto"  # "auto", "cpu" or "cuda"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            # nan passes every range check below (each comparison is False), so it is refused first.
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("weight_decay must be >= 0 and grad_clip > 0")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema is a decay in [0, 1) (0: off), got {self.ema}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.threads is not None:
            check_threads(self.threads)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}: use auto, cpu or cuda")


# More threads than this many per core only make the cores take turns: a typo such as --threads 999.
THREADS_PER_CORE = 4


def check_threads(threads: int, flag: str = "threads") -> None:
    """Raise ValueError for a thread count below 1 or above ``THREADS_PER_CORE`` per core of this machine."""
    cores = os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"{flag} must be at least 1, got {threads}")
    if threads > THREADS_PER_CORE * cores:
        raise ValueError(f"{flag} {threads} is far more than this machine's {cores} cores: use at most {cores} "
                         f"(or leave it unset)")


def build_model_config(task: TaskData, choices: dict) -> ModelConfig:
    """The model for a task: input kind, outputs and length from the task, the rest from ``choices``."""
    unknown = set(choices) - set(MODEL_CHOICES)
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(sorted(unknown))}: use {', '.join(MODEL_CHOICES)}")
    lm = task.objective == "lm"
    if lm and choices.get("causal") is False:
        raise ValueError(f"task {task.name} is a language model and needs causal attention: drop --no-causal")
    return ModelConfig(vocab_size=task.vocab_size, input_dim=task.input_dim, n_outputs=task.n_outputs,
                       max_len=task.seq_len, head="lm" if lm else "classify",
                       **{**choices, "causal": lm or choices.get("causal", False)})


# Below this many parameters a model trains on one thread when none is asked for. Its ops are too small to gain
# from a second thread (the digits default, 0.1M parameters: 2.20 s/epoch on one thread of a lightly loaded 2-core EPYC,
# 2.15 s on two), while a second thread that waits for a busy core slows every op; one thread also gives the
# same numbers on every machine, whatever its core count.
ONE_THREAD_PARAMS = 1_000_000


def set_threads(threads: int | None, world: int, n_params: int | None = None) -> int:
    """Choose the thread count, pin torch to it (``difftx_edge.threads``) and return it.

    Oversubscribed threads slow small models by an order of magnitude, so the
    count is always set. ``threads=None`` chooses: 1 for a model of fewer than
    ``ONE_THREAD_PARAMS`` parameters, else the cores divided among ``world``
    processes. OpenMP threads wait passively (``difftx_edge/__init__.py``), so
    two threads on a busy 2-core machine are not slower than one.
    """
    if threads is None and n_params is not None and n_params < ONE_THREAD_PARAMS:
        threads = 1
    return pin_threads(threads or max(1, (os.cpu_count() or 1) // world))


def loss_and_metric(logits: torch.Tensor, targets: torch.Tensor,
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and the number of correct predictions (per example, or per token for lm)."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
                           label_smoothing=label_smoothing)
    correct = (logits.argmax(-1) == targets).sum()
    return loss, correct


@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 256,
             device: torch.device | str = "cpu", switch_mode: bool = True) -> dict:
    """Loss and task metric on one split.

    Returns:
        ``{"loss", "accuracy"}`` where accuracy is per example (classify) or
        per token (lm), plus ``"bits_per_byte"`` for a language model.

    ``switch_mode=False`` leaves the mode alone, for exported graphs, which
    refuse ``.eval()``.
    """
    if switch_mode:
        model.eval()
    total_loss, total_correct, count = 0.0, 0, 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size].to(device), targets[i:i + batch_size].to(device)
        loss, correct = loss_and_metric(model(x), y)
        total_loss += loss.item()
        total_correct += correct.item()
        count += y.numel()
    result = {"loss": total_loss / count, "accuracy": total_correct / count}
    if targets.dim() == 2:
        result["bits_per_byte"] = result["loss"] / math.log(2)
    return result


def primary(metrics: dict, metric: str) -> float:
    """The number a run is judged by, higher is better."""
    return -metrics["bits_per_byte"] if metric == "bits_per_byte" else metrics["accuracy"]


def schedule(step: int, total: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(train_cfg: TrainConfig, task_cfg: TaskConfig, model_choices: dict | None = None, *,
          resume: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Train a DiffTransformer on a task and write a run directory.

    Args:
        train_cfg: optimisation settings and the output directory.
        task_cfg: which data to train on.
        model_choices: ModelConfig fields the user chose (see ``MODEL_CHOICES``).
        resume: continue the run in ``train_cfg.out`` from its last finished
            epoch, with the configs saved there; the final weights equal an
            uninterrupted run's.
        force: start over in an output directory that already holds a run.
        progress: show a progress bar (on the main process only).

    Returns:
        The test-split metrics of the best checkpoint.

    Raises:
        ValueError: bad configuration, data, or run directory.
    """
    files = RunFiles(require_output_dir(train_cfg.out))  # before any work: not after an epoch
    created = missing_dirs(files.root)
    new = [path for path in (files.config, files.metrics, files.model) if not path.exists()]
    try:
        return _train(train_cfg, task_cfg, model_choices, resume=resume, force=force, progress=progress)
    except BaseException:
        if not resume and Dist.from_env().main and not files.state.exists():
            # No epoch finished, so there is nothing to resume: a failed or interrupted start removes the
            # files and folders it created (never ones that were there before).
            for path in new:
                path.unlink(missing_ok=True)
            files.remove_partial_writes()
            remove_empty_dirs(created)
        raise


def _train(train_cfg: TrainConfig, task_cfg: TaskConfig, model_choices: dict | None = None, *,
           resume: bool = False, force: bool = False, progress: bool = True) -> dict:
    dist = Dist.from_env()
    files = RunFiles(Path(train_cfg.out))
    saved = _resume_configs(files) if resume else None
    if saved:
        train_cfg, task_cfg, model_choices = saved
        train_cfg.out = str(files.root)
        if dist.main:  # a SIGKILL mid-write leaves the temporary file; the finished files are intact
            files.remove_partial_writes()
    elif files.state.exists() or files.model.exists():
        if not force:
            raise ValueError(f"{files.root} already holds a run: pass --resume to continue it or --force to start over")
    device = dist.device(train_cfg.device)
    dist.start(device)

    torch.manual_seed(train_cfg.seed)
    task = load_task(task_cfg)
    model_cfg = build_model_config(task, dict(model_choices or {}))
    require_training_memory(model_cfg, train_cfg.batch_size, task.seq_len, device)
    model = DiffTransformer(model_cfg).to(device)
    threads = set_threads(train_cfg.threads, dist.world, model.num_parameters())
    steps_per_epoch = math.ceil(len(task.train.inputs) / train_cfg.batch_size)
    total_steps = steps_per_epoch * train_cfg.epochs
    warmup_steps = max(1, int(train_cfg.warmup * total_steps))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "position" not in name else no_decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train_cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=train_cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, total_steps, warmup_steps))
    averaged = _averaged_copy(model) if train_cfg.ema else None  # the weights that are scored and saved, if set
    scored = averaged if averaged is not None else model
    augment = task.augment if train_cfg.augment else None

    start_epoch, best = 0, -math.inf
    if saved:
        start_epoch, best = load_state(files, model, optimizer, scheduler, averaged)
        if dist.main:
            keep_epochs(files.metrics, start_epoch)
    elif dist.main:
        files.root.mkdir(parents=True, exist_ok=True)
        files.metrics.unlink(missing_ok=True)
        for stale in (files.model, files.state):
            stale.unlink(missing_ok=True)
        atomic_write_json(files.config, {
            "schema": CONFIG_SCHEMA,  # read_config refuses a version newer than it knows
            "model": model_cfg.to_dict(), "task": asdict(task_cfg), "train": asdict(train_cfg),
            "model_choices": dict(model_choices or {}), "task_info": task.to_dict(),
        })

    net = dist.wrap(model, device)
    if dist.main:
        log.info("training %s on %s: %d parameters, %d threads, %d process(es), epochs %d-%d",
                 model_cfg.attention, task.name, model.num_parameters(), threads, dist.world,
                 start_epoch + 1, train_cfg.epochs)

    x_train, y_train = task.train.inputs, task.train.targets
    for epoch in range(start_epoch, train_cfg.epochs):
        started = time.perf_counter()
        # The shuffle depends on (seed, epoch) only, so a resumed run sees the same batches.
        epoch_seed = train_cfg.seed * 100003 + epoch
        generator = torch.Generator().manual_seed(epoch_seed)  # the order, then the augmentation draws
        order = torch.randperm(len(x_train), generator=generator)
        net.train()
        train_loss, seen = 0.0, 0
        bar = _bar(range(steps_per_epoch), f"epoch {epoch + 1}/{train_cfg.epochs}", progress and dist.main)
        for step in bar:
            batch = order[step * train_cfg.batch_size:(step + 1) * train_cfg.batch_size]
            if len(batch) < dist.world:  # a remainder too small to give every process a sample
                continue
            mine = batch[dist.rank::dist.world]  # this process's share of the global batch
            if augment is None:
                x = x_train[mine]
            else:  # the whole global batch, then this process's share: every process makes the same draws
                x = augment(x_train[batch], generator)[dist.rank::dist.world]
            x, y = x.to(device), y_train[mine].to(device)
            loss_sum, _ = loss_and_metric(net(x), y, train_cfg.label_smoothing)
            # Dividing by the global batch's target count (times world, which DDP averages
            # away) makes the summed gradient equal one process's full-batch mean.
            loss = loss_sum * dist.world / (len(batch) * (y.numel() // max(1, len(mine))))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if averaged is not None:
                _update_average(averaged, model, train_cfg.ema, epoch * steps_per_epoch + step)
            train_loss += loss_sum.item()
            seen += y.numel()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_sum.item() / y.numel():.4f}")
        val = evaluate(scored, task.val.inputs, task.val.targets, device=device)
        score = primary(val, task.metric)
        improved = score >= best  # on a tie the later, longer-trained epoch wins
        best = max(best, score)
        record = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "lr": scheduler.get_last_lr()[0],
                  "train_loss": train_loss / max(1, seen), **{f"val_{k}": v for k, v in val.items()},
                  "seconds": round(time.perf_counter() - started, 3)}
        if dist.main:
            if improved:
                save_weights(files.model, scored)
            # The metrics line goes first: a kill between the two leaves an extra line, which resume drops.
            append_line(files.metrics, record)
            save_state(files, model, optimizer, scheduler, epoch + 1, best, averaged)
            log.info("epoch %d: train loss %.4f, val %s %.4f%s", epoch + 1, record["train_loss"], task.metric,
                     val.get(task.metric, val["accuracy"]), " (best)" if improved else "")
    dist.finish()
    best_model, _ = load_run(files.root, device=device)
    test = evaluate(best_model, task.test.inputs, task.test.targets, device=device)
    if dist.main:
        append_line(files.metrics, {"split": "test", **test})
        log.info("test %s of the best checkpoint: %.4f", task.metric, test.get(task.metric, test["accuracy"]))
    return test


def _bar(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=None)


def _averaged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model`` that ``_update_average`` keeps as a moving average of its weights."""
    averaged = copy.deepcopy(model).eval()
    averaged.requires_grad_(False)
    return averaged


@torch.no_grad()
def _update_average(averaged: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """One step of the weights' exponential moving average.

    The decay ramps up as ``(1 + step) / (10 + step)`` until it reaches
    ``decay``, so a short run averages its own weights, not the initial ones.
    """
    d = min(decay, (1 + step) / (10 + step))
    for avg, new in zip(averaged.state_dict().values(), model.state_dict().values()):
        if avg.is_floating_point():
            avg.lerp_(new, 1 - d)
        else:
            avg.copy_(new)


_ADDED_OFF = {"augment": False, "ema": 0.0}


def _resume_configs(files: RunFiles) -> tuple[TrainConfig, TaskConfig, dict]:
    if not files.state.exists() or not files.config.exists():
        raise ValueError(f"nothing to resume in {files.root}: it has no state.pt and config.json; "
                         "run without --resume to start")
    try:
        saved = json.loads(files.config.read_text())
        # Runs saved before a field existed resume with it off.
        train_cfg = TrainConfig(**{f.name: saved["train"].get(f.name, _ADDED_OFF[f.name]) if f.name in _ADDED_OFF
                                   else saved["train"][f.name] for f in fields(TrainConfig)})
        task_cfg = TaskConfig(**saved["task"])
        choices = saved["model_choices"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"cannot resume: {files.config} is corrupt ({type(err).__name__}: {err}); "
                         "start over with --force") from err
    return train_cfg, task_cfg, choices
