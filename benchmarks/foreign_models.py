"""Compatibility matrix of the models users bring: every zoo model x format x precision through ``convert_pt2``.

Issue 17, part 3. The models are ``difftx_edge.zoo``'s, built from configs in
code with random weights (compatibility, delegation and latency do not depend
on training): nn.TransformerEncoder pre- and post-norm, HF BERT, DistilBERT and
ViT (hidden 128, 4 heads, 2 layers), HF MobileNetV2, a GRU and a 1-D CNN. Each
is saved with ``torch.export.save`` and converted through the public API,
``difftx_edge.convert.api.convert_pt2``, one format and precision at a time, as
a user's ``difftx-edge convert`` would: a conversion that fails is a row with
its one-line reason, never a crash.

Per row: XNNPACK partitions and the ops left outside the delegate (ExecuTorch
from its lowering, LiteRT from the interpreter's delegate nodes), artifact
size, parity from the manifest (max abs error, or output steps for int8; top-1
agreement), the runtime's p50 latency on the model's example input against
eager PyTorch's p50 on the same input, and for int8 the speed-up and size ratio
against fp32 of the same format. Core ML cannot run on Linux: its rows hold the
conversion and the reference-evaluation parity only. Every Transformer also
gets its ExecuTorch fp32 .pte timed against eager at N=256 and N=2048 tokens.

Latency is the harness's timing (``difftx_edge.runtimes.measure.timed_loop``
and ``summarize``): warm-up calls, then a fixed number of timed calls, batch 1,
one thread in every runtime and in PyTorch. Eager PyTorch runs as users do:
``eval()`` under ``torch.inference_mode()``.

    python benchmarks/foreign_models.py [--models a,b] [--formats executorch,litert,onnx,coreml]
        [--precisions fp32,int8] [--quick] [--out benchmarks/results/foreign_models]
"""

from __future__ import annotations

import argparse
import inspect
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from common import command_line, machine_info, machine_markdown, write_json, write_text

from difftx_edge import zoo
from difftx_edge.convert import FORMATS
from difftx_edge.convert.api import ExportFailed, convert_pt2
from difftx_edge.convert.registry import PRECISIONS
from difftx_edge.markdown import markdown_table
from difftx_edge.quiet import Console, into_log
from difftx_edge.runtimes import runtime_for
from difftx_edge.runtimes.measure import latency_columns, summarize, timed_loop
from difftx_edge.threads import pin_threads

RESULTS = Path(__file__).parent / "results" / "foreign_models"
FORMAT_ORDER = ("executorch", "litert", "onnx", "coreml")
# Sizes of the matrix: the Transformers at N=256 tokens (ViT: a 128x128 image in 8x8 patches, 256 + CLS).
SIZES = {
    "encoder-prenorm": {"seq_len": 256}, "encoder-postnorm": {"seq_len": 256},
    "bert": {"seq_len": 256}, "distilbert": {"seq_len": 256}, "vit": {"image_size": 128},
    "mobilenet-v2": {}, "gru": {}, "cnn-1d": {},
}
# --quick: tiny sizes, for a smoke run and the test.
QUICK_SIZES = {
    "encoder-prenorm": {"d_model": 32, "heads": 2, "layers": 1, "seq_len": 16},
    "encoder-postnorm": {"d_model": 32, "heads": 2, "layers": 1, "seq_len": 16},
    "bert": {"hidden": 32, "layers": 1, "heads": 2, "seq_len": 16},
    "distilbert": {"hidden": 32, "layers": 1, "heads": 2, "seq_len": 16},
    "vit": {"hidden": 32, "layers": 1, "heads": 2, "image_size": 32},
    "mobilenet-v2": {"image_size": 32},
    "gru": {"hidden": 16, "seq_len": 16},
    "cnn-1d": {"channels": 16, "seq_len": 16},
}
SCALING_LENGTHS = (256, 2048)
QUICK_SCALING_LENGTHS = (16, 64)
# ViT's token count is set by its image: (image / 8)^2 patches + CLS. 360 px gives 45^2 + 1 = 2026 tokens.
VIT_PATCH = 8
VIT_IMAGE = {256: 128, 2048: 360, 16: 32, 64: 64}
NOT_ON_LINUX = "n/a (macOS)"
NOTES = (
    "torchvision's mobilenet_v3_small is not in the matrix: no torchvision build imports beside torch 2.13's CPU "
    "wheel here (0.28 fails with 'operator torchvision::nms does not exist', 0.29.1 needs torch 2.14). HF's "
    "MobileNetV2, built from its config, stands in as the convolutional image model.",
    "Core ML cannot run on Linux: its rows give the conversion and parity by reference evaluation of the saved "
    "program with coremltools' per-op numpy code (not the Core ML runtime); latency is n/a (macOS).",
    "ViT reaches N tokens through its image size (8x8 patches plus the CLS token): 128 px gives 257 tokens, "
    "360 px gives 2026 (the nearest square below 2048).",
)


def default_precisions() -> list[str]:
    """fp32 and every int8 precision the registry knows (int8, and int8-dynamic where it is registered)."""
    return ["fp32", *(p for p in PRECISIONS if p.startswith("int8"))]


@dataclass
class MatrixConfig:
    """What the matrix covers and how long it times; each field is the script's flag of the same name."""

    models: list[str] = field(default_factory=lambda: list(zoo.ZOO))
    formats: list[str] = field(default_factory=lambda: [f for f in FORMAT_ORDER if f in FORMATS])
    precisions: list[str] = field(default_factory=default_precisions)
    quick: bool = False  # tiny sizes: a smoke run
    scaling: bool = True  # the Transformers' .pte against eager at N=256 and N=2048
    threads: int = 1
    runs: int = 20  # timed calls per latency, after warmup
    long_runs: int = 5  # timed calls at N=2048
    warmup: int = 3
    parity_batches: int = 8
    rewrite: str | None = None  # passed to convert_pt2 only where it has the parameter; None: its default
    calibration_samples: int = 500  # int8's --calibration: 400 observed, 100 held back for parity and top-1
    sharpen_steps: int = 60  # Adam steps toward the model's own top-1 before converting; 0: random-init weights
    work: str = "/tmp/difftx-foreign-models"  # the .pt2 files, bundles and the toolchains' log

    def __post_init__(self) -> None:
        for what, given, known in (("model", self.models, zoo.ZOO), ("format", self.formats, FORMATS),
                                   ("precision", self.precisions, PRECISIONS)):
            unknown = [name for name in given if name not in known]
            if unknown or not given:
                raise ValueError(f"unknown or no {what}(s) {', '.join(unknown)}: use one or more of "
                                 f"{', '.join(known)}")
        if self.calibration_samples < 2:
            raise ValueError(f"calibration_samples must be at least 2, got {self.calibration_samples}")
        if self.sharpen_steps < 0:
            raise ValueError(f"sharpen_steps must be 0 or more, got {self.sharpen_steps}")
        for name in ("threads", "runs", "long_runs", "parity_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be 0 or more, got {self.warmup}")
        if self.rewrite is not None:
            if "rewrite" not in inspect.signature(convert_pt2).parameters:
                raise ValueError("convert_pt2 has no rewrite parameter on this branch: leave --rewrite out")
            rewrite_argument(self.rewrite)


def rewrite_setting(cfg: MatrixConfig) -> dict:
    """What ``convert_pt2`` was called with for its rewrites: the value, or that the parameter does not exist."""
    parameter = inspect.signature(convert_pt2).parameters.get("rewrite")
    if parameter is None:
        return {"parameter": False}
    value = rewrite_argument(cfg.rewrite) if cfg.rewrite is not None else parameter.default
    return {"parameter": True, "value": value, "given": cfg.rewrite is not None}


def rewrite_argument(text: str):
    """``--rewrite`` as convert_pt2 takes it: a bool where its default is one (on/off, true/false), else the text."""
    default = inspect.signature(convert_pt2).parameters["rewrite"].default
    if not isinstance(default, bool):
        return text
    if text.lower() not in ("on", "off", "true", "false"):
        raise ValueError(f"--rewrite {text!r}: convert_pt2 takes a bool here, give on or off")
    return text.lower() in ("on", "true")


def model_sizes(name: str, quick: bool) -> dict:
    return dict((QUICK_SIZES if quick else SIZES)[name])


def scaling_sizes(name: str, N: int, quick: bool) -> dict:
    """The model's sizes at ``N`` tokens: its sequence length, or ViT's image."""
    sizes = model_sizes(name, quick)
    if name == "vit":
        sizes["image_size"] = VIT_IMAGE[N]
    else:
        sizes["seq_len"] = N
    return sizes


def tokens(name: str, sizes: dict) -> int:
    """How many tokens the model attends over (ViT: patches plus CLS), or its sequence length."""
    if name == "vit":
        return (sizes["image_size"] // VIT_PATCH) ** 2 + 1
    return sizes.get("seq_len", 0)


def p50(call, runs: int, warmup: int) -> dict:
    """The harness's timing of ``call``: ``warmup`` untimed calls, then ``runs`` timed ones."""
    times = timed_loop(call, runs=runs, seconds=None, warmup=warmup)
    return {**latency_columns(summarize(times)), "runs": len(times)}


def eager_latency(model: torch.nn.Module, example: torch.Tensor, runs: int, warmup: int) -> dict:
    with torch.inference_mode():
        return p50(lambda: model(example), runs, warmup)


def convert(pt2: Path, out: Path, fmt: str, precision: str, cfg: MatrixConfig, console: Console,
            calibration: Path | None = None) -> tuple:
    """``convert_pt2`` for one format and precision: ``(manifest, None)`` or ``(None, one-line reason)``."""
    kwargs = {"formats": fmt, "precision": precision, "threads": cfg.threads, "parity_batches": cfg.parity_batches}
    if calibration is not None and precision.startswith("int8"):
        kwargs["calibration"] = calibration
    if cfg.rewrite is not None:
        kwargs["rewrite"] = rewrite_argument(cfg.rewrite)
    log = Path(cfg.work) / "toolchains.log"
    try:
        (manifest,) = convert_pt2(pt2, out, quiet=lambda title: into_log(log, f"{pt2.stem} {title}", console),
                                  **kwargs)
    except ExportFailed as err:  # the toolchain or parity failed: its reason, one line
        return None, err.failures[0]["reason"]
    except ValueError as err:  # refused before anything was built (a precision it cannot make yet)
        return None, str(err).splitlines()[0]
    return manifest, None


def delegation_cells(fmt: str, manifest: dict) -> dict:
    """XNNPACK partitions and the ops outside them: ExecuTorch's lowering, LiteRT's interpreter; none elsewhere."""
    delegation = manifest.get("delegation")
    if fmt not in ("executorch", "litert") or delegation is None:
        return {"partitions": None, "delegated_ops": None, "total_ops": None, "undelegated": None}
    return {key: delegation[key] for key in ("partitions", "delegated_ops", "total_ops", "undelegated")}


def parity_cells(manifest: dict) -> dict:
    parity = manifest["parity"]
    return {"max_abs_error": parity["max_abs_error"], "max_steps": parity.get("max_steps"),
            "top1_agreement": parity["top1_agreement"], "parity_samples": parity["samples"],
            "parity_check": parity["check"]}


def quantization_cells(manifest: dict) -> dict | None:
    """An int8 bundle quantized by convert: its scheme, calibration and error against fp32 PyTorch (first output)."""
    found = manifest.get("quantization")
    if not found:
        return None
    first = {key: found[key][0] if isinstance(found.get(key), list) and found[key] else found.get(key)
             for key in ("sqnr_db", "top1_agreement_fp32")}
    return {"scheme": found.get("scheme"), "quantizer": found.get("quantizer"),
            "calibration": found.get("calibration"), **first}


def runtime_latency(fmt: str, bundle: Path, x, cfg: MatrixConfig, runs: int) -> dict | str:
    """The bundle's latency in its runtime on input ``x``, or why there is none (Core ML off macOS)."""
    if FORMATS[fmt].check == "reference":
        return NOT_ON_LINUX
    runner = runtime_for(fmt).load(bundle, cfg.threads)
    return p50(lambda: runner.run([x]), runs, cfg.warmup)


def calibration_file(program, samples: int, path: Path) -> Path:
    """``samples`` random samples drawn as convert draws its own (ids within the vocabulary, floats from a
    standard normal: the sharpening inputs' distribution), as a --calibration .npz; convert holds the last 20%
    back, enough for top-1 agreement to resolve 1 %."""
    from difftx_edge.convert.inputs import example_args, user_inputs

    draws, _ = example_args(program, 2, samples)
    names = [name for name, _ in user_inputs(program)]
    np.savez(path, **{name: np.stack([sample[i] for sample in draws]) for i, name in enumerate(names)})
    return path


def sharpen(model: torch.nn.Module, example: torch.Tensor, steps: int, seed: int = 1) -> dict:
    """Fine-tune a random-init model toward its own top-1 on random inputs, so its logits have margins.

    At random init the zoo models' two largest logits are 1e-4 to 5e-4 apart on
    1 % of inputs, below any int8 rounding, so top-1 agreement with fp32 measured
    ties, not quantization. A trained classifier's logits are apart by far more;
    ``steps`` Adam steps of cross-entropy against the model's own first answers
    (inputs drawn as convert draws them) give these models such margins without
    downloading weights. Returns the margins before and after, for the results.
    """
    from difftx_edge.convert.inputs import example_args

    program = torch.export.export(model.eval(), (example,))
    draws, _ = example_args(program, seed, 64)
    inputs = torch.cat([torch.from_numpy(x) for (x,) in draws])

    def margin() -> float:  # the 1st percentile of the gap between the two largest logits
        with torch.no_grad():
            logits = model(inputs)
        top2 = logits.reshape(-1, logits.shape[-1]).topk(2, dim=-1).values
        return float(torch.quantile(top2[:, 0] - top2[:, 1], 0.01))

    before = margin()
    if steps:
        with torch.no_grad():
            labels = model(inputs).argmax(-1)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for step in range(steps):
            batch = slice(16 * step % len(inputs), 16 * step % len(inputs) + 16)
            loss = torch.nn.functional.cross_entropy(model(inputs[batch]).flatten(0, -2), labels[batch].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return {"steps": steps, "margin_p1_before": before, "margin_p1_after": margin()}


def model_rows(name: str, cfg: MatrixConfig, work: Path, console: Console) -> tuple[list[dict], dict]:
    """Every format x precision row of zoo model ``name``, and its eager latency."""
    sizes = model_sizes(name, cfg.quick)
    model, example = zoo.build(name, **sizes)
    sharpened = sharpen(model, example, cfg.sharpen_steps)
    console.say(f"{name}: logit margin (1st percentile) {sharpened['margin_p1_before']:.2g} at random init, "
                f"{sharpened['margin_p1_after']:.2g} after {cfg.sharpen_steps} sharpening steps")
    pt2 = work / f"{name}.pt2"
    program = torch.export.export(model, (example,))
    torch.export.save(program, pt2)
    calibration = calibration_file(program, cfg.calibration_samples, work / f"{name}-calibration.npz")
    eager = eager_latency(model, example, cfg.runs, cfg.warmup)
    with torch.inference_mode():
        eager["output_absmax"] = float(model(example).abs().max())  # the scale parity's errors read against
    x = example.numpy()
    rows = []
    for fmt in cfg.formats:
        fp32 = None
        for precision in cfg.precisions:
            if precision not in FORMATS[fmt].precisions:
                continue  # listed once under the table, not as a row per model
            console.say(f"{name} {fmt} {precision}")
            row = {"model": name, "format": fmt, "precision": precision, "sizes": sizes,
                   "input_shape": list(example.shape), "tokens": tokens(name, sizes) or None,
                   "eager_p50_ms": eager["p50_ms"], "output_absmax": eager["output_absmax"],
                   "sharpened": sharpened}
            manifest, reason = convert(pt2, work / name, fmt, precision, cfg, console, calibration)
            if manifest is None:
                rows.append({**row, "status": "failed", "reason": reason})
                console.say(f"  ✗ {reason}")
                continue
            latency = runtime_latency(fmt, work / name / f"{fmt}-{precision}", x, cfg, cfg.runs)
            row.update(status="ok", reason=None, artifact_bytes=manifest["artifact_bytes"],
                       export_seconds=manifest["export_seconds"], **delegation_cells(fmt, manifest),
                       **parity_cells(manifest), quantization=quantization_cells(manifest))
            if isinstance(latency, str):
                row.update(p50_ms=None, latency_note=latency, speedup_vs_eager=None)
            else:
                row.update(p50_ms=latency["p50_ms"], latency=latency, latency_note=None,
                           speedup_vs_eager=eager["p50_ms"] / latency["p50_ms"])
            if precision == "fp32":
                fp32 = row
            elif fp32 is not None:  # int8 against fp32 of the same format
                row["size_ratio_vs_fp32"] = row["artifact_bytes"] / fp32["artifact_bytes"]
                row["speedup_vs_fp32"] = (fp32["p50_ms"] / row["p50_ms"]
                                          if fp32["p50_ms"] and row["p50_ms"] else None)
            console.say(f"  ✓ {row['artifact_bytes'] / 1024:.0f} KB, p50 {_ms(row['p50_ms'])} ms "
                        f"(eager {eager['p50_ms']:.2f} ms)")
            rows.append(row)
    return rows, eager


def scaling_rows(name: str, cfg: MatrixConfig, work: Path, console: Console, matrix: list[dict]) -> list[dict]:
    """The Transformer's ExecuTorch fp32 .pte against eager at each length; the matrix's own row where it has one."""
    lengths = QUICK_SCALING_LENGTHS if cfg.quick else SCALING_LENGTHS
    rows = []
    for N in lengths:
        sizes = scaling_sizes(name, N, cfg.quick)
        found = [r for r in matrix if r["model"] == name and r["format"] == "executorch" and r["precision"] == "fp32"
                 and r["sizes"] == sizes]
        row = {"model": name, "N": N, "tokens": tokens(name, sizes), "sizes": sizes}
        if found:
            m = found[0]
            rows.append({**row, "status": m["status"], "reason": m["reason"], "eager_p50_ms": m["eager_p50_ms"],
                         "pte_p50_ms": m.get("p50_ms"), "max_abs_error": m.get("max_abs_error"),
                         "partitions": m.get("partitions"), "runs": cfg.runs})
            continue
        console.say(f"{name} executorch fp32 at N={N}")
        model, example = zoo.build(name, **sizes)
        pt2 = work / f"{name}-N{N}.pt2"
        torch.export.save(torch.export.export(model, (example,)), pt2)
        runs, warmup = (cfg.long_runs, 1) if N > 256 else (cfg.runs, cfg.warmup)
        eager = eager_latency(model, example, runs, warmup)
        # Parity at this length costs a lowering's worth of runs only: two batches are enough.
        long_cfg = replace(cfg, parity_batches=min(cfg.parity_batches, 2), warmup=warmup)
        manifest, reason = convert(pt2, work / f"{name}-N{N}", "executorch", "fp32", long_cfg, console)
        if manifest is None:
            rows.append({**row, "status": "failed", "reason": reason, "eager_p50_ms": eager["p50_ms"]})
            continue
        latency = runtime_latency("executorch", work / f"{name}-N{N}" / "executorch-fp32", example.numpy(),
                                  long_cfg, runs)
        rows.append({**row, "status": "ok", "reason": None, "eager_p50_ms": eager["p50_ms"],
                     "pte_p50_ms": latency["p50_ms"], "max_abs_error": manifest["parity"]["max_abs_error"],
                     "partitions": manifest["delegation"]["partitions"], "runs": runs})
        console.say(f"  eager {eager['p50_ms']:.2f} ms, .pte {latency['p50_ms']:.2f} ms")
    for row in rows:
        row["speedup"] = (row["eager_p50_ms"] / row["pte_p50_ms"]
                          if row["status"] == "ok" and row.get("pte_p50_ms") else None)
    return rows


def run_matrix(cfg: MatrixConfig) -> dict:
    """Convert and time every model x format x precision of ``cfg``; returns the results (rows, scaling, machine)."""
    threads = pin_threads(cfg.threads)
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, scaling, eager = [], [], {}
    with Console() as console:
        for name in cfg.models:
            found, eager[name] = model_rows(name, cfg, work, console)
            rows.extend(found)
        if cfg.scaling and "executorch" in cfg.formats and "fp32" in cfg.precisions:
            for name in cfg.models:
                if zoo.ZOO[name][1]:
                    scaling.extend(scaling_rows(name, cfg, work, console, rows))
    from importlib.metadata import version

    info = machine_info(threads)
    info["versions"]["transformers"] = version("transformers")
    not_offered = [f"{fmt} {p}" for fmt in cfg.formats for p in cfg.precisions if p not in FORMATS[fmt].precisions]
    return {"machine": info, "command": command_line(), "quick": cfg.quick, "threads": threads, "runs": cfg.runs,
            "long_runs": cfg.long_runs, "warmup": cfg.warmup, "parity_batches": cfg.parity_batches,
            "rewrite": rewrite_setting(cfg), "models": cfg.models, "formats": cfg.formats,
            "precisions": cfg.precisions, "not_offered": not_offered, "eager": eager, "rows": rows,
            "scaling": scaling, "sharpen_steps": cfg.sharpen_steps,
            "calibration_samples": cfg.calibration_samples, "notes": list(NOTES),
            "wall_seconds": round(time.perf_counter() - started, 1)}


def report(results: dict) -> str:
    """The results as markdown: the compatibility matrix, the length scaling of the .pte, the notes."""
    matrix = markdown_table(
        ["model", "format", "precision", "status", "XNNPACK partitions", "ops outside the delegate", "size (KB)",
         "p50 (ms)", "eager p50 (ms)", "vs eager", "parity: max abs error (int8: steps) / top-1",
         "int8 vs fp32: speed / size", "int8 vs fp32 PyTorch: SQNR / top-1"],
        [_matrix_cells(r) for r in results["rows"]], align="llllrlrrrrrrr")
    lines = [f"# Foreign models: compatibility matrix{' (--quick sizes)' if results['quick'] else ''}", "",
             "Each zoo model saved with torch.export.save and converted with convert_pt2, one format and precision "
             f"at a time. Latency: batch 1, p50 of {results['runs']} timed calls after {results['warmup']} warm-up "
             f"calls, {results['threads']} thread(s) in the runtime and in eager PyTorch (inference_mode), on the "
             "model's example input. Parity: the manifest's, on "
             f"{results['parity_batches']} random inputs. \"vs eager\": eager p50 / runtime p50 (above 1: faster).",
             "", matrix]
    margins = {r["model"]: r["sharpened"] for r in results["rows"] if r.get("sharpened")}
    if margins:
        lines += ["", f"Weights: random init, then {results['sharpen_steps']} Adam steps toward each model's own "
                  "top-1 on random inputs (`--sharpen-steps`), so that top-1 agreement measures quantization, not "
                  "near-ties: the 1st percentile of the gap between the two largest logits, before -> after: "
                  + "; ".join(f"{name} {m['margin_p1_before']:.1g} -> {m['margin_p1_after']:.2g}"
                              for name, m in margins.items()) + "."]
    if results["not_offered"]:
        lines += ["", "Not offered by the format (no rows): " + ", ".join(results["not_offered"]) + "."]
    rewrite = results["rewrite"]
    lines += ["", "convert_pt2's rewrite parameter: " + (f"{rewrite['value']!r}" if rewrite["parameter"]
                                                       else "not on this branch") + "."]
    if results["scaling"]:
        scaling = markdown_table(
            ["model", "N", "tokens", "status", "eager p50 (ms)", "fp32 .pte p50 (ms)", "speed-up", "partitions",
             "max abs error", "timed calls"],
            [[r["model"], r["N"], r["tokens"], "✓" if r["status"] == "ok" else f"✗ {r['reason']}",
              _ms(r["eager_p50_ms"]), _ms(r.get("pte_p50_ms")), _ratio(r.get("speedup")),
              _cell(r.get("partitions")), _error(r.get("max_abs_error")), r.get("runs", "")]
             for r in results["scaling"]], align="lrrlrrrrrr")
        lines += ["", "## ExecuTorch .pte against eager PyTorch by length (Transformers, fp32)", "", scaling]
    lines += ["", "## Notes", "", *[f"- {note}" for note in results["notes"]], "",
              f"Command: `{results['command']}` ({results['wall_seconds'] / 60:.1f} min).", "",
              machine_markdown(results["machine"])]
    return "\n".join(lines)


def _matrix_cells(r: dict) -> list:
    head = [r["model"], r["format"], r["precision"]]
    if r["status"] != "ok":
        return [*head, f"✗ {r['reason']}", *[""] * 9]
    outside = "n/a"
    if r["undelegated"] is not None:
        outside = ", ".join(f"{op} {n}" for op, n in r["undelegated"].items()) or "none"
    parity = (f"{r['max_steps']:.2f} steps" if r["max_steps"] is not None else _error(r["max_abs_error"]))
    int8 = f"{_ratio(r['speedup_vs_fp32'])} / {r['size_ratio_vs_fp32']:.2f}x" if "size_ratio_vs_fp32" in r else ""
    quantization = r["quantization"]
    error = ""
    if quantization and quantization["sqnr_db"] is not None:
        error = f"{quantization['sqnr_db']:.1f} dB / {quantization['top1_agreement_fp32']:.0%}"
    return [*head, "✓", _cell(r["partitions"]), outside, f"{r['artifact_bytes'] / 1024:.0f}",
            r["latency_note"] or _ms(r["p50_ms"]), _ms(r["eager_p50_ms"]), _ratio(r["speedup_vs_eager"]),
            f"{parity} / {r['top1_agreement']:.0%}", int8, error]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def _cell(value) -> str:
    return "n/a" if value is None else str(value)


def write_results(results: dict, out: str | Path) -> str:
    """Write ``results.json`` and ``results.md`` into ``out``, each atomically; returns the markdown."""
    out = Path(out)
    text = report(results)
    write_json(out / "results.json", results)
    write_text(out / "results.md", text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = MatrixConfig()
    parser.add_argument("--models", default=",".join(defaults.models), help=f"of {', '.join(zoo.ZOO)}")
    parser.add_argument("--formats", default=",".join(defaults.formats), help=f"of {', '.join(FORMATS)}")
    parser.add_argument("--precisions", default=",".join(defaults.precisions), help=f"of {', '.join(PRECISIONS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few minutes")
    parser.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the Transformers' .pte against eager at N=256 and N=2048")
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--runs", type=int, default=defaults.runs, help="timed calls per latency")
    parser.add_argument("--long-runs", type=int, default=defaults.long_runs, help="timed calls at N=2048")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--parity-batches", type=int, default=defaults.parity_batches)
    parser.add_argument("--rewrite", default=None,
                        help="convert_pt2's rewrite argument, where it has one; default: its own default")
    parser.add_argument("--calibration-samples", type=int, default=defaults.calibration_samples,
                        help="random samples in each model's --calibration file; convert holds back the last 20%%")
    parser.add_argument("--sharpen-steps", type=int, default=defaults.sharpen_steps,
                        help="Adam steps toward each model's own top-1 before converting, so its logits have a "
                             "trained model's margins; 0 converts the random-init weights")
    parser.add_argument("--work", default=defaults.work, help="the .pt2 files, bundles and the toolchains' log")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    try:
        cfg = MatrixConfig(models=_names(args.models), formats=_names(args.formats),
                           precisions=_names(args.precisions), quick=args.quick, scaling=args.scaling,
                           threads=args.threads, runs=args.runs, long_runs=args.long_runs, warmup=args.warmup,
                           parity_batches=args.parity_batches, rewrite=args.rewrite,
                           calibration_samples=args.calibration_samples, sharpen_steps=args.sharpen_steps,
                           work=args.work)
    except ValueError as err:
        parser.error(str(err))
    print(write_results(run_matrix(cfg), args.out))


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


if __name__ == "__main__":
    main()
