"""Tests for difftx_edge.tasks: the registry, config validation and every task."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from difftx_edge.tasks import TASKS, TaskConfig, TaskData, base, listops, load_task, register_task

# ---------------------------------------------------------------- registry, config


def test_registry_holds_every_task() -> None:
    assert set(TASKS) == {"digits", "listops", "text", "npz"}
    assert set(listops.SETTINGS) == set(base.LISTOPS_SETTINGS)


def test_register_task_returns_the_function() -> None:
    def loader(cfg: TaskConfig) -> TaskData:
        raise NotImplementedError

    try:
        assert register_task("_dummy")(loader) is loader
        assert TASKS["_dummy"] is loader
        with pytest.raises(ValueError):
            register_task("_dummy")(loader)
    finally:
        TASKS.pop("_dummy", None)


def _raises_one_line(match: str, make, *args, **kwargs) -> None:
    with pytest.raises(ValueError, match=match) as info:
        make(*args, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "mnist"}, "unknown task 'mnist'.*digits, listops, npz, text"),
        ({"listops_setting": "gpu"}, "unknown listops_setting 'gpu'.*cpu, lra"),
        ({"seq_len": 0}, "seq_len must be a positive integer"),
        ({"n_train": -5}, "n_train must be a positive integer"),
        ({"n_val": 1.5}, "n_val must be a positive integer"),
        ({"n_test": True}, "n_test must be a positive integer"),
        ({"seed": -1}, "seed must be an integer"),
        ({"name": "npz"}, "needs data=PATH"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    _raises_one_line(match, TaskConfig, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "digits", "seq_len": 8}, "fixed seq_len of 16"),
        ({"name": "digits", "n_train": 10}, "does not use n_train"),
        ({"name": "digits", "data": "x.npz"}, "does not use data"),
        ({"name": "listops", "data": "x.txt"}, "does not use data"),
        ({"name": "listops", "seq_len": 100}, "seq_len=100 is too short"),
    ],
)
def test_loaders_reject_options_they_cannot_honour(kwargs: dict, match: str) -> None:
    _raises_one_line(match, load_task, TaskConfig(**kwargs))


def _check_common(data: TaskData) -> None:
    """Invariants every task must satisfy."""
    meta = json.loads(json.dumps(data.to_dict()))
    assert meta["split_sizes"] == {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
    assert not any(isinstance(v, torch.Tensor) for v in meta.values())
    for split in (data.train, data.val, data.test):
        assert split.inputs.shape[1] == data.seq_len
        assert split.targets.dtype == torch.int64
        assert len(split.targets) == len(split.inputs)
        if data.vocab_size is not None:
            assert split.inputs.dtype == torch.int64
            assert 0 <= int(split.inputs.min()) and int(split.inputs.max()) < data.vocab_size
            assert data.input_dim is None and len(data.vocab) == data.vocab_size
        else:
            assert split.inputs.dtype == torch.float32 and split.inputs.shape[2] == data.input_dim
            assert data.vocab is None
        assert 0 <= int(split.targets.min()) and int(split.targets.max()) < data.n_outputs


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> TaskData:
    return load_task(TaskConfig(name="digits", seed=0))


def test_digits_shapes_and_split(digits: TaskData) -> None:
    _check_common(digits)
    assert (digits.objective, digits.metric, digits.seq_len, digits.input_dim) == ("classify", "accuracy", 16, 4)
    assert digits.n_outputs == 10 and digits.label_names == [str(d) for d in range(10)]
    sizes = [len(digits.train), len(digits.val), len(digits.test)]
    assert sum(sizes) == 1797
    assert sizes == pytest.approx([0.7 * 1797, 0.1 * 1797, 0.2 * 1797], abs=2)
    for split in (digits.train, digits.val, digits.test):
        assert split.inputs.shape[1:] == (16, 4)
        assert float(split.inputs.min()) >= 0.0 and float(split.inputs.max()) <= 1.0
        assert set(split.targets.tolist()) == set(range(10))  # stratified: every class everywhere


def test_digits_split_depends_only_on_seed(digits: TaskData) -> None:
    again = load_task(TaskConfig(name="digits", seed=0))
    assert torch.equal(again.train.inputs, digits.train.inputs)
    assert torch.equal(again.test.targets, digits.test.targets)
    other = load_task(TaskConfig(name="digits", seed=1))
    assert not torch.equal(other.train.inputs, digits.train.inputs)


def test_digits_shifts_move_whole_images_by_one_pixel_at_most_and_are_seeded(digits: TaskData) -> None:
    from difftx_edge.tasks.digits import patch_images

    x = digits.train.inputs[:200]
    before = x.clone()
    shifted = digits.augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(x, before), "the caller's batch is not changed"
    assert torch.equal(shifted, digits.augment(x, torch.Generator().manual_seed(0)))
    images, moved = patch_images(x), patch_images(shifted)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    for image, out in zip(padded, moved):  # each output is the image moved by (dy, dx) in {-1, 0, 1}^2, all ink kept
        assert any(torch.equal(image[y:y + 8, x0:x0 + 8], out) for y in range(3) for x0 in range(3))
    assert torch.allclose(moved.sum((1, 2)), images.sum((1, 2)))
    assert 0 < (moved != images).flatten(1).any(1).float().mean() < 1


def test_digits_patches_match_the_raw_image(digits: TaskData) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    patches = digits.train.inputs[0].numpy()
    image = np.zeros((8, 8), dtype=np.float32)
    for i in range(4):  # patch row
        for j in range(4):  # patch column
            for di in range(2):
                for dj in range(2):
                    image[2 * i + di, 2 * j + dj] = patches[4 * i + j, 2 * di + dj]
    matches = np.flatnonzero((np.abs(raw.images / 16.0 - image) < 1e-6).all(axis=(1, 2)))
    assert len(matches) > 0
    assert int(digits.train.targets[0]) in raw.target[matches]


def test_digits_preprocessing_as_the_app_guide_codes_it_gives_the_task_inputs(digits: TaskData) -> None:
    """docs/deploy.md's Kotlin loop, line for line, on every image: the manifest's words are the truth."""
    from sklearn.datasets import load_digits

    from difftx_edge.tasks.digits import PREPROCESSING, image_patches

    pixels = load_digits().images.reshape(-1, 64).astype(int)  # 0..16, row-major 8x8
    app = np.zeros((len(pixels), 16 * 4), dtype=np.float32)
    for i in range(4):
        for j in range(4):
            patch = 4 * i + j
            for r in range(2):
                for c in range(2):
                    app[:, patch * 4 + 2 * r + c] = pixels[:, (2 * i + r) * 8 + (2 * j + c)] / 16.0
    task_inputs = image_patches(load_digits().images).astype(np.float32) / 16.0
    np.testing.assert_array_equal(app.reshape(-1, 16, 4), task_inputs)
    assert digits.preprocessing == PREPROCESSING and digits.to_dict()["preprocessing"] == PREPROCESSING
    for words in ("divided by 16.0", "patch 4*i+j holds pixels [2i, 2j], [2i, 2j+1], [2i+1, 2j], [2i+1, 2j+1]",
                  "[batch, 16, 4] float32"):
        assert words in PREPROCESSING


SMALL = {"n_train": 20, "n_val": 10, "n_test": 10}  # the sizes do not change the words, only the load time


@pytest.mark.parametrize("name", sorted(set(TASKS) - {"npz"}))  # npz needs a user file
def test_every_builtin_task_says_how_its_inputs_are_made(name: str) -> None:
    options = {} if name == "digits" else SMALL
    assert "input [batch, " in load_task(TaskConfig(name, **options)).preprocessing


# ---------------------------------------------------------------- listops

_OPS = {
    "[MIN": min,
    "[MAX": max,
    "[MED": lambda args: int(statistics.median(args)),
    "[SM": lambda args: sum(args) % 10,
}


def _evaluate(words: list[str]) -> tuple[int, int]:
    """Independent evaluator: returns (value, operator nesting depth) and checks the grammar."""
    stack: list[tuple[str, list[int]]] = []
    depth = 0
    for word in words:
        if word in _OPS:
            stack.append((word, []))
            depth = max(depth, len(stack))
        elif word == "]":
            op, args = stack.pop()
            assert 2 <= len(args) <= 10
            value = _OPS[op](args)
            if not stack:
                return value, depth
            stack[-1][1].append(value)
        else:
            stack[-1][1].append(int(word))
    raise AssertionError("expression never closed")


def _check_listops(data: TaskData, min_len: int, max_len: int) -> None:
    _check_common(data)
    assert data.vocab == ["<pad>", *"0123456789", "[MIN", "[MAX", "[MED", "[SM", "]"]
    for split in (data.train, data.val, data.test):
        for row, label in zip(split.inputs.tolist(), split.targets.tolist()):
            length = sum(1 for t in row if t != 0)
            assert min_len < length < max_len
            assert all(t == 0 for t in row[length:])  # right-padded, no PAD inside
            value, depth = _evaluate([data.vocab[t] for t in row[:length]])
            assert value == label
            assert depth <= 9  # LRA: operators only at depth < 10


def test_listops_cpu_labels_lengths_and_determinism() -> None:
    cfg = TaskConfig(name="listops", n_train=300, n_val=50, n_test=50)
    data = load_task(cfg)
    assert data.seq_len == 128 and data.vocab_size == 16 and data.n_outputs == 10
    assert [len(data.train), len(data.val), len(data.test)] == [300, 50, 50]
    _check_listops(data, 32, 128)
    assert len(set(data.train.targets.tolist())) == 10

    assert torch.equal(load_task(cfg).train.inputs, data.train.inputs)
    assert not torch.equal(load_task(TaskConfig(name="listops", seed=1, n_train=300)).train.inputs, data.train.inputs)
    # Each split has its own seed: a bigger train set leaves val unchanged.
    bigger = load_task(TaskConfig(name="listops", n_train=400, n_val=50, n_test=50))
    assert torch.equal(bigger.val.inputs, data.val.inputs)


def test_listops_lra_small_and_longer_padding() -> None:
    data = load_task(TaskConfig(name="listops", listops_setting="lra", n_train=3, n_val=2, n_test=2))
    assert data.seq_len == 2000
    _check_listops(data, 500, 2000)
    padded = load_task(TaskConfig(name="listops", seq_len=200, n_train=5, n_val=5, n_test=5))
    assert padded.train.inputs.shape == (5, 200)


# ---------------------------------------------------------------- text


def _write_corpus(folder: Path) -> bytes:
    """Writes random-letter text files plus things to skip; returns the expected byte stream."""
    rng = random.Random(0)
    texts = {name: "".join(rng.choice("abcdefghij \n") for _ in range(4000)).encode() for name in ("b.txt", "a.md")}
    (folder / "sub").mkdir()
    (folder / "sub" / "c.txt").write_bytes(b"z" * 2000)
    for name, text in texts.items():
        (folder / name).write_bytes(text)
    (folder / "blob.bin").write_bytes(bytes(range(256)) * 10)  # has NUL: skipped
    (folder / "latin1.txt").write_bytes(b"caf\xe9" * 100)  # not UTF-8: skipped
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.txt").write_bytes(b"hidden" * 100)
    # Sorted depth-first: a.md, b.txt, sub/c.txt.
    return texts["a.md"] + texts["b.txt"] + b"z" * 2000


def test_text_windows_are_shifted_and_splits_disjoint(tmp_path: Path) -> None:
    stream = _write_corpus(tmp_path)
    cfg = TaskConfig(name="text", data=str(tmp_path), seq_len=32, n_train=200, n_val=20, n_test=20)
    data = load_task(cfg)
    _check_common(data)
    assert (data.objective, data.metric, data.vocab_size, data.n_outputs) == ("lm", "bits_per_byte", 256, 256)
    assert data.label_names == [] and len(set(data.vocab)) == 256
    cut1, cut2 = int(len(stream) * 0.8), int(len(stream) * 0.9)
    parts = {"train": stream[:cut1], "val": stream[cut1:cut2], "test": stream[cut2:]}
    for name, split in (("train", data.train), ("val", data.val), ("test", data.test)):
        assert split.targets.shape == split.inputs.shape == (len(split), 32)
        assert torch.equal(split.inputs[:, 1:], split.targets[:, :-1])
        for x, y in zip(split.inputs.tolist(), split.targets.tolist()):
            window = bytes(x + y[-1:])
            assert window in parts[name]  # inside its own contiguous part, never across parts
    assert torch.equal(load_task(cfg).val.inputs, data.val.inputs)
    other = load_task(TaskConfig(name="text", data=str(tmp_path), seed=3, seq_len=32, n_train=200, n_val=20, n_test=20))
    assert not torch.equal(other.train.inputs, data.train.inputs)


def test_text_defaults_to_the_stdlib() -> None:
    data = load_task(TaskConfig(name="text", seq_len=64, n_train=50, n_val=5, n_test=5))
    _check_common(data)
    assert data.train.inputs.shape == (50, 64)


def test_text_caps_default_window_counts(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(b"0123456789" * 100)  # 1000 bytes: val/test have 100 bytes
    data = load_task(TaskConfig(name="text", data=str(tmp_path / "t.txt"), seq_len=50))
    assert [len(data.train), len(data.val), len(data.test)] == [750, 50, 50]


@pytest.mark.parametrize(
    ("setup", "kwargs"),
    [
        ("missing", {}),
        ("empty_dir", {}),
        ("short", {}),
        ("binary", {}),
        ("ok", {"n_val": 10_000}),
    ],
)
def test_text_bad_input(tmp_path: Path, setup: str, kwargs: dict) -> None:
    path = tmp_path / setup
    if setup == "empty_dir":
        path.mkdir()
    elif setup == "short":
        path.write_text("too short")
    elif setup == "binary":
        path.write_bytes(b"\0\1\2" * 1000)
    elif setup == "ok":
        path.write_text("x" * 5000)
    _raises_one_line(str(path), load_task, TaskConfig(name="text", data=str(path), seq_len=64, **kwargs))


# ---------------------------------------------------------------- npz


def test_npz_tokens_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 30, size=(50, 12))
    labels = rng.integers(0, 3, size=50)
    path = tmp_path / "tok.npz"
    np.savez(path, tokens=tokens, labels=labels, label_names=np.array(["ant", "bee", "cat"]))
    data = load_task(TaskConfig(name="npz", data=str(path)))
    _check_common(data)
    assert [len(data.train), len(data.val), len(data.test)] == [40, 5, 5]
    assert data.vocab_size == int(tokens.max()) + 1 and data.seq_len == 12
    assert data.n_outputs == 3 and data.label_names == ["ant", "bee", "cat"]
    rows = torch.cat([data.train.inputs, data.val.inputs, data.test.inputs])
    targets = torch.cat([data.train.targets, data.val.targets, data.test.targets])
    original = sorted(zip(map(tuple, tokens.tolist()), labels.tolist()))
    assert sorted(zip(map(tuple, rows.tolist()), targets.tolist())) == original
    assert torch.equal(load_task(TaskConfig(name="npz", data=str(path))).test.inputs, data.test.inputs)


def test_npz_features_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(20, 7, 3))
    labels = np.arange(20) % 4
    path = tmp_path / "feat.npz"
    np.savez(path, features=features, labels=labels)
    data = load_task(TaskConfig(name="npz", data=str(path)))
    _check_common(data)
    assert (data.input_dim, data.vocab_size, data.seq_len, data.n_outputs) == (3, None, 7, 4)
    assert data.label_names == ["0", "1", "2", "3"]
    rows = torch.cat([data.train.inputs, data.val.inputs, data.test.inputs]).double()
    assert sorted(rows.flatten().tolist()) == pytest.approx(sorted(features.flatten().tolist()), abs=1e-6)


def _good() -> dict[str, np.ndarray]:
    return {"tokens": np.arange(40).reshape(20, 2) % 7, "labels": np.arange(20) % 2}


_BAD_NPZ = {
    "missing labels": {"tokens": _good()["tokens"]},
    "tokens and features": {**_good(), "features": np.zeros((20, 2, 1))},
    "neither tokens nor features": {"labels": _good()["labels"]},
    "labels 2-D": {**_good(), "labels": np.zeros((20, 1), dtype=int)},
    "tokens 1-D": {**_good(), "tokens": np.zeros(20, dtype=int)},
    "tokens 3-D": {**_good(), "tokens": np.zeros((20, 2, 2), dtype=int)},
    "features 2-D": {"labels": _good()["labels"], "features": np.zeros((20, 2))},
    "length mismatch": {**_good(), "labels": np.zeros(19, dtype=int)},
    "float labels": {**_good(), "labels": np.zeros(20)},
    "float tokens": {**_good(), "tokens": np.zeros((20, 2))},
    "negative label": {**_good(), "labels": np.array([-1] + [0] * 19)},
    "negative token": {**_good(), "tokens": -np.ones((20, 2), dtype=int)},
    "label beyond names": {**_good(), "label_names": np.array(["only"])},
    "label_names not strings": {**_good(), "label_names": np.array([1, 2])},
    "too few samples": {"tokens": np.zeros((9, 2), dtype=int), "labels": np.zeros(9, dtype=int)},
    "nan feature": {"labels": _good()["labels"], "features": np.full((20, 2, 1), np.nan)},
    "inf feature": {"labels": _good()["labels"], "features": np.full((20, 2, 1), np.inf)},
    "object array": {**_good(), "label_names": np.array(["a", 1], dtype=object)},
}


@pytest.mark.parametrize("case", sorted(_BAD_NPZ))
def test_npz_bad_arrays(tmp_path: Path, case: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **_BAD_NPZ[case])
    _raises_one_line("bad.npz", load_task, TaskConfig(name="npz", data=str(path)))


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated", "npy", "empty"])
def test_npz_bad_files(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.npz"
    if case == "garbage":
        path.write_bytes(b"this is not\nan archive\n" * 10)
    elif case == "truncated":
        np.savez(path, **_good())
        path.write_bytes(path.read_bytes()[:200])
    elif case == "npy":
        with path.open("wb") as f:
            np.save(f, np.zeros(3))
    elif case == "empty":
        path.write_bytes(b"")
    _raises_one_line(f"{case}.npz", load_task, TaskConfig(name="npz", data=str(path)))


def test_npz_seq_len_must_match(tmp_path: Path) -> None:
    path = tmp_path / "ok.npz"
    np.savez(path, **_good())
    assert load_task(TaskConfig(name="npz", data=str(path), seq_len=2)).seq_len == 2
    _raises_one_line("seq_len=5", load_task, TaskConfig(name="npz", data=str(path), seq_len=5))
