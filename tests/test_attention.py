"""Each efficient attention kind equals its O(N^2) reference form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from difftx_edge.model import (
    ATTENTION,
    HybridAttention,
    LayerNorm,
    LinearAttention,
    LocalAttention,
    LowRankAttention,
    ModelConfig,
    SoftmaxAttention,
    elu_plus_one,
    eps_softmax,
    eps_softmax_,
    reference_attention,
)

KINDS = sorted(ATTENTION)


def config(**kw) -> ModelConfig:
    base = dict(input_dim=4, max_len=kw.get("max_len", 13), d_model=16, n_heads=2, window=4, rank=4, chunk=4)
    return ModelConfig(**{**base, **kw})


def qkv(N=13, B=2, H=2, D=8, dtype=torch.float32):
    return [torch.randn(B, H, N, D, dtype=dtype) for _ in range(3)]


def full_mask(N: int, causal: bool) -> torch.Tensor:
    return torch.from_numpy(np.tri(N, dtype=bool) if causal else np.ones((N, N), bool))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [13, 20])
def test_local_with_window_covering_sequence_equals_softmax(causal, window):
    q, k, v = qkv()
    local = LocalAttention(config(causal=causal, window=13, max_len=20))
    local.window = window  # the config refuses window > max_len; the module itself must still be exact
    expected = SoftmaxAttention(config(causal=causal))(q, k, v)
    torch.testing.assert_close(local(q, k, v), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N,window,n_global", [(13, 4, 0), (13, 1, 0), (16, 4, 0), (13, 5, 2), (13, 3, 6), (40, 7, 3)])
def test_local_equals_banded_masked_full_attention(causal, N, window, n_global):
    q, k, v = qkv(N)
    local = LocalAttention(config(causal=causal, window=window, n_global=n_global, max_len=N))
    d = np.arange(N)[:, None] - np.arange(N)[None, :]
    band = ((d >= 0) & (d < window)) if causal else (np.abs(d) < window)
    band[:n_global, :] = True  # global tokens attend everywhere ...
    band[:, :n_global] = True  # ... and are attended from everywhere
    if causal:
        band &= d >= 0
    expected = reference_attention(q, k, v, torch.from_numpy(band), local.eps)
    torch.testing.assert_close(local(q, k, v), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_global", [0, 3])
def test_local_inference_path_equals_training_path(causal, n_global):
    # Without autograd, local attention takes the in-place eps-softmax; it must give the same numbers.
    q, k, v = qkv(N=40)
    local = LocalAttention(config(causal=causal, window=6, n_global=n_global, max_len=40))
    trained = local(q, k, v)
    with torch.inference_mode():
        inferred = local(q, k, v)
    torch.testing.assert_close(inferred, trained, atol=1e-6, rtol=1e-5)


def test_inplace_eps_softmax_matches_and_is_finite():
    s = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [2.0, 1.0, float("-inf")]])
    torch.testing.assert_close(eps_softmax_(s.clone(), 1e-6), eps_softmax(s, 1e-6))


def test_local_cost_is_blockwise_not_quadratic():
    # The largest score tensor local attention builds is (BH*nb, b, 3b), never N x N.
    q, k, v = qkv(N=256)
    local = LocalAttention(config(window=8, max_len=256))
    shapes = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                shapes.append(out.numel())
            return out

    with Record():
        local(q, k, v)
    assert max(shapes) < 2 * 2 * 256 * 3 * 8 * 2  # far below B*H*N*N = 262144


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_linear_equals_explicit_kernel_formula(causal, chunk):
    q, k, v = qkv()
    attn = LinearAttention(config(causal=causal, chunk=chunk))
    a = elu_plus_one(q) @ elu_plus_one(k).transpose(-1, -2)  # (B, H, N, N) kernel matrix
    if causal:
        a = a * full_mask(13, True)
    expected = (a @ v) / (a.sum(-1, keepdim=True) + attn.eps)
    torch.testing.assert_close(attn(q, k, v), expected, atol=1e-5, rtol=1e-5)


def test_elu_plus_one_matches_elu():
    x = torch.linspace(-20, 20, 1001)
    torch.testing.assert_close(elu_plus_one(x), F.elu(x) + 1)


@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_with_identity_projections_equals_softmax(causal):
    q, k, v = qkv()
    attn = LowRankAttention(config(causal=causal, rank=13))
    with torch.no_grad():
        attn.proj_k.copy_(torch.eye(13))
        attn.proj_v.copy_(torch.eye(13))
    expected = reference_attention(q, k, v, full_mask(13, causal), attn.eps)
    torch.testing.assert_close(attn(q, k, v), expected, atol=1e-5, rtol=0)


def test_causal_lowrank_equals_its_segment_formula():
    # Slot n pools segment n with E; query i sees finished segments whole and its own up to i.
    N, r = 12, 3
    q, k, v = qkv(N)
    attn = LowRankAttention(config(causal=True, rank=r, max_len=N))
    E, Fv, s = attn.proj_k.detach(), attn.proj_v.detach(), attn.seg
    scale = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for i in range(N):
        keys, values = [], []
        for n in range(i // s + 1):
            js = [j for j in range(n * s, min((n + 1) * s, N)) if j <= i]
            keys.append(sum(E[n, j] * k[..., j, :] for j in js))
            values.append(sum(Fv[n, j] * v[..., j, :] for j in js))
        K, V = torch.stack(keys, -2), torch.stack(values, -2)
        p = eps_softmax((q[..., i:i + 1, :] * scale) @ K.transpose(-1, -2), attn.eps)
        out[..., i, :] = (p @ V)[..., 0, :]
    torch.testing.assert_close(attn(q, k, v), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_hybrid_is_local_heads_beside_linear_heads(causal):
    q, k, v = qkv(H=4)
    cfg = config(causal=causal, n_heads=4)
    hybrid = HybridAttention(cfg)
    out = hybrid(q, k, v)
    torch.testing.assert_close(out[:, :2], LocalAttention(cfg)(q[:, :2], k[:, :2], v[:, :2]))
    torch.testing.assert_close(out[:, 2:], LinearAttention(cfg)(q[:, 2:], k[:, 2:], v[:, 2:]))


def test_eps_softmax_matches_formula():
    s = torch.randn(4, 7, dtype=torch.float64) * 3
    eps = 1e-3
    expected = s.exp() / (s.exp().sum(-1, keepdim=True) + eps)
    torch.testing.assert_close(eps_softmax(s, eps), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eps_softmax_is_finite_for_huge_logits(dtype):
    s = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, 1e4]], dtype=dtype)
    p = eps_softmax(s, 1e-6)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p[0], torch.tensor([1.0, 0.0, 0.0], dtype=dtype))
    assert p[1].sum() < 1e-6  # every logit far below log(eps): the eps term takes the mass
    torch.testing.assert_close(p[2], torch.full((3,), 1 / 3, dtype=dtype))


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_fused_sdpa_equals_explicit(causal):
    attn = SoftmaxAttention(config(causal=causal, eps=1e-2))  # a large eps makes the null key matter
    q, k, v = qkv()
    expected = reference_attention(q, k, v, full_mask(13, causal), attn.eps)
    torch.testing.assert_close(attn.fused(q, k, v), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.explicit(q, k, v), expected, atol=1e-5, rtol=1e-5)


def test_layernorm_export_form_equals_fused():
    ln = LayerNorm(16)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(3, 5, 16) * 4 + 1
    torch.testing.assert_close(ln.explicit(x), F.layer_norm(x, (16,), ln.weight, ln.bias, 1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_causal_outputs_never_see_the_future(kind):
    attn = ATTENTION[kind](config(causal=True, n_heads=2, n_global=2 if kind == "local" else 0))
    q, k, v = qkv(N=13, H=2)
    out = attn(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[..., 9:, :] += 5 * torch.randn_like(k2[..., 9:, :])
    v2[..., 9:, :] += 5 * torch.randn_like(v2[..., 9:, :])
    torch.testing.assert_close(attn(q, k2, v2)[..., :9, :], out[..., :9, :], atol=1e-6, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind, causal):
    attn = ATTENTION[kind](config(causal=causal, max_len=7, window=3, rank=3, chunk=3, n_heads=2,
                                  n_global=1 if kind == "local" else 0)).double()
    q, k, v = (t.requires_grad_() for t in qkv(N=7, B=1, H=2, D=3, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: attn(a, b, c), (q, k, v), eps=1e-6, atol=1e-5)
    if kind == "lowrank":  # the learned projections too
        inputs = (q.detach(), k.detach(), v.detach())
        for name in ("proj_k", "proj_v"):
            weight = getattr(attn, name).detach().clone().requires_grad_()
            assert torch.autograd.gradcheck(
                lambda w, name=name: torch.func.functional_call(attn, {name: w}, inputs), (weight,),
                eps=1e-6, atol=1e-5)


def test_every_kind_keeps_shape_and_is_finite_at_length_not_a_multiple_of_blocks():
    for kind in KINDS:
        for causal in (False, True):
            attn = ATTENTION[kind](config(causal=causal, max_len=29, window=6, rank=5, chunk=8, n_heads=2))
            q, k, v = qkv(N=29, H=2)
            out = attn(q, k, v)
            assert out.shape == q.shape and torch.isfinite(out).all(), (kind, causal)
