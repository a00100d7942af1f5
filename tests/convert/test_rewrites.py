"""convert.rewrites: each rewrite keeps a program's values and takes ops back into the XNNPACK delegate."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difftx_edge.convert import rewrites
from difftx_edge.convert.rewrites import REWRITES, apply_rewrites

TOLERANCE = 1e-6  # fp32: the same math, in another order


def outside(program) -> tuple[int, dict[str, int]]:
    """``(partitions, ops left outside the delegate)`` of ``program`` lowered with the XNNPACK partitioner."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from difftx_edge.convert.executorch import delegation_figures

    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    figures = delegation_figures(edge.exported_program().graph_module)
    return figures["partitions"], figures["undelegated"]


def random_like(program, example: torch.Tensor, seed: int) -> torch.Tensor:
    """A random input shaped like ``example``: ids below the program's vocabulary, or normal floats."""
    from difftx_edge.convert.inputs import token_vocab

    generator = torch.Generator().manual_seed(seed)
    if example.dtype.is_floating_point:
        return torch.randn(example.shape, generator=generator)
    vocab = token_vocab(program, program.graph_signature.user_inputs[0])
    return torch.randint(0, vocab, example.shape, generator=generator)


def assert_same_values(program, rewritten, example: torch.Tensor) -> None:
    for seed in range(3):
        x = random_like(program, example, seed)
        with torch.no_grad():
            expected, got = program.module()(x), rewritten.module()(x)
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)


class PositionIds(nn.Module):
    """Position ids from arange and a token-type table read through an expand'd buffer: no input in either."""

    def __init__(self):
        super().__init__()
        self.pos, self.types = nn.Embedding(16, 8), nn.Embedding(2, 8)
        self.register_buffer("type_ids", torch.zeros(1, 16, dtype=torch.long))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # (1, 8, 8)
        n = x.shape[1]
        position = self.pos(torch.arange(n)) + self.types(self.type_ids[:, :n].expand(1, n))
        return self.proj(x + position)


class Attention(nn.Module):
    """Projections around scaled_dot_product_attention with no mask, a causal one or a constant one.

    "hf-additive" is the extended attention mask of older HF BERTs: ``(1 - mask) * finfo.min`` of an all-ones
    default mask, computed at every call.
    """

    def __init__(self, mask: str):
        super().__init__()
        self.qkv, self.mask = nn.Linear(8, 24), mask
        keep = torch.ones(6, 6, dtype=torch.bool)
        keep[:, 4:] = mask != "padding"  # "padding": the last two keys masked out of every row
        self.register_buffer("keep", keep)

    def forward(self, x):  # (1, 6, 8)
        q, k, v = (t.reshape(1, 6, 2, 4).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        mask = self.keep if self.mask in ("all-true", "padding") else None
        if self.mask == "hf-additive":
            mask = (1.0 - self.keep[None, None].to(x.dtype)) * torch.finfo(x.dtype).min
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.mask == "causal")
        return y.transpose(1, 2).reshape(1, 6, 8)


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):  # (1, 6, 8)
        return self.b(self.norm(self.a(x)))


class Mean(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):  # (1, 6, 8) -> (1, 8)
        return self.a(x).mean(dim=1)


class Amax(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):  # (1, 6, 8) -> (1, 6)
        return self.a(x).amax(dim=-1)


class Views(nn.Module):
    """nn.MultiheadAttention's in-projection split (unsqueeze, squeeze and select), then a chunk."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 24)

    def forward(self, x):  # (6, 1, 8)
        qkv = self.a(x).unflatten(-1, (3, 8)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        a, b = (qkv[0] * qkv[1] + qkv[2]).chunk(2, dim=-1)
        return torch.cat([b, a], dim=-1)


def op(node) -> str | None:
    return node.target._opname if isinstance(node.target, torch._ops.OpOverload) else None


def mean_refused(node) -> bool:  # XNNPACK takes a mean of a 4-D tensor over dims [2, 3] with keepdim only
    return op(node) == "mean" and not (node.args[0].meta["val"].dim() == 4 and sorted(node.args[1]) == [2, 3]
                                       and len(node.args) > 2 and node.args[2])


# rewrite -> (model holding its pattern, example input shape, whether a node is in the pattern)
CASES = {
    "fold_constants": (PositionIds, (1, 8, 8), lambda n: op(n) in {"arange", "expand", "slice", "embedding"}),
    "attention": (lambda: Attention("none"), (1, 6, 8), lambda n: op(n) == "scaled_dot_product_attention"),
    "layer_norm": (Norm, (1, 6, 8), lambda n: op(n) == "layer_norm"),
    "mean": (Mean, (1, 6, 8), mean_refused),
    "amax": (Amax, (1, 6, 8), lambda n: op(n) == "amax"),
    "views": (Views, (6, 1, 8), lambda n: op(n) in {"select", "squeeze", "unsqueeze", "chunk", "split"}),
}


def test_every_rewrite_has_a_case():
    assert set(CASES) == set(REWRITES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rewrite_keeps_values_and_replaces_its_pattern(name):
    build, shape, in_pattern = CASES[name]
    torch.manual_seed(0)
    example = torch.randn(shape)
    program = torch.export.export(build().eval(), (example,))
    rewritten, report = apply_rewrites(program, [name])
    assert [r["name"] for r in report] == [name] and report[0]["count"] > 0
    assert_same_values(program, rewritten, example)
    assert any(map(in_pattern, program.graph.nodes))
    assert not any(map(in_pattern, rewritten.graph.nodes)), rewritten.graph


class AllPatterns(nn.Module):
    """Every rewrite's pattern in one model: the delegation tests lower it before, and after each rewrite."""

    def __init__(self):
        super().__init__()
        self.position, self.views, self.attention = PositionIds(), Views(), Attention("none")
        self.norm, self.mean, self.amax = Norm(), Mean(), Amax()

    def forward(self, x):  # (1, 6, 8)
        x = self.position(torch.cat([x, x[:, :2]], dim=1))[:, :6]  # PositionIds takes 8 tokens
        x = self.views(x.transpose(0, 1)).transpose(0, 1)
        x = self.norm(self.attention(x))
        return self.mean(x) + self.amax(x)[:, :1]


@pytest.fixture(scope="module")
def all_patterns():  # lowered once: lowering a program takes seconds
    torch.manual_seed(0)
    example = torch.randn(1, 6, 8)
    program = torch.export.export(AllPatterns().eval(), (example,))
    return program, example, outside(program)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REWRITES))
def test_each_rewrite_takes_ops_into_the_delegate(all_patterns, name):
    program, example, (partitions_before, before) = all_patterns
    rewritten, report = apply_rewrites(program, [name])
    assert report and report[0]["count"] > 0
    partitions, after = outside(rewritten)
    assert sum(after.values()) < sum(before.values()), (name, before, after)
    assert partitions <= partitions_before


@pytest.mark.slow
def test_all_rewrites_delegate_every_pattern_in_one_partition(all_patterns):
    program, example, (partitions_before, before) = all_patterns
    rewritten, report = apply_rewrites(program)
    assert_same_values(program, rewritten, example)
    assert {r["name"] for r in report} == set(REWRITES)
    assert outside(rewritten) == (1, {}), before


@pytest.mark.parametrize("block", [256, 4])  # 4: the 6 queries in two blocks of scores, 4 and 2 rows
@pytest.mark.parametrize("mask", ["none", "causal", "all-true", "padding", "hf-additive"])
def test_attention_masks_keep_values(mask, block, monkeypatch):
    monkeypatch.setattr(rewrites, "QUERY_BLOCK", block)
    torch.manual_seed(0)
    example = torch.randn(1, 6, 8)
    program = torch.export.export(Attention(mask).eval(), (example,))
    rewritten, report = apply_rewrites(program)
    assert {"name": "attention", "count": 1} in report
    assert_same_values(program, rewritten, example)


@pytest.mark.slow
def test_a_quantized_program_keeps_its_quantize_dequantize_pairs():
    """Only aten ops fold: a PT2E program's int8 weights stay int8 behind their dequantize."""
    from difftx_edge.quantize import get_quantizer_spec
    from difftx_edge.quantize.pt2e import convert, prepare

    def quant_ops(program) -> int:
        return sum("quantize" in str(n.target) for n in program.graph.nodes)

    example = torch.randn(1, 6, 8)
    prepared = prepare(torch.export.export(nn.Sequential(Norm(), Mean()).eval(), (example,)).module(),
                       get_quantizer_spec("xnnpack").quantizer(qat=False), qat=False)
    prepared(example)
    program = torch.export.export(convert(prepared), (example,))
    rewritten, report = apply_rewrites(program)
    assert {r["name"] for r in report} == {"layer_norm", "mean"}
    assert quant_ops(rewritten) == quant_ops(program) > 0
    assert_same_values(program, rewritten, example)


@pytest.mark.parametrize("name", sorted(REWRITES))
def test_every_registered_rewrite_meets_the_contract(name):
    """rewrite(module) -> sites replaced: on a module, in place, an int (0 where its pattern is absent)."""
    rewrite = REWRITES[name]
    assert callable(rewrite) and list(inspect.signature(rewrite).parameters) == ["module"]
    assert rewrite.__doc__, "its docstring says what it replaces and why"
    program = torch.export.export(nn.Linear(4, 2).eval(), (torch.randn(1, 4),))
    count = rewrite(program.module())
    assert isinstance(count, int) and count == 0


@pytest.mark.parametrize("dims", [[0], [1], [2], [0, 2], [1, 2], [0, 1, 2]])
@pytest.mark.parametrize("keepdim", [False, True])
def test_reductions_in_4d_form_equal_torch(dims, keepdim):
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(rewrites.mean_4d(x, dims, keepdim), x.mean(dims, keepdim), atol=TOLERANCE,
                               rtol=TOLERANCE)
    assert torch.equal(rewrites.amax_pool(x, dims, keepdim), x.amax(dims, keepdim))  # max is exact


@pytest.mark.parametrize("shape", [[5], [3, 5]])
def test_layer_norm_from_means_equals_torch(shape):
    x = torch.randn(2, 3, 5) * 10 + 3
    torch.testing.assert_close(rewrites.layer_norm_explicit(x, shape, None, None, 1e-5),
                               F.layer_norm(x, shape), atol=TOLERANCE, rtol=TOLERANCE)


def test_a_program_with_nothing_to_rewrite_comes_back_as_it_is():
    program = torch.export.export(nn.Linear(4, 2).eval(), (torch.randn(1, 4),))
    assert apply_rewrites(program) == (program, [])


def test_input_names_survive():
    program = torch.export.export(Views().eval(), (torch.randn(6, 1, 8),))
    rewritten, _ = apply_rewrites(program)
    assert rewritten.graph_signature.user_inputs == program.graph_signature.user_inputs == ("x",)


def test_unknown_rewrite_is_one_line_error():
    program = torch.export.export(Mean().eval(), (torch.randn(1, 6, 8),))
    with pytest.raises(ValueError, match="unknown rewrite 'gelu'.*use one of"):
        apply_rewrites(program, ["gelu"])


def test_dynamic_shapes_are_refused():
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(Mean().eval(), (torch.randn(2, 6, 8),), dynamic_shapes=({0: batch},))
    with pytest.raises(ValueError, match="static-shape program"):
        apply_rewrites(program)


TINY = {"encoder-prenorm": dict(d_model=16, heads=2, layers=1, seq_len=8),
        "encoder-postnorm": dict(d_model=16, heads=2, layers=1, seq_len=8),
        "bert": dict(hidden=16, layers=1, heads=2, seq_len=8, vocab=64),
        "distilbert": dict(hidden=16, layers=1, heads=2, seq_len=8, vocab=64),
        "vit": dict(hidden=16, layers=1, heads=2, image_size=16, patch_size=8)}


@pytest.mark.slow
# Post-norm and DistilBERT have no pattern the other three lack; benchmarks/foreign_models.py lowers all five.
@pytest.mark.parametrize("name", ["bert", "encoder-prenorm", "vit"])
def test_zoo_transformers_lower_in_one_piece(name):
    """Issue 17's target: at most 2 XNNPACK partitions, and nothing outside them but an embedding lookup."""
    from difftx_edge import zoo

    model, example = zoo.build(name, **TINY[name])
    program = torch.export.export(model, (example,))
    rewritten, _ = apply_rewrites(program)
    assert_same_values(program, rewritten, example)
    partitions, left = outside(rewritten)
    assert partitions <= 2 and set(left) <= {"aten_embedding_default"}, left


@pytest.mark.slow
def test_convert_rewrites_for_xnnpack_formats_only_and_no_rewrite_turns_them_off(tmp_path):
    """convert rewrites what ExecuTorch lowers (one partition instead of several) and says so in the manifest;
    ONNX gets the program as saved; --no-rewrite converts the graph as saved, split as before."""
    from difftx_edge import zoo
    from difftx_edge.cli import main

    zoo.save("encoder-prenorm", tmp_path / "encoder.pt2", **TINY["encoder-prenorm"])

    def manifest(out: str, fmt: str) -> dict:
        return json.loads((tmp_path / out / f"{fmt}-fp32" / "manifest.json").read_text())

    assert main(["convert", str(tmp_path / "encoder.pt2"), "--format", "executorch,onnx",
                 "--out", str(tmp_path / "on")]) == 0
    assert main(["convert", str(tmp_path / "encoder.pt2"), "--format", "executorch", "--no-rewrite",
                 "--out", str(tmp_path / "off")]) == 0
    rewritten, onnx, as_saved = manifest("on", "executorch"), manifest("on", "onnx"), manifest("off", "executorch")
    assert rewritten["rewrites"]["enabled"]
    assert {"attention", "layer_norm"} <= {r["name"] for r in rewritten["rewrites"]["applied"]}
    assert rewritten["delegation"]["partitions"] == 1
    assert set(rewritten["delegation"]["undelegated"]) == {"aten_embedding_default"}
    assert not onnx["rewrites"]["enabled"] and not onnx["rewrites"]["applied"]
    assert as_saved["rewrites"] == {"enabled": False, "reason": "--no-rewrite", "applied": []}
    assert as_saved["delegation"]["partitions"] > 1
    assert rewritten["parity"]["passed"] and as_saved["parity"]["passed"]
