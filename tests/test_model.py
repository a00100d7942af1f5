"""The model: config validation, both input kinds, both heads, positions, and export-friendliness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difftx_edge.model import ATTENTION, DiffTransformer, ModelConfig

KINDS = sorted(ATTENTION)


@pytest.mark.parametrize("bad, message", [
    (dict(attention="dense"), "unknown attention kind 'dense'"),
    (dict(attention="local,linear,local"), "3 kinds for 2 layers"),
    (dict(window=100), "window (100) is larger than the sequence"),
    (dict(d_model=30), "divisible by n_heads"),
    (dict(attention="lowrank", rank=99), "rank (99) is larger than max_len"),
    (dict(head="lm"), "needs causal=True"),
    (dict(position="rope"), "unknown position encoding"),
    (dict(attention="hybrid", n_heads=1, d_model=16), "n_heads >= 2"),
    (dict(input_dim=None), "exactly one of vocab_size"),
    (dict(eps=0.0), "eps must be in (0, 1)"),
])
def test_config_rejects_bad_values_with_one_line(bad, message):
    with pytest.raises(ValueError) as err:
        ModelConfig(**{"input_dim": 4, "max_len": 32, **bad})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_per_layer_kinds():
    cfg = ModelConfig(input_dim=4, max_len=32, n_layers=4, attention="local,linear,hybrid,hybrid")
    model = DiffTransformer(cfg)
    assert [type(b.attn.core).__name__ for b in model.blocks] == [
        "LocalAttention", "LinearAttention", "HybridAttention", "HybridAttention"]


@pytest.mark.parametrize("kind", KINDS)
def test_token_and_feature_inputs_and_both_heads(kind):
    tokens = DiffTransformer(ModelConfig(vocab_size=20, n_outputs=5, max_len=24, attention=kind, rank=8))
    assert tokens(torch.randint(0, 20, (3, 24))).shape == (3, 5)
    features = DiffTransformer(ModelConfig(input_dim=6, n_outputs=5, max_len=24, attention=kind, rank=8))
    assert features(torch.randn(3, 24, 6)).shape == (3, 5)
    lm = DiffTransformer(ModelConfig(vocab_size=20, n_outputs=20, max_len=24, attention=kind, rank=8,
                                     causal=True, head="lm"))
    assert lm(torch.randint(0, 20, (3, 24))).shape == (3, 24, 20)


def test_shorter_sequences_are_served():
    model = DiffTransformer(ModelConfig(input_dim=4, max_len=32, attention="lowrank", rank=8)).eval()
    assert model(torch.randn(2, 20, 4)).shape == (2, 10)


def test_sinusoidal_positions_serve_lengths_beyond_training_and_learned_table_refuses():
    sinus = DiffTransformer(ModelConfig(input_dim=4, max_len=16, position="sinusoidal", attention="hybrid"))
    assert torch.isfinite(sinus(torch.randn(2, 64, 4))).all()
    assert sinus.cfg.max_serving_len() is None
    learned = DiffTransformer(ModelConfig(input_dim=4, max_len=16))
    assert learned.cfg.max_serving_len() == 16
    with pytest.raises(ValueError, match="exceeds the learned position table"):
        learned(torch.randn(2, 64, 4))


def test_sinusoidal_positions_are_trainable_and_start_as_sin_cos_pairs():
    model = DiffTransformer(ModelConfig(input_dim=4, max_len=16, position="sinusoidal"))
    pe = model.position(8)
    t = torch.arange(8.0)[:, None]
    torch.testing.assert_close(pe[:, 0:1], torch.sin(t))
    torch.testing.assert_close(pe[:, 1:2], torch.cos(t), atol=1e-6, rtol=0)
    assert model.position.freq.requires_grad and model.position.phase.requires_grad


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_export_form_equals_eager_form(kind, causal):
    # Export takes the delegable forms (explicit softmax, decomposed LayerNorm); eager the fused ones.
    cfg = ModelConfig(input_dim=4, max_len=32, attention=kind, causal=causal, rank=8, window=5, n_global=1)
    model = DiffTransformer(cfg).eval()
    x = torch.randn(2, 32, 4)
    exported = torch.export.export(model, (x,)).module()
    torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-5)


LOWERING_CASES = [(kind, causal, n_global) for kind in KINDS for causal in (False, True)
                  for n_global in ((0, 2) if kind in ("local", "hybrid") else (0,))]


@pytest.mark.slow
@pytest.mark.parametrize("kind, causal, n_global", LOWERING_CASES)
def test_every_compute_op_lowers_to_one_xnnpack_subgraph_and_runs(kind, causal, n_global, tmp_path):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    cfg = ModelConfig(input_dim=4, max_len=40, d_model=32, attention=kind, causal=causal, window=6,
                      n_global=n_global, rank=8, chunk=16, position="sinusoidal" if causal else "learned")
    model = DiffTransformer(cfg).eval()
    x = torch.randn(1, 40, 4)
    program = to_edge_transform_and_lower(torch.export.export(model, (x,)), partitioner=[XnnpackPartitioner()])
    graph = program.exported_program().graph_module
    info = get_delegation_info(graph)
    outside = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"
               and "executorch_call_delegate" not in str(n.target) and "getitem" not in str(n.target)]
    assert info.num_delegated_subgraphs == 1 and outside == []
    # The lowered program must also load and match eager in ExecuTorch's runtime.
    path = tmp_path / "model.pte"
    path.write_bytes(program.to_executorch().buffer)
    out = Runtime.get().load_program(path).load_method("forward").execute([x])[0]
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-4)


def test_constants_never_share_memory_with_the_cached_masks():
    # Exporters may rewrite a lifted constant in place; the cached mask must not change with it.
    from difftx_edge.model import LocalAttention, constant

    cached = LocalAttention.scores_bias(16, 2, 8, 0, 2, False)
    before = [mask.copy() for mask in cached]
    for mask in cached:
        constant(mask, torch.zeros(1)).fill_(0.0)
    assert all(np.array_equal(a, b) for a, b in zip(LocalAttention.scores_bias(16, 2, 8, 0, 2, False), before))
    assert all(np.isneginf(mask).any() for mask in before)
