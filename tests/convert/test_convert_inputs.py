"""Parity inputs for ``convert``: ids inside the program's vocabulary, or the user's own ``--inputs`` file.

A token model with fewer than 16 tokens used to crash convert: its random
parity ids went past the embedding. The vocabulary is now read from the
program, and ``--inputs FILE.npz`` feeds real samples, checked against the
program before anything is built.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import Payload, assert_refused, write_npz

from difftx_edge.cli import main
from difftx_edge.convert import convert_pt2
from difftx_edge.convert.bundle import MANIFEST
from difftx_edge.convert.inputs import example_args, token_vocab
from difftx_edge.hashing import sha256_file

VOCAB = 5
TOKENS = (2, 6)  # the token program's example input: (batch, sequence)


class EmbedConv(nn.Module):
    """Five tokens, an embedding, a conv over the sequence: the kind of model that crashed convert."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.conv, self.head = nn.Embedding(VOCAB, 8), nn.Conv1d(8, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.emb(tokens).transpose(1, 2)).mean(-1))  # (B, 3)


class TwoEmbeddings(nn.Module):
    """The same ids index two tables, the second through a view: only ids below the smaller one are valid."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Embedding(7, 4), nn.Embedding(VOCAB, 4)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.a(t) + self.b(t.reshape(-1)).reshape(*t.shape, 4)


class Table(nn.Module):
    """Ids that index a plain tensor (``table[ids]``), no embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


class Affine(nn.Module):
    """A float model whose input is named ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Counts(nn.Module):
    """An integer input used as numbers, not ids."""

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return counts.float() * 2.0


def export(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    return torch.export.export(model.eval(), (example,))


def ids(shape=TOKENS, dtype=torch.long) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


@pytest.fixture(scope="module")
def token_pt2(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tokens") / "embed_conv.pt2"
    torch.export.save(export(EmbedConv(), ids()), path)
    return path


@pytest.fixture(scope="module")
def float_pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("floats") / "linear.pt2"
    torch.export.save(export(Affine(), torch.zeros(2, 4)), path)
    return path


# -----------------------------------------------------------------------------
# The vocabulary, read from the program


def test_the_vocabulary_of_an_embedding_model():
    assert token_vocab(export(EmbedConv(), ids())) == VOCAB


def test_the_smallest_of_two_embeddings_wins():
    assert token_vocab(export(TwoEmbeddings(), ids())) == VOCAB


def test_an_embedding_reached_through_a_cast():
    class Cast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(3, 2)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.emb(t.long().unsqueeze(0))

    assert token_vocab(export(Cast(), ids(dtype=torch.int32))) == 3


@pytest.mark.parametrize("model, high, limit", [
    (EmbedConv(), VOCAB, "embedding"),
    (TwoEmbeddings(), VOCAB, "embedding"),
    (Table(), 4, "index"),  # no embedding: below 16 and below the table's 4 rows
    (Counts(), 16, "default"),
], ids=["embedding", "two-embeddings", "table", "counts"])
def test_random_ids_stay_inside_what_the_program_can_index(model, high, limit):
    program = export(model, ids())
    args, source = example_args(program, seed=0, n=16)
    (drawn,) = source["inputs"].values()
    assert (drawn["high"], drawn["high_from"], drawn["dtype"]) == (high, limit, "int64")
    values = np.stack([x for (x,) in args])
    assert values.min() >= 0 and values.max() < high
    module = program.module()
    for (x,) in args:  # no IndexError in PyTorch
        module(torch.from_numpy(x))


def test_random_inputs_keep_the_input_dtype():
    class Half(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    [(x,)], source = example_args(export(EmbedConv(), ids()), seed=0, n=1)
    assert x.dtype == np.int64
    [(x,)], source = example_args(export(Counts(), ids(dtype=torch.int32)), seed=0, n=1)
    assert x.dtype == np.int32 and source["inputs"]["counts"]["dtype"] == "int32"
    [(x,)], source = example_args(export(Half(), torch.zeros(2, 3, dtype=torch.float64)), seed=0, n=1)
    assert x.dtype == np.float64 and source == {"from": "random", "seed": 0, "inputs": {
        "x": {"dtype": "float64", "distribution": "standard normal"}}}


def test_an_input_numpy_cannot_hold_is_refused_in_one_line():
    with pytest.raises(ValueError, match="not bfloat16: export the model with a float32"):
        example_args(export(Affine(), torch.zeros(2, 4, dtype=torch.bfloat16)), seed=0, n=1)


# -----------------------------------------------------------------------------
# Converting: the five-token model, on random inputs and on the user's own


def test_a_five_token_model_converts_on_random_inputs(token_pt2, tmp_path):
    (manifest,) = convert_pt2(token_pt2, tmp_path / "random", "onnx", threads=1, parity_batches=2)
    assert manifest["preprocessing"] is None  # not given: difftx-edge cannot know how the inputs were made
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_error"] <= 1e-4
    assert manifest["parity_inputs"] == {"from": "random", "seed": 0, "inputs": {
        "tokens": {"dtype": "int64", "low": 0, "high": VOCAB, "high_from": "embedding"}}}


def test_given_inputs_are_the_parity_inputs_and_the_manifest_says_so(token_pt2, tmp_path):
    samples = np.random.default_rng(1).integers(0, VOCAB, (3, *TOKENS)).astype(np.int32)  # cast to the int64 input
    np.savez(tmp_path / "real.npz", tokens=samples)
    note = "one id per word of a 5-word vocabulary, left-aligned, 6 per row"
    (manifest,) = convert_pt2(token_pt2, tmp_path / "given", "onnx", threads=1, parity_batches=8,
                              inputs=tmp_path / "real.npz", preprocess_note=note)
    assert manifest["preprocessing"] == note
    assert manifest["parity"]["passed"] and manifest["parity"]["samples"] == 3 * TOKENS[0]
    assert manifest["parity_inputs"] == {"from": "npz", "file": "real.npz",
                                         "sha256": sha256_file(tmp_path / "real.npz"), "samples": 3}
    written = json.loads((tmp_path / "given" / "onnx-fp32" / MANIFEST).read_text())
    assert written["parity_inputs"] == manifest["parity_inputs"]


# -----------------------------------------------------------------------------
# A bad --inputs file: one line, exit 2, nothing written


def _tokens(low: int = 0, high: int = VOCAB, shape=(2, *TOKENS)) -> np.ndarray:
    return np.random.default_rng(0).integers(low, high, shape)


BAD = {
    # name: (which program, how the --inputs file is made in tmp, words the error line must hold)
    "missing-file": ("tokens", lambda tmp: tmp / "none.npz", ("inputs", "does not exist")),
    "a-folder": ("tokens", lambda tmp: tmp, ("is a folder",)),
    "not-an-npz": ("tokens", lambda tmp: (tmp / "t.npz").write_text("tokens\n") and tmp / "t.npz",
                   ("not an .npz",)),
    "a-single-npy": ("tokens", lambda tmp: (np.save(tmp / "t.npy", _tokens()), tmp / "t.npy")[1],
                     ("single .npy",)),
    "object-array": ("tokens", lambda tmp: write_npz(tmp / "o.npz", tokens=np.array([{"a": 1}], dtype=object)),
                     ("plain arrays",)),
    "pickle-payload": ("tokens", lambda tmp: write_npz(tmp / "p.npz", tokens=np.array([Payload(tmp / "PWNED")],
                                                                                    dtype=object)),
                       ("plain arrays",)),
    "unknown-name": ("tokens", lambda tmp: write_npz(tmp / "n.npz", tokens=_tokens(), labels=np.zeros(2)),
                     ("'labels' is not an input", "'tokens'")),
    "input-not-given": ("tokens", lambda tmp: write_npz(tmp / "e.npz"), ("no array 'tokens'",)),
    "floats-for-tokens": ("tokens", lambda tmp: write_npz(tmp / "f.npz", tokens=_tokens().astype(np.float32)),
                          ("float32", "give integer values")),
    "ints-for-floats": ("floats", lambda tmp: write_npz(tmp / "i.npz", x=np.zeros((1, 2, 4), np.int64)),
                        ("int64", "give float values")),
    "no-sample-axis": ("tokens", lambda tmp: write_npz(tmp / "s.npz", tokens=_tokens(shape=TOKENS)),
                       ("(2, 6)", "(S, 2, 6)")),
    "wrong-length": ("tokens", lambda tmp: write_npz(tmp / "l.npz", tokens=_tokens(shape=(2, 2, 7))), ("(S, 2, 6)",)),
    "no-samples": ("tokens", lambda tmp: write_npz(tmp / "z.npz", tokens=_tokens(shape=(0, *TOKENS))), ("S >= 1",)),
    "nan": ("floats", lambda tmp: write_npz(tmp / "nan.npz", x=np.full((1, 2, 4), np.nan, np.float32)), ("NaN",)),
    "inf": ("floats", lambda tmp: write_npz(tmp / "inf.npz", x=np.full((1, 2, 4), -np.inf)), ("inf",)),
    "too-large-for-float32": ("floats", lambda tmp: write_npz(tmp / "big.npz", x=np.full((1, 2, 4), 1e300)),
                              ("too large for float32",)),
    "id-past-the-vocabulary": ("tokens", lambda tmp: write_npz(tmp / "v.npz", tokens=_tokens(high=VOCAB + 1)),
                               ("ids from 0 to 5", "embedding of 5 rows", "0..4")),
    "negative-id": ("tokens", lambda tmp: write_npz(tmp / "m.npz", tokens=_tokens(low=-1)), ("ids from -1",)),
}


def test_an_empty_preprocess_note_is_one_line_exit_2_and_writes_nothing(token_pt2, tmp_path, capfd):
    capfd.readouterr()
    code = main(["convert", str(token_pt2), "--format", "onnx", "--out", str(tmp_path / "out"),
                 "--preprocess-note", "  "])
    lines = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--preprocess-note is empty" in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(name, token_pt2, float_pt2, tmp_path, capfd):
    which, make, needles = BAD[name]
    inputs = make(tmp_path)
    out = tmp_path / "out"
    capfd.readouterr()
    code = main(["convert", str(token_pt2 if which == "tokens" else float_pt2), "--format", "onnx", "--out",
                 str(out), "--inputs", str(inputs)])
    assert_refused(code, capfd.readouterr().err, needles, out)
