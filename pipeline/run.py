"""Running the stages: the ``pipeline()`` loop, each stage's units in turn, their output captured in the stage's log."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from difftx_edge.io import atomic_write_json
from difftx_edge.pipeline.cache import forget_record, key_sha256, up_to_date, write_record
from difftx_edge.pipeline.plan import REPORT, STAGES, SUMMARY, PipelineConfig, Plan
from difftx_edge.pipeline.report import plural
from difftx_edge.pipeline.stages import BUILDERS, Context
from difftx_edge.quiet import Console, into_log

log = logging.getLogger(__package__)

TITLES = {"train": "fp32 training", "quantize": "QAT to int8, per quantizer",
          "export": "export, with parity and accuracy in each runtime", "check": "parity and accuracy against PyTorch",
          "bench": "latency and memory", "report": "tables, plots, machine and versions"}
# These stages' libraries draw useful bars (epochs, QAT steps, benchmark rows); export's toolchains draw one
# for every converter pass, which belongs in the log.
LIBRARY_BARS = ("train", "quantize", "bench")


def pipeline(cfg: PipelineConfig, *, force: Iterable[str] = (), progress: bool = True) -> dict:
    """Run every stage whose outputs are missing or out of date, and write ``report.md``.

    Args:
        cfg: the task, model, formats, precisions, target and schedule.
        force: stages to redo even when their outputs are up to date (later
            stages follow when what they read changes).
        progress: draw progress bars; one line per stage is written either way.

    A unit that fails never stops the others: what needs its outputs is not
    run (a bundle that failed to export is neither checked nor timed), every
    other unit runs, and the report marks each failure with its one-line
    reason. A failed unit leaves no record, so the next run retries it.

    Returns:
        The summary written to ``pipeline.json``: each stage's status (ran,
        skipped, not needed, failed or interrupted), its units and wall times,
        and ``failed``: one ``{"unit", "reason"}`` per unit that failed or could
        not run (empty when all passed).

    Raises:
        ValueError: a bad config or a missing extra, before any work.
    """
    from difftx_edge.extras import versions

    forced = set(force)
    for name in forced:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r} to force: use {', '.join(STAGES)}")
    plan = Plan.of(cfg)
    plan.require()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(cfg, plan, out, versions(), progress)
    summary = {"config": asdict(cfg), "force": sorted(forced), "stages": [], "failed": [], "seconds": 0.0}
    started = time.perf_counter()
    with Console(progress) as console:
        console.say(f"difftx-edge pipeline: {cfg.task}, {cfg.attention} attention, "
                    f"{', '.join(f'{f} {p}' for f, p in plan.bundles)}, bench on {cfg.target} -> {out}")
        for number, stage in enumerate(STAGES, 1):
            entry = {"stage": stage, "status": "running", "seconds": 0.0, "units": []}
            summary["stages"].append(entry)
            stage_started = time.perf_counter()
            # The report shows every stage's wall time and every failure, so it is rewritten whenever any unit ran
            # or failed.
            redo = stage in forced or (stage == "report" and any(
                unit["status"] != "skipped" for earlier in summary["stages"] for unit in earlier["units"]))
            try:
                _run_stage(ctx, stage, f"[{number}/{len(STAGES)}] {stage}", redo, entry, console)
            finally:
                if entry["status"] == "running":  # stopped by Ctrl-C: its finished units are recorded
                    entry["status"] = "interrupted"
                entry["seconds"] = _seconds(stage_started)
                summary["seconds"] = _seconds(started)
                summary["failed"] = [{"unit": unit, "reason": reason} for unit, reason in ctx.failed.items()]
                atomic_write_json(out / SUMMARY, summary)
        where = f"report in {out / REPORT}" if (out / REPORT).is_file() and "report" not in ctx.failed else \
            "no report"
        if ctx.failed:
            console.say(f"difftx-edge pipeline: {plural(len(ctx.failed), 'unit')} failed or not run "
                        f"({', '.join(ctx.failed)}) in {summary['seconds']:.0f} s; everything else is done; {where}")
        else:
            console.say(f"difftx-edge pipeline: done in {summary['seconds']:.0f} s; {where}")
    return summary


def _run_stage(ctx: Context, stage: str, label: str, forced: bool, entry: dict, console: Console) -> None:
    units = BUILDERS[stage](ctx)
    if not units:
        entry["status"] = "not needed"
        reason = "no int8 precision asked for" if stage == "quantize" else "no bundle can be timed on this target"
        console.say(f"{label}: not needed ({reason})")
        return
    todo = []
    for unit in units:
        key_hash = key_sha256(unit.key)
        if not forced and up_to_date(ctx.out, unit.name, unit.outputs, key_hash):
            entry["units"].append({"unit": unit.name, "status": "skipped"})
        else:
            todo.append((unit, key_hash))
    if not todo:
        entry["status"] = "skipped"
        console.say(f"{label}: up to date, skipped")
        return
    skipped = len(units) - len(todo)
    console.say(f"{label} ({TITLES[stage]}): {', '.join(unit.what for unit, _ in todo)}"
                + (f" ({skipped} unit(s) up to date)" if skipped else ""))
    log_path = ctx.out / "logs" / f"{stage}.log"
    bar = console.bar(len(todo), stage) if len(todo) > 1 else None
    try:
        for unit, key_hash in todo:
            if bar is not None:
                bar.set_postfix_str(unit.what)
            forget_record(ctx.out, unit.name)  # until it finishes, the unit reads as not done
            started = time.perf_counter()
            reason = None
            if unit.blocked is not None:
                reason = f"not run: {unit.blocked}"
            else:
                with into_log(log_path, unit.name, console, stage in LIBRARY_BARS):
                    try:
                        unit.run()
                    # Whatever a library raises fails this unit only, as one line; its traceback goes to the log.
                    except Exception as err:  # noqa: BLE001
                        log.exception("unit %s failed", unit.name)
                        reason = _first_line(err)
            if reason is not None:
                for path in unit.outputs if unit.discard else ():
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                ctx.failed[unit.name] = reason
                entry["units"].append({"unit": unit.name, "status": "not run" if unit.blocked else "failed",
                                       "reason": reason})
                console.say(f"{label}: {unit.what} {reason}" if unit.blocked else
                            f"{label}: {unit.what} failed: {reason} (log: {log_path})")
                if bar is not None:
                    bar.update(1)
                continue
            seconds = _seconds(started)
            write_record(ctx.out, unit.name, stage, unit.key, key_hash, seconds, unit.outputs)
            entry["units"].append({"unit": unit.name, "status": "ran", "seconds": seconds})
            console.say(f"{label}: {unit.what} done in {seconds:.1f} s")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    entry["status"] = "failed" if any(unit["status"] in ("failed", "not run") for unit in entry["units"]) else "ran"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _seconds(since: float) -> float:
    return round(time.perf_counter() - since, 3)
