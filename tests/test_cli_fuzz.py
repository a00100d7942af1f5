"""The command line under hostile and mistaken input: one line, exit 2, nothing written, nothing run.

Every case calls ``difftx_edge.cli.main`` in this process (a spawned Python
costs seconds of imports per case) and asserts the house rule for bad input:

- exit code 2, and stderr is exactly one line, never a traceback;
- no file or folder appears, disappears or changes in the case's folder or in
  the shared fixtures (a snapshot before and after);
- nothing a hostile file asks for happens (its marker file never appears).

The fixtures (a one-epoch run, a small ``.pt2``, an ONNX bundle) are made once
per module; every case fails before any real work.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from difftx_edge.cli import main

TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2}
MARKER = "PWNED"  # the file a hostile payload tries to create in the case folder


# -----------------------------------------------------------------------------
# Fixtures, made once


@dataclass
class World:
    """The shared, read-only inputs: never changed by a case (the snapshot checks it)."""

    root: Path
    run: Path  # a digits run trained for one epoch
    pt2: Path  # torch.export.save of a small Linear model, input x of shape (2, 4)
    tokens_pt2: Path  # torch.export.save of a 5-token embedding model, input tokens of shape (2, 6)
    bundle: Path  # an ONNX fp32 bundle exported from ``run``


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class _Tokens(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.emb(tokens).mean(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from difftx_edge.convert import ExportConfig, export_run
    from difftx_edge.tasks import TaskConfig
    from difftx_edge.train import TrainConfig, train

    root = tmp_path_factory.mktemp("fuzz-world")
    run = root / "run"
    train(TrainConfig(out=str(run), epochs=1, threads=1), TaskConfig("digits"), TINY, progress=False)
    pt2 = root / "tiny.pt2"
    torch.export.save(torch.export.export(_Tiny().eval(), (torch.zeros(2, 4),)), pt2)
    tokens_pt2 = root / "tokens.pt2"
    torch.export.save(torch.export.export(_Tokens().eval(), (torch.zeros(2, 6, dtype=torch.long),)), tokens_pt2)
    export_run(ExportConfig(run=str(run), out=str(root / "bundles"), format="onnx", parity_batches=1,
                            accuracy=False, threads=1))
    return World(root, run, pt2, tokens_pt2, root / "bundles" / "onnx-fp32")


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    """Where the CLI writes the traceback log of an unexpected failure (the temporary folder, redirected)."""
    return tmp_path_factory.mktemp("fuzz-logs")


@pytest.fixture(autouse=True)
def _logs_elsewhere(log_dir, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(log_dir))


# -----------------------------------------------------------------------------
# How a case is built and checked


@dataclass
class Ctx:
    """A case's own folder, and helpers that make hostile inputs in it."""

    tmp: Path
    world: World

    def p(self, name: str) -> str:
        return str(self.tmp / name)

    def write(self, name: str, data: bytes | str) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)

    def file(self) -> str:
        """A plain file, for --out that is a file or sits under one."""
        return self.write("afile", "not a folder\n")

    def run(self, config: Callable[[dict], object] | None = None) -> str:
        """A copy of the trained run, its config.json changed by ``config(cfg)`` (which may return a new one)."""
        return self._copy(self.world.run, "run", "config.json", config)

    def bundle(self, manifest: Callable[[dict], object] | None = None) -> str:
        """A copy of the ONNX bundle, its manifest changed by ``manifest(m)`` (which may return a new one)."""
        return self._copy(self.world.bundle, "onnx-fp32", "manifest.json", manifest)

    def _copy(self, source: Path, name: str, json_name: str, change: Callable[[dict], object] | None) -> str:
        folder = self.tmp / name
        shutil.copytree(source, folder)
        if change is not None:
            data = json.loads((folder / json_name).read_text())
            changed = change(data)
            (folder / json_name).write_text(json.dumps(data if changed is None else changed))
        return str(folder)

    def npz(self, **arrays) -> str:
        path = self.tmp / "data.npz"
        np.savez(path, **arrays)
        return str(path)

    def marker(self) -> Path:
        return self.tmp / MARKER


@dataclass
class Case:
    """One hostile or mistaken command: ``argv(ctx)`` builds its inputs in ``ctx.tmp`` and returns the arguments."""

    id: str
    argv: Callable[[Ctx], list[str]]
    needles: tuple[str, ...] = ()  # words the error line must hold
    marks: list = field(default_factory=list)


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots`` with its kind, size and modification time (links are not followed)."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                st = path.lstat()
                seen[str(path)] = (st.st_mode, st.st_size if not path.is_dir() else 0, st.st_mtime_ns)
    return seen


def call(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        return exit_.code


def check(case: Case, ctx: Ctx, capfd) -> None:
    argv = case.argv(ctx)
    before = snapshot(ctx.tmp, ctx.world.root)
    capfd.readouterr()
    code = call(argv)
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code}: {err}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
    for needle in case.needles:
        assert needle in lines[0], lines[0]
    assert not ctx.marker().exists(), "a hostile file ran code"
    after = snapshot(ctx.tmp, ctx.world.root)
    assert set(after) - set(before) == set(), f"new files: {sorted(set(after) - set(before))}"
    assert set(before) - set(after) == set(), f"removed files: {sorted(set(before) - set(after))}"
    changed = [path for path in before if before[path] != after[path] and not Path(path).is_dir()]
    assert not changed, f"changed files: {changed}"


# -----------------------------------------------------------------------------
# Hostile files


def pickle_payload(marker: Path) -> bytes:
    """A torch.save file whose unpickling (without weights_only) creates ``marker``."""

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    buffer = io.BytesIO()
    torch.save({"args": Payload()}, buffer)
    return buffer.getvalue()


def pt2_with(world: World, replace: dict[str, bytes], add: dict[str, bytes] | None = None) -> bytes:
    """The tiny .pt2 with some members replaced (by their name's suffix) and some added."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(world.pt2) as src, zipfile.ZipFile(buffer, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            dst.writestr(info.filename, data)
        for name, data in (add or {}).items():
            dst.writestr(name, data)
    return buffer.getvalue()


def hostile_pt2(ctx: Ctx) -> str:
    return ctx.write("evil.pt2", pt2_with(ctx.world, {"sample_inputs/model.pt": pickle_payload(ctx.marker())}))


def hostile_weights_pt2(ctx: Ctx) -> str:
    return ctx.write("evil.pt2", pt2_with(ctx.world, {"weights/weight_0": pickle_payload(ctx.marker())}))


def hostile_npz(ctx: Ctx) -> str:
    """An .npz whose object array, if unpickled, creates the marker."""
    class Payload:
        def __reduce__(self):
            return open, (str(ctx.marker()), "w")

    return ctx.npz(x=np.array([Payload()], dtype=object))


def C(ctx: Ctx, *args: str, model: str = "pt2") -> list[str]:
    """``convert`` of a shared .pt2 (``pt2``: floats x (2, 4); ``tokens_pt2``: 5 token ids (2, 6))."""
    return ["convert", str(getattr(ctx.world, model)), "--out", ctx.p("b"), "--format", "onnx", *args]


def quantized_dir(ctx: Ctx, program: bytes) -> str:
    """A quantize output folder whose config and report name ``program``'s hash (so only its load can refuse it)."""
    import hashlib

    out = ctx.tmp / "q" / "xnnpack"
    out.mkdir(parents=True)
    (out / "quantized.pt2").write_bytes(program)
    digest = hashlib.sha256(program).hexdigest()
    run_cfg = json.loads((ctx.world.run / "config.json").read_text())
    (out / "quant_config.json").write_text(json.dumps({
        "program_sha256": digest, "input": {"shape": ["batch", 16, 4], "dtype": "float32"},
        "model": run_cfg["model"], "task": run_cfg["task"]}))
    (out / "quant_report.json").write_text(json.dumps({"program_sha256": digest}))
    return str(ctx.tmp / "q")


def config_without(key: str) -> Callable[[dict], None]:
    return lambda cfg: cfg.pop(key)


def manifest_set(key: str, value) -> Callable[[dict], None]:
    return lambda m: m.__setitem__(key, value)


def in_dir_mode(ctx: Ctx, mode: int) -> str:
    locked = ctx.tmp / "locked"
    locked.mkdir()
    locked.chmod(mode)
    return str(locked / "out")


def text_folder(ctx: Ctx, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        ctx.write(f"corpus/{name}", data)
    (ctx.tmp / "corpus").mkdir(exist_ok=True)
    return ctx.p("corpus")


ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
as_root = pytest.mark.skipif(ROOT, reason="root writes into a read-only folder; /sys cases cover unwritable --out")


# -----------------------------------------------------------------------------
# The cases, verb by verb. A case whose fix is another engineer's says so in a comment.

def T(ctx: Ctx, *args: str) -> list[str]:
    """``train`` with a small model and --out in the case folder (unless args give one)."""
    out = [] if "--out" in args else ["--out", ctx.p("o")]
    return ["train", "--epochs", "1", "--threads", "1", *TINY_FLAGS, *out, *args]


TINY_FLAGS = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2"]

CASES = [
    # --- no verb, unknown verb, formats
    Case("no-verb", lambda c: []),
    Case("unknown-verb", lambda c: ["fly"], ("invalid choice",)),
    Case("formats-extra-argument", lambda c: ["formats", "onnx"]),
    Case("formats-unknown-flag", lambda c: ["formats", "--all"]),
    Case("global-unknown-flag", lambda c: ["--threads", "2", "formats"]),

    # --- train: flags
    Case("train-lr-nan", lambda c: T(c, "--lr", "nan"), ("--lr", "finite")),
    Case("train-lr-inf", lambda c: T(c, "--lr", "inf"), ("--lr", "finite")),
    Case("train-lr-negative", lambda c: T(c, "--lr", "-1"), ("lr must be positive",)),
    Case("train-lr-word", lambda c: T(c, "--lr", "fast"), ("--lr",)),
    Case("train-weight-decay-nan", lambda c: T(c, "--weight-decay", "nan"), ("finite",)),
    Case("train-grad-clip-zero", lambda c: T(c, "--grad-clip", "0"), ("grad_clip",)),
    Case("train-label-smoothing-nan", lambda c: T(c, "--label-smoothing", "NaN"), ("finite",)),
    Case("train-warmup-above-one", lambda c: T(c, "--warmup", "1.5"), ("warmup",)),
    Case("train-ema-minus-inf", lambda c: T(c, "--ema=-inf"), ("finite",)),
    Case("train-threads-999", lambda c: T(c, "--threads", "999"), ("--threads 999", "cores")),
    Case("train-threads-zero", lambda c: T(c, "--threads", "0"), ("at least 1",)),
    Case("train-threads-negative", lambda c: T(c, "--threads", "-3"), ("at least 1",)),
    Case("train-epochs-zero", lambda c: T(c, "--epochs", "0"), ("epochs must be at least 1",)),
    Case("train-epochs-negative", lambda c: T(c, "--epochs", "-5"), ("epochs",)),
    Case("train-epochs-float", lambda c: T(c, "--epochs", "1e3"), ("invalid int value",)),
    Case("train-batch-size-zero", lambda c: T(c, "--batch-size", "0"), ("batch_size",)),
    Case("train-unknown-attention", lambda c: T(c, "--attention", "flash"), ("unknown attention kind 'flash'",)),
    Case("train-attention-list-wrong-length", lambda c: T(c, "--attention", "local,linear,softmax"),
         ("3 kinds for 1 layers",)),
    Case("train-heads-do-not-divide", lambda c: T(c, "--d-model", "30", "--n-heads", "4"), ("divisible",)),
    Case("train-window-too-large", lambda c: T(c, "--window", "64"), ("window (64)",)),
    Case("train-unknown-device", lambda c: T(c, "--device", "tpu"), ("unknown device 'tpu'",)),
    Case("train-unknown-task", lambda c: T(c, "--task", "imagenet"), ("invalid choice",)),
    Case("train-unknown-position", lambda c: T(c, "--position", "rotary"), ("position",)),
    Case("train-dropout-nan", lambda c: T(c, "--dropout", "nan"), ("finite",)),
    Case("train-eps-zero", lambda c: T(c, "--eps", "0"), ("eps",)),
    Case("train-seed-negative", lambda c: T(c, "--seed", "-1"), ("seed",)),
    Case("train-n-train-zero", lambda c: T(c, "--task", "listops", "--n-train", "0"), ("n_train",)),
    Case("train-digits-seq-len", lambda c: T(c, "--seq-len", "32"), ("fixed seq_len",)),
    Case("train-listops-with-data", lambda c: T(c, "--task", "listops", "--data", c.file()), ("data",)),
    # Causal: its (N, N+1) mask is what grows as N^2 (non-causal softmax is fused SDPA, linear in memory, only slow).
    # 262144 tokens need about 400 GB of masks, beyond any machine this suite runs on; 65536 (26 GB) is beyond 24.
    Case("train-seq-len-262144-causal-softmax", lambda c: T(c, "--task", "listops", "--seq-len", "262144",
                                                            "--attention", "softmax", "--causal", "--n-train", "2",
                                                            "--n-val", "2", "--n-test", "2", "--position",
                                                            "sinusoidal"),
         ("needs about", "available", "--seq-len")),
    Case("train-model-far-larger-than-memory", lambda c: ["train", "--out", c.p("o"), "--threads", "1",
                                                          "--d-model", "131072", "--n-heads", "2", "--n-layers", "2"],
         ("needs about", "--d-model")),
    Case("train-batch-far-larger-than-memory", lambda c: T(c, "--batch-size", "1000000000", "--attention", "softmax"),
         ("needs about", "--batch-size")),

    # --- train: --out and run directories
    Case("train-out-is-a-file", lambda c: T(c, "--out", c.file()), ("is a file",)),
    Case("train-out-under-a-file", lambda c: T(c, "--out", c.file() + "/run"), ("is a file",)),
    Case("train-out-deep-under-a-file", lambda c: T(c, "--out", c.file() + "/a/b/c"), ("is a file",)),
    Case("train-out-read-only-filesystem", lambda c: T(c, "--out", "/sys/difftx-edge-fuzz/run"),
         ("cannot be created",)),
    Case("train-out-in-read-only-folder", lambda c: T(c, "--out", in_dir_mode(c, 0o500)), ("cannot be created",),
         marks=[as_root]),
    Case("train-out-broken-symlink", lambda c: (os.symlink(c.p("nowhere"), c.p("link")), T(c, "--out", c.p("link")))[1],
         ("broken symbolic link",)),
    Case("train-existing-run-without-resume", lambda c: T(c, "--out", c.run()), ("--resume", "--force")),
    Case("train-resume-nothing", lambda c: T(c, "--resume", "--out", str(c.tmp)), ("nothing to resume",)),
    Case("train-resume-corrupt-state", lambda c: (c.run(), c.write("run/state.pt", b"corrupt"),
                                                  T(c, "--resume", "--out", c.p("run")))[2], ("state.pt is corrupt",)),
    Case("train-resume-truncated-state", lambda c: (c.run(), c.write("run/state.pt", (c.world.run / "state.pt")
                                                                     .read_bytes()[:500]),
                                                    T(c, "--resume", "--out", c.p("run")))[2], ("state.pt",)),
    Case("train-resume-config-not-json", lambda c: (c.run(), c.write("run/config.json", "{not json"),
                                                    T(c, "--resume", "--out", c.p("run")))[2], ("config.json",)),
    Case("train-resume-config-without-train", lambda c: (c.run(config_without("train")),
                                                         T(c, "--resume", "--out", c.p("run")))[1], ("config.json",)),
    Case("train-resume-state-is-pickle", lambda c: (c.run(), c.write("run/state.pt", pickle_payload(c.marker())),
                                                    T(c, "--resume", "--out", c.p("run")))[2], ("state.pt",)),

    # --- train: user data (npz, text)
    Case("npz-missing", lambda c: T(c, "--task", "npz", "--data", c.p("none.npz")), ("does not exist",)),
    Case("npz-is-a-folder", lambda c: T(c, "--task", "npz", "--data", str(c.tmp))),
    Case("npz-garbage", lambda c: T(c, "--task", "npz", "--data", c.write("data.npz", b"\x00garbage" * 64))),
    Case("npz-truncated", lambda c: T(c, "--task", "npz", "--data", c.write("t.npz", Path(c.npz(
        labels=np.arange(40) % 2, tokens=np.ones((40, 8), np.int64))).read_bytes()[:300]))),
    Case("npz-object-arrays", lambda c: T(c, "--task", "npz", "--data", c.npz(
        labels=np.array([0, 1] * 20, dtype=object), tokens=np.array([[1] * 8] * 40, dtype=object)))),
    Case("npz-huge-labels", lambda c: T(c, "--task", "npz", "--data", c.npz(
        labels=np.array([0, 2**40] * 20), tokens=np.ones((40, 8), np.int64)))),
    Case("npz-int64-max-label", lambda c: T(c, "--task", "npz", "--data", c.npz(
        labels=np.array([0, np.iinfo(np.int64).max] * 20), tokens=np.ones((40, 8), np.int64)))),
    Case("npz-huge-token-ids", lambda c: T(c, "--task", "npz", "--data", c.npz(
        labels=np.array([0, 1] * 20), tokens=np.full((40, 8), 2**40, np.int64)))),
    Case("npz-negative-labels", lambda c: T(c, "--task", "npz", "--data", c.npz(
        labels=np.array([0, -1] * 20), tokens=np.ones((40, 8), np.int64))), ("negative",)),
    Case("npz-float-labels", lambda c: T(c, "--task", "npz", "--data", c.npz(
        labels=np.array([0.5, 1.5] * 20), tokens=np.ones((40, 8), np.int64)))),
    Case("npz-no-labels", lambda c: T(c, "--task", "npz", "--data", c.npz(tokens=np.ones((40, 8), np.int64)))),
    Case("npz-no-inputs", lambda c: T(c, "--task", "npz", "--data", c.npz(labels=np.arange(40) % 2)),
         ("tokens", "features")),
    Case("npz-nan-features", lambda c: T(c, "--task", "npz", "--data", c.npz(
        labels=np.arange(40) % 2, features=np.full((40, 8, 3), np.nan, np.float32)))),
    Case("npz-length-mismatch", lambda c: T(c, "--task", "npz", "--data", c.npz(
        labels=np.arange(10) % 2, tokens=np.ones((40, 8), np.int64)))),
    Case("text-missing", lambda c: T(c, "--task", "text", "--data", c.p("none.txt")), ("does not exist",)),
    Case("text-binary-file", lambda c: T(c, "--task", "text", "--data", c.write("b.bin", bytes(range(256)) * 8)),
         ("not a UTF-8 text file",)),
    Case("text-folder-of-binaries", lambda c: T(c, "--task", "text", "--data", text_folder(c, {
        "a.bin": b"\x00\x01" * 500, "b.bin": b"\xff\xfe\x00" * 300})), ("2 file(s)", "skipped")),
    Case("text-empty-folder", lambda c: T(c, "--task", "text", "--data", text_folder(c, {})), ("no files",)),
    Case("text-too-short-with-skipped", lambda c: T(c, "--task", "text", "--data", text_folder(c, {
        "a.txt": b"hello", "b.bin": b"\x00" * 900})), ("1 binary or non-UTF-8 skipped", "too few")),
    Case("text-fifo", lambda c: (os.mkfifo(c.p("fifo")), T(c, "--task", "text", "--data", c.p("fifo")))[1],
         ("neither a file nor a folder",)),

    # --- evaluate
    Case("evaluate-missing-run", lambda c: ["evaluate", "--run", c.p("none")]),
    Case("evaluate-run-is-a-file", lambda c: ["evaluate", "--run", c.file()]),
    Case("evaluate-folder-without-config", lambda c: ["evaluate", "--run", str(c.tmp)], ("config.json",)),
    Case("evaluate-config-not-json", lambda c: (c.run(), c.write("run/config.json", "{"),
                                                ["evaluate", "--run", c.p("run")])[2], ("corrupt",)),
    Case("evaluate-config-binary", lambda c: (c.run(), c.write("run/config.json", b"\xff\xfe\x00\x01"),
                                              ["evaluate", "--run", c.p("run")])[2]),
    Case("evaluate-config-is-a-list", lambda c: ["evaluate", "--run", c.run(lambda cfg: [cfg])]),
    Case("evaluate-config-missing-task", lambda c: ["evaluate", "--run", c.run(config_without("task"))]),
    Case("evaluate-config-missing-model", lambda c: ["evaluate", "--run", c.run(config_without("model"))]),
    Case("evaluate-config-model-not-a-mapping", lambda c: ["evaluate", "--run", c.run(
        lambda cfg: cfg.__setitem__("model", [1, 2, 3]))]),
    Case("evaluate-config-task-not-a-mapping", lambda c: ["evaluate", "--run", c.run(
        lambda cfg: cfg.__setitem__("task", "digits"))]),
    Case("evaluate-config-wrong-type", lambda c: ["evaluate", "--run", c.run(
        lambda cfg: cfg["model"].__setitem__("d_model", "sixteen"))]),
    Case("evaluate-config-bool-for-int", lambda c: ["evaluate", "--run", c.run(
        lambda cfg: cfg["model"].__setitem__("n_layers", True))]),
    Case("evaluate-config-unknown-model-key", lambda c: ["evaluate", "--run", c.run(
        lambda cfg: cfg["model"].__setitem__("flash", True))]),
    Case("evaluate-config-unknown-task-key", lambda c: ["evaluate", "--run", c.run(
        lambda cfg: cfg["task"].__setitem__("shards", 4))]),
    Case("evaluate-config-future-schema", lambda c: ["evaluate", "--run", c.run(
        lambda cfg: cfg.__setitem__("schema", 999))], ("newer",)),
    Case("evaluate-config-huge-model", lambda c: ["evaluate", "--run", c.run(
        lambda cfg: cfg["model"].update(d_model=1 << 20, d_ff=1 << 20))]),
    Case("evaluate-checkpoint-missing", lambda c: (c.run(), os.remove(c.p("run/model.safetensors")),
                                                   ["evaluate", "--run", c.p("run")])[2], ("no checkpoint",)),
    Case("evaluate-checkpoint-garbage", lambda c: (c.run(), c.write("run/model.safetensors", b"\x00garbage" * 10),
                                                   ["evaluate", "--run", c.p("run")])[2], ("corrupt",)),
    Case("evaluate-checkpoint-truncated", lambda c: (c.run(), c.write("run/model.safetensors", (
        c.world.run / "model.safetensors").read_bytes()[:200]), ["evaluate", "--run", c.p("run")])[2]),
    Case("evaluate-checkpoint-is-pickle", lambda c: (c.run(), c.write("run/model.safetensors",
                                                                      pickle_payload(c.marker())),
                                                     ["evaluate", "--run", c.p("run")])[2]),
    Case("evaluate-config-symlink-loop", lambda c: (c.run(), os.remove(c.p("run/config.json")),
                                                    os.symlink("config.json", c.p("run/config.json")),
                                                    ["evaluate", "--run", c.p("run")])[3]),
    Case("evaluate-unknown-split", lambda c: ["evaluate", "--run", str(c.world.run), "--split", "dev"],
         ("invalid choice",)),
    Case("evaluate-threads-999", lambda c: ["evaluate", "--run", str(c.world.run), "--threads", "999"], ("cores",)),
    Case("evaluate-threads-zero", lambda c: ["evaluate", "--run", str(c.world.run), "--threads", "0"],
         ("at least 1",)),

    # --- quantize
    Case("quantize-missing-run", lambda c: ["quantize", "--run", c.p("none"), "--out", c.p("q")]),
    Case("quantize-unknown-backend", lambda c: ["quantize", "--run", str(c.world.run), "--backend", "tensorrt"],
         ("invalid choice",)),
    Case("quantize-unknown-method", lambda c: ["quantize", "--run", str(c.world.run), "--method", "gptq"],
         ("invalid choice",)),
    Case("quantize-lr-nan", lambda c: ["quantize", "--run", str(c.world.run), "--lr", "nan"], ("finite",)),
    Case("quantize-observer-freeze-above-one", lambda c: ["quantize", "--run", str(c.world.run),
                                                          "--observer-freeze", "1.5"], ("observer_freeze",)),
    Case("quantize-batch-size-one", lambda c: ["quantize", "--run", str(c.world.run), "--batch-size", "1"],
         ("batch_size",)),
    Case("quantize-epochs-zero", lambda c: ["quantize", "--run", str(c.world.run), "--epochs", "0"]),
    Case("quantize-calib-batches-zero", lambda c: ["quantize", "--run", str(c.world.run), "--calib-batches", "0"]),
    Case("quantize-threads-999", lambda c: ["quantize", "--run", str(c.world.run), "--threads", "999"], ("cores",)),
    Case("quantize-out-is-a-file", lambda c: ["quantize", "--run", str(c.world.run), "--out", c.file()],
         ("is a file",)),
    Case("quantize-out-under-a-file", lambda c: ["quantize", "--run", str(c.world.run), "--out", c.file() + "/q"],
         ("is a file",)),
    Case("quantize-out-read-only-filesystem", lambda c: ["quantize", "--run", str(c.world.run), "--out",
                                                         "/sys/difftx-edge-fuzz"], ("cannot be created",)),
    Case("quantize-corrupt-config", lambda c: (c.run(), c.write("run/config.json", "[]"),
                                               ["quantize", "--run", c.p("run"), "--out", c.p("q")])[2]),
    Case("quantize-out-holds-another-run", lambda c: (
        c.write("q/quant_config.json", json.dumps({"source": {"sha256": "0" * 64}, "quant": {"out": "x"}})),
        ["quantize", "--run", str(c.world.run), "--out", c.p("q")])[1], ("--force",)),

    # --- export
    Case("export-unknown-format", lambda c: ["export", "--run", str(c.world.run), "--out", c.p("b"), "--format",
                                             "tensorrt"], ("unknown format 'tensorrt'", "difftx-edge formats")),
    Case("export-empty-format", lambda c: ["export", "--run", str(c.world.run), "--out", c.p("b"), "--format", ","],
         ("no format",)),
    Case("export-unknown-precision", lambda c: ["export", "--run", str(c.world.run), "--out", c.p("b"),
                                                "--precision", "int4"], ("invalid choice",)),
    Case("export-batch-zero", lambda c: ["export", "--run", str(c.world.run), "--out", c.p("b"), "--batch", "0"]),
    Case("export-seq-len-zero", lambda c: ["export", "--run", str(c.world.run), "--out", c.p("b"), "--seq-len",
                                           "0"]),
    Case("export-seq-len-beyond-table", lambda c: ["export", "--run", str(c.world.run), "--out", c.p("b"),
                                                   "--format", "onnx", "--seq-len", "4096"], ("--seq-len",)),
    Case("export-parity-batches-zero", lambda c: ["export", "--run", str(c.world.run), "--out", c.p("b"),
                                                  "--parity-batches", "0"]),
    Case("export-threads-999", lambda c: ["export", "--run", str(c.world.run), "--out", c.p("b"), "--threads",
                                          "999"], ("cores",)),
    Case("export-missing-run", lambda c: ["export", "--run", c.p("none"), "--out", c.p("b"), "--format", "onnx"]),
    Case("export-corrupt-config", lambda c: ["export", "--run", c.run(lambda cfg: cfg.__setitem__("model", None)),
                                             "--out", c.p("b"), "--format", "onnx"]),
    Case("export-out-is-a-file", lambda c: ["export", "--run", str(c.world.run), "--out", c.file(), "--format",
                                            "onnx"], ("is a file",)),
    Case("export-out-under-a-file", lambda c: ["export", "--run", str(c.world.run), "--out", c.file() + "/b",
                                               "--format", "onnx"], ("is a file",)),
    Case("export-int8-without-program", lambda c: ["export", "--run", str(c.world.run), "--out", c.p("b"),
                                                   "--format", "onnx", "--precision", "int8"], ("quantize",)),
    Case("export-int8-program-garbage", lambda c: ["export", "--run", str(c.world.run), "--out", c.p("b"),
                                                   "--format", "executorch", "--precision", "int8", "--quantized",
                                                   quantized_dir(c, b"\x00garbage" * 100)]),
    # Safe .pt2 loading (difftx_edge/untrusted.py): the pickle inside must never run.
    Case("export-int8-program-with-pickle", lambda c: ["export", "--run", str(c.world.run), "--out", c.p("b"),
                                                       "--format", "executorch", "--precision", "int8",
                                                       "--quantized", quantized_dir(c, Path(hostile_pt2(c))
                                                                                    .read_bytes())]),

    # --- convert
    Case("convert-missing-model", lambda c: ["convert", c.p("none.pt2"), "--out", c.p("b")], ("does not exist",)),
    # The wrong kind of path is not "does not exist" (convert/api.py, to be changed by the lead).
    Case("convert-model-is-a-folder", lambda c: ["convert", str(c.tmp), "--out", c.p("b")], ("folder",)),
    Case("convert-model-empty", lambda c: ["convert", c.write("e.pt2", b""), "--out", c.p("b")]),
    Case("convert-model-garbage", lambda c: ["convert", c.write("g.pt2", os.urandom(4096)), "--out", c.p("b")],
         ("torch.export",)),
    Case("convert-model-truncated", lambda c: ["convert", c.write("t.pt2", c.world.pt2.read_bytes()[:1000]),
                                               "--out", c.p("b")]),
    Case("convert-model-zip-not-pt2", lambda c: ["convert", c.write("z.pt2", _zip({"hello.txt": b"hi"})), "--out",
                                                 c.p("b")]),
    Case("convert-model-missing-member", lambda c: ["convert", c.write("m.pt2", pt2_with(c.world, {
        "models/model.json": b"{}"})), "--out", c.p("b")]),
    Case("convert-model-json-garbage", lambda c: ["convert", c.write("m.pt2", pt2_with(c.world, {
        "models/model.json": b"\x00\xff not json"})), "--out", c.p("b")]),
    # Safe .pt2 loading (difftx_edge/untrusted.py): a pickle in the sample inputs or weights never runs.
    Case("convert-pickle-in-sample-inputs", lambda c: ["convert", hostile_pt2(c), "--out", c.p("b")]),
    Case("convert-pickle-in-weights", lambda c: ["convert", hostile_weights_pt2(c), "--out", c.p("b")]),
    Case("convert-model-broken-symlink", lambda c: (os.symlink(c.p("nowhere"), c.p("l.pt2")),
                                                    ["convert", c.p("l.pt2"), "--out", c.p("b")])[1]),
    Case("convert-unknown-format", lambda c: ["convert", str(c.world.pt2), "--out", c.p("b"), "--format", "tflite"],
         ("unknown format 'tflite'", "difftx-edge formats")),
    Case("convert-empty-format", lambda c: ["convert", str(c.world.pt2), "--out", c.p("b"), "--format", ""]),
    # --calibration: int8 calibration samples laid out like --inputs, refused before any quantizer runs.
    Case("convert-calibration-for-fp32", lambda c: C(c, "--calibration", c.npz(x=np.zeros((4, 2, 4), np.float32))),
         ("--calibration calibrates int8",)),
    Case("convert-calibration-pickle", lambda c: C(c, "--precision", "int8", "--calibration", hostile_npz(c)),
         ("plain arrays",)),
    Case("convert-calibration-nan", lambda c: C(c, "--precision", "int8", "--calibration",
                                                c.npz(x=np.full((4, 2, 4), np.nan))), ("NaN",)),
    Case("convert-threads-999", lambda c: ["convert", str(c.world.pt2), "--out", c.p("b"), "--threads", "999"],
         ("cores",)),
    Case("convert-out-is-a-file", lambda c: ["convert", str(c.world.pt2), "--out", c.file()], ("is a file",)),
    Case("convert-out-under-a-file", lambda c: ["convert", str(c.world.pt2), "--out", c.file() + "/x/y"],
         ("is a file",)),
    Case("convert-out-read-only-filesystem", lambda c: ["convert", str(c.world.pt2), "--out", "/sys/difftx-fuzz"],
         ("cannot be created",)),
    Case("convert-out-in-read-only-folder", lambda c: ["convert", str(c.world.pt2), "--out", in_dir_mode(c, 0o500)],
         ("cannot be created",), marks=[as_root]),
    Case("convert-missing-out", lambda c: ["convert", str(c.world.pt2)], ("--out",)),
    # --inputs: real parity inputs, one array per program input named after it, shape (samples, *input shape).
    Case("convert-inputs-missing", lambda c: C(c, "--inputs", c.p("none.npz")), ("inputs", "does not exist")),
    Case("convert-inputs-not-npz", lambda c: C(c, "--inputs", c.write("x.npz", "x = 1\n")), ("not an .npz",)),
    Case("convert-inputs-object-array", lambda c: C(c, "--inputs", c.npz(x=np.array([None, 1], dtype=object))),
         ("plain arrays",)),
    Case("convert-inputs-pickle", lambda c: C(c, "--inputs", hostile_npz(c)), ("plain arrays",)),
    Case("convert-inputs-unknown-name", lambda c: C(c, "--inputs", c.npz(x=np.zeros((1, 2, 4)), y=np.zeros(1))),
         ("'y' is not an input",)),
    Case("convert-inputs-input-not-given", lambda c: C(c, "--inputs", c.npz()), ("no array 'x'",)),
    Case("convert-inputs-ints-for-floats", lambda c: C(c, "--inputs", c.npz(x=np.zeros((1, 2, 4), np.int64))),
         ("give float values",)),
    Case("convert-inputs-floats-for-tokens", lambda c: C(c, "--inputs", c.npz(tokens=np.zeros((1, 2, 6))),
                                                         model="tokens_pt2"), ("give integer values",)),
    Case("convert-inputs-wrong-shape", lambda c: C(c, "--inputs", c.npz(x=np.zeros((2, 4)))), ("(S, 2, 4)",)),
    Case("convert-inputs-nan", lambda c: C(c, "--inputs", c.npz(x=np.full((1, 2, 4), np.nan))), ("NaN",)),
    Case("convert-inputs-inf", lambda c: C(c, "--inputs", c.npz(x=np.full((1, 2, 4), np.inf))), ("inf",)),
    Case("convert-inputs-id-past-vocabulary", lambda c: C(c, "--inputs", c.npz(tokens=np.full((1, 2, 6), 5)),
                                                          model="tokens_pt2"), ("embedding of 5 rows", "0..4")),

    # --- bench
    Case("bench-missing-path", lambda c: ["bench", c.p("none"), "--out", c.p("r"), "--no-plots"]),
    Case("bench-path-is-a-file", lambda c: ["bench", c.file(), "--out", c.p("r"), "--no-plots"]),
    # A folder with neither manifest.json nor config.json is not only "not a run directory" (runtimes/bench.py).
    Case("bench-empty-folder", lambda c: (c.tmp.joinpath("empty").mkdir(), ["bench", c.p("empty"), "--out",
                                                                            c.p("r"), "--no-plots"])[1],
         ("manifest.json",)),
    Case("bench-manifest-not-json", lambda c: (c.bundle(), c.write("onnx-fp32/manifest.json", "{"),
                                               ["bench", c.p("onnx-fp32"), "--out", c.p("r"), "--no-plots"])[2]),
    Case("bench-manifest-is-a-list", lambda c: ["bench", c.bundle(lambda m: [m]), "--out", c.p("r"),
                                                "--no-plots"]),
    # Manifest confinement and checks (runtimes/registry.py).
    Case("bench-manifest-inputs-empty", lambda c: ["bench", c.bundle(manifest_set("inputs", [])), "--out", c.p("r"),
                                                   "--no-plots"]),
    Case("bench-manifest-artifact-null", lambda c: ["bench", c.bundle(manifest_set("artifact", None)), "--out",
                                                    c.p("r"), "--no-plots"]),
    Case("bench-manifest-artifact-traversal", lambda c: ["bench", c.bundle(manifest_set("artifact", "../../x")),
                                                         "--out", c.p("r"), "--no-plots"]),
    Case("bench-manifest-artifact-absolute", lambda c: ["bench", c.bundle(manifest_set("artifact", "/etc/passwd")),
                                                        "--out", c.p("r"), "--no-plots"]),
    Case("bench-artifact-symlink-out", lambda c: (c.bundle(), os.remove(c.p("onnx-fp32/model.onnx")),
                                                  os.symlink(str(c.world.bundle / "model.onnx"),
                                                             c.p("onnx-fp32/model.onnx")),
                                                  ["bench", c.p("onnx-fp32"), "--out", c.p("r"), "--no-plots"])[3]),
    Case("bench-artifact-truncated", lambda c: (c.bundle(), c.write("onnx-fp32/model.onnx", (
        c.world.bundle / "model.onnx").read_bytes()[:100]), ["bench", c.p("onnx-fp32"), "--out", c.p("r"),
                                                              "--no-plots"])[2]),
    Case("bench-artifact-missing", lambda c: (c.bundle(), os.remove(c.p("onnx-fp32/model.onnx")),
                                              ["bench", c.p("onnx-fp32"), "--out", c.p("r"), "--no-plots"])[2]),
    Case("bench-manifest-unknown-format", lambda c: ["bench", c.bundle(manifest_set("format", "tensorrt")), "--out",
                                                     c.p("r"), "--no-plots"]),
    Case("bench-manifest-missing-format", lambda c: ["bench", c.bundle(lambda m: m.pop("format")), "--out",
                                                     c.p("r"), "--no-plots"]),
    Case("bench-runs-zero", lambda c: ["bench", str(c.world.bundle), "--out", c.p("r"), "--runs", "0"]),
    Case("bench-seconds-nan", lambda c: ["bench", str(c.world.bundle), "--out", c.p("r"), "--seconds", "nan"],
         ("finite",)),
    Case("bench-seconds-negative", lambda c: ["bench", str(c.world.bundle), "--out", c.p("r"), "--seconds", "-1"]),
    Case("bench-runs-and-seconds", lambda c: ["bench", str(c.world.bundle), "--out", c.p("r"), "--runs", "5",
                                              "--seconds", "1"], ("not both",)),
    Case("bench-timeout-inf", lambda c: ["bench", str(c.world.bundle), "--out", c.p("r"), "--timeout", "inf"],
         ("finite",)),
    Case("bench-warmup-negative", lambda c: ["bench", str(c.world.bundle), "--out", c.p("r"), "--warmup", "-1"]),
    Case("bench-threads-999", lambda c: ["bench", str(c.world.bundle), "--out", c.p("r"), "--threads", "999"],
         ("cores",)),
    Case("bench-unknown-target", lambda c: ["bench", str(c.world.bundle), "--out", c.p("r"), "--no-plots",
                                            "--target", "tpu://board"]),
    Case("bench-unknown-runner", lambda c: ["bench", str(c.world.bundle), "--out", c.p("r"), "--runner", "jit"],
         ("invalid choice",)),
    Case("bench-bad-seq-lens", lambda c: ["bench", str(c.world.bundle), "--out", c.p("r"), "--seq-lens", "a,b"],
         ("--seq-lens",)),
    Case("bench-out-is-a-file", lambda c: ["bench", str(c.world.bundle), "--out", c.file(), "--no-plots"],
         ("is a file",)),
    Case("bench-out-under-a-file", lambda c: ["bench", str(c.world.bundle), "--out", c.file() + "/r", "--no-plots"],
         ("is a file",)),
    Case("bench-no-bundles", lambda c: ["bench", "--out", c.p("r")]),

    # --- diff
    Case("diff-no-bundle", lambda c: ["diff"], ("required",)),
    Case("diff-not-a-bundle", lambda c: ["diff", c.p("none"), "--out", c.p("d")], ("is not a bundle",)),
    Case("diff-bundle-without-its-run", lambda c: ["diff", c.bundle(), "--out", c.p("d")], ("--source RUN",)),
    Case("diff-source-not-a-run", lambda c: ["diff", str(c.world.bundle), "--source", c.file(), "--out", c.p("d")],
         ("is not a run folder",)),
    Case("diff-manifest-unknown-format", lambda c: ["diff", c.bundle(manifest_set("format", "tensorrt")),
                                                    "--source", str(c.world.run), "--out", c.p("d")]),
    Case("diff-int8-program-outside-the-run", lambda c: [
        "diff", c.bundle(lambda m: m.update(precision="int8", quantized_from="../../elsewhere")), "--source",
        str(c.world.run), "--out", c.p("d")], ("leaves the folder",)),
    Case("diff-hostile-inputs", lambda c: ["diff", str(c.world.bundle), "--source", str(c.world.run), "--inputs",
                                           hostile_npz(c), "--out", c.p("d")]),
    Case("diff-inputs-of-another-shape", lambda c: ["diff", str(c.world.bundle), "--source", str(c.world.run),
                                                    "--inputs", c.npz(x=np.zeros((2, 3), np.float32)), "--out",
                                                    c.p("d")], ("shape",)),
    Case("diff-against-for-another-format", lambda c: [
        "diff", c.bundle(manifest_set("format", "litert")), "--source", str(c.world.run), "--against", "basic",
        "--out", c.p("d")]),
    Case("diff-tolerance-negative", lambda c: ["diff", str(c.world.bundle), "--tolerance", "-1", "--out",
                                               c.p("d")], ("--tolerance",)),

    # --- pipeline
    Case("pipeline-unknown-task", lambda c: ["pipeline", "--out", c.p("p"), "--task", "imagenet"],
         ("invalid choice",)),
    Case("pipeline-unknown-attention", lambda c: ["pipeline", "--out", c.p("p"), "--attention", "flash"],
         ("unknown attention kind",)),
    Case("pipeline-epochs-zero", lambda c: ["pipeline", "--out", c.p("p"), "--epochs", "0"], ("epochs",)),
    Case("pipeline-qat-epochs-zero", lambda c: ["pipeline", "--out", c.p("p"), "--qat-epochs", "0"]),
    Case("pipeline-unknown-format", lambda c: ["pipeline", "--out", c.p("p"), "--formats", "tensorrt"],
         ("unknown format 'tensorrt'", "difftx-edge formats")),
    Case("pipeline-unknown-precision", lambda c: ["pipeline", "--out", c.p("p"), "--precisions", "int4"],
         ("int4",)),
    Case("pipeline-unknown-target", lambda c: ["pipeline", "--out", c.p("p"), "--target", "tpu://x"], ("target",)),
    Case("pipeline-threads-999", lambda c: ["pipeline", "--out", c.p("p"), "--threads", "999"], ("cores",)),
    Case("pipeline-bench-threads-999", lambda c: ["pipeline", "--out", c.p("p"), "--bench-threads", "999"],
         ("cores",)),
    Case("pipeline-runs-zero", lambda c: ["pipeline", "--out", c.p("p"), "--runs", "0"]),
    Case("pipeline-d-model-indivisible", lambda c: ["pipeline", "--out", c.p("p"), "--d-model", "30"]),
    Case("pipeline-missing-data", lambda c: ["pipeline", "--out", c.p("p"), "--task", "npz", "--data",
                                             c.p("none.npz")], ("does not exist",)),
    Case("pipeline-unknown-force-stage", lambda c: ["pipeline", "--out", c.p("p"), "--force", "deploy"],
         ("unknown stage",)),
    Case("pipeline-out-is-a-file", lambda c: ["pipeline", "--out", c.file()], ("is a file",)),
    Case("pipeline-out-under-a-file", lambda c: ["pipeline", "--out", c.file() + "/p"], ("is a file",)),
    Case("pipeline-out-read-only-filesystem", lambda c: ["pipeline", "--out", "/sys/difftx-fuzz"],
         ("cannot be created",)),
]


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id, marks=case.marks) for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: Case, world: World, tmp_path: Path, capfd):
    ctx = Ctx(tmp_path / "case", world)
    ctx.tmp.mkdir()
    try:
        check(case, ctx, capfd)
    finally:  # a locked folder would stop pytest from cleaning up
        for locked in ctx.tmp.rglob("locked"):
            locked.chmod(0o700)


def test_the_suite_covers_every_verb():
    import argparse

    from difftx_edge.cli import build_parser

    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    covered = {case.id.split("-")[0] for case in CASES}
    assert set(subparsers.choices) <= covered, set(subparsers.choices) - covered
    assert len(CASES) >= 100 and len({case.id for case in CASES}) == len(CASES)


# -----------------------------------------------------------------------------
# The CLI boundary itself: anything unexpected is one line with a log; memory gets advice; Ctrl-C is 130.


@pytest.mark.parametrize("error, needles", [
    (RuntimeError("kernel exploded\nsecond line"), ("unexpected RuntimeError: kernel exploded", "traceback in")),
    (AssertionError("library invariant"), ("unexpected AssertionError: library invariant",)),
    (KeyError("weights"), ("unexpected KeyError",)),
    (MemoryError(), ("out of memory", "--batch-size")),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 4294967296 bytes"), ("out of memory", "--seq-len")),
], ids=["runtime-error", "assertion-error", "key-error", "memory-error", "cpu-allocator"])
def test_an_unexpected_failure_is_one_line_and_a_log(monkeypatch, capfd, log_dir, error, needles):
    import difftx_edge.cli as cli

    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_formats", fail)
    capfd.readouterr()
    assert call(["formats"]) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    log_path = Path(err.rsplit("traceback in ", 1)[1].split()[0])
    assert log_path.parent == log_dir
    text = log_path.read_text()
    assert "Traceback" in text and "difftx-edge formats" in text and type(error).__name__ in text


def test_interrupt_is_130_and_removes_the_empty_out_it_made(monkeypatch, capfd, tmp_path):
    import difftx_edge.cli as cli

    def interrupted(args):
        Path(args.out).mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_convert", interrupted)
    out = tmp_path / "a" / "b"
    assert call(["convert", "x.pt2", "--out", str(out)]) == 130
    assert "interrupted" in capfd.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# Nothing half-done: torn metrics, stale staging, permissions


def test_resume_drops_a_torn_last_metrics_line(world, tmp_path, capfd, caplog):
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    metrics = run / "metrics.jsonl"
    epochs = [line for line in metrics.read_text().splitlines() if '"epoch"' in line]
    metrics.write_text("\n".join(epochs) + '\n{"epoch": 2, "step": 3, "lr": 0.1, "train_lo')
    with caplog.at_level("WARNING", logger="difftx_edge.train"):
        assert call(["train", "--out", str(run), "--resume"]) == 0, capfd.readouterr().err
    assert any("torn last line" in record.getMessage() for record in caplog.records)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r.get("epoch") for r in lines[:-1]] == [1] and lines[-1]["split"] == "test"


def test_resume_refuses_a_corrupt_line_before_the_last(world, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    metrics = run / "metrics.jsonl"
    metrics.write_text('{"epoch": 1, "tor\n' + metrics.read_text())
    assert call(["train", "--out", str(run), "--resume"]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "line 1" in err and "--force" in err, err


def test_stale_staging_is_removed_and_bundles_have_umask_permissions(world, tmp_path, capfd):
    out = tmp_path / "b"
    stale = [out / ".onnx-fp32.k1ll3d", out / ".onnx-fp32.999999999.abc"]  # old-style, and a dead pid's
    for path in stale:
        (path).mkdir(parents=True)
        (path / "model.onnx").write_bytes(b"half")
    assert call(["convert", str(world.pt2), "--out", str(out), "--format", "onnx", "--threads", "1"]) == 0, \
        capfd.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["onnx-fp32"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "onnx-fp32").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_bundle_that_fails_leaves_no_staging_and_no_new_folder(tmp_path):
    from difftx_edge.convert.bundle import build_bundle
    from difftx_edge.convert.registry import FormatSpec

    def export(program, path, precision, options):
        path.write_bytes(b"half an artifact")
        raise RuntimeError("the toolchain gave up")

    # A format whose toolchain fails after writing part of its artifact, as a real one can.
    spec = FormatSpec("failing", "model.bin", ("fp32",), "xnnpack", "none", (), "runtime", export)
    with pytest.raises(RuntimeError, match="gave up"):
        build_bundle(spec, None, "fp32", out=tmp_path / "new" / "out", reference=None, parity_inputs=[],
                     output_step=None, meta={})
    assert list(tmp_path.iterdir()) == []


def test_output_check_leaves_no_probe(tmp_path):
    from difftx_edge.io import require_output_dir

    assert require_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert require_output_dir(tmp_path) == tmp_path
    assert list(tmp_path.iterdir()) == []


def test_memory_estimate_counts_the_model_and_grows_with_the_attention_kind():
    from difftx_edge.memory import estimate_training_memory
    from difftx_edge.model import DiffTransformer, ModelConfig

    def cfg(kind: str, n: int) -> ModelConfig:
        return ModelConfig(vocab_size=256, n_outputs=10, max_len=n, attention=kind, position="sinusoidal")

    small = estimate_training_memory(cfg("softmax", 64), batch_size=8, seq_len=64)
    assert small["count"] == DiffTransformer(cfg("softmax", 64)).num_parameters()
    ratio = {kind: estimate_training_memory(cfg(kind, 4096), 8, 4096)["activations"]
             / estimate_training_memory(cfg(kind, 2048), 8, 2048)["activations"] for kind in ("softmax", "linear")}
    # Eager softmax is fused SDPA, which never holds the N x N scores: linear in N, like linear attention.
    assert 1.9 < ratio["softmax"] <= 2.1 and 1.9 < ratio["linear"] <= 2.1, ratio
    # A causal mask is quadratic, and a softmax run at N=2000 (measured 1.9 GiB) is not refused.
    causal = [estimate_training_memory(ModelConfig(vocab_size=256, n_outputs=10, max_len=n, attention="softmax",
                                                   causal=True, position="sinusoidal"), 8, n)["activations"]
              for n in (2048, 4096)]
    assert causal[1] / causal[0] > ratio["softmax"]
    assert estimate_training_memory(cfg("softmax", 2000), 64, 2000)["total"] < 8 * 2 ** 30
