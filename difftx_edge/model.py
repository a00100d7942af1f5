"""The Differentiable Transformer: one file, read top to bottom.

A pre-LayerNorm Transformer encoder whose attention is built for small devices.
Every attention kind is a small class behind the ``ATTENTION`` registry and
works in bidirectional and causal mode:

- ``softmax``: full attention with the eps-stabilised softmax
  ``exp(s_i) / (sum_j exp(s_j) + eps)``;
- ``local``: a sliding window, computed block-wise in O(N*w), with optional
  global tokens;
- ``lowrank``: Linformer-style projection of keys and values along the
  sequence to rank r;
- ``linear``: kernel attention with the feature map elu(x)+1, O(N);
- ``hybrid``: local heads for exact short range plus linear heads for cheap
  long range, in one layer.

The ops are written in the forms that lower to one XNNPACK subgraph in
ExecuTorch and one partition in LiteRT (see docs/design.md, "Delegation"):
3-D ``bmm`` instead of 4-D ``@``, slices instead of ``split``/``unbind``,
``F.pad`` instead of ``zeros_like``, constants built with numpy so that export
lifts them as constants instead of tracing ``arange``/``tril`` ops, and
LayerNorm and the eps-softmax written from delegable primitives when
exporting. Eager mode keeps the fast fused kernels; tests check the two forms
agree.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

POSITION_KINDS = ("learned", "sinusoidal")
HEADS = ("classify", "lm")


# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    """Shape and behaviour of a DiffTransformer.

    Exactly one of ``vocab_size`` (integer token ids through an embedding) and
    ``input_dim`` (a float feature vector per step through a linear
    projection) is set.
    """

    vocab_size: int | None = None
    input_dim: int | None = None
    n_outputs: int = 10  # classes for "classify", vocabulary for "lm"
    max_len: int = 64  # longest sequence a learned table / low-rank projection serves
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int | None = None  # None: 4 * d_model
    attention: str = "hybrid"  # one kind, or one per layer: "local,linear,hybrid"
    causal: bool = False
    head: str = "classify"  # "classify" (mean-pooled) or "lm" (per position)
    # local: keys within distance window-1 (causal: the window most recent). The default 4 reaches the
    # neighbouring row of digits' 4x4 patch grid (0.7 points of test accuracy over window 2 with
    # augmentation, 3 seeds); hybrid's linear heads carry the long range. Raise it for text.
    window: int = 4
    n_global: int = 0  # local: the first g tokens attend everywhere and are attended from everywhere
    rank: int = 16  # lowrank: projected sequence length r
    chunk: int = 64  # causal linear: chunk length of the chunked scan
    eps: float = 1e-6  # the eps of the eps-softmax and of the linear-attention denominator
    position: str = "learned"  # "learned" table or trainable "sinusoidal"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if (self.vocab_size is None) == (self.input_dim is None):
            raise ValueError("set exactly one of vocab_size (token ids) and input_dim (float features)")
        for name in ("n_outputs", "max_len", "d_model", "n_heads", "n_layers", "window", "rank", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be at least 1, got {self.vocab_size}")
        if self.input_dim is not None and self.input_dim < 1:
            raise ValueError(f"input_dim must be at least 1, got {self.input_dim}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.d_ff is not None and self.d_ff < 1:
            raise ValueError(f"d_ff must be at least 1, got {self.d_ff}")
        kinds = self.layer_kinds()  # validates names and count
        if "hybrid" in kinds and self.n_heads < 2:
            raise ValueError("hybrid attention splits heads between local and linear: use n_heads >= 2")
        if {"local", "hybrid"} & set(kinds) and self.window > self.max_len:
            raise ValueError(f"window ({self.window}) is larger than the sequence (max_len {self.max_len}): "
                             "use a window at most the sequence length")
        if self.n_global < 0 or self.n_global > self.max_len:
            raise ValueError(f"n_global must be between 0 and max_len ({self.max_len}), got {self.n_global}")
        if "lowrank" in kinds and self.rank > self.max_len:
            raise ValueError(f"rank ({self.rank}) is larger than max_len ({self.max_len}): use rank <= max_len")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        if self.position not in POSITION_KINDS:
            raise ValueError(f"unknown position encoding {self.position!r}: use one of {', '.join(POSITION_KINDS)}")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}: use one of {', '.join(HEADS)}")
        if self.head == "lm" and not self.causal:
            raise ValueError("an lm head predicts the next token and needs causal=True")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def layer_kinds(self) -> list[str]:
        """The attention kind of each layer, validated against the registry."""
        kinds = [k.strip() for k in self.attention.split(",")]
        for kind in kinds:
            if kind not in ATTENTION:
                raise ValueError(f"unknown attention kind {kind!r}: use one of {', '.join(sorted(ATTENTION))}")
        if len(kinds) == 1:
            return kinds * self.n_layers
        if len(kinds) != self.n_layers:
            raise ValueError(f"attention lists {len(kinds)} kinds for {self.n_layers} layers: "
                             "give one kind or one per layer")
        return kinds

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def max_serving_len(self) -> int | None:
        """The longest sequence this model can serve; None when unbounded."""
        bounded = self.position == "learned" or "lowrank" in self.layer_kinds()
        return self.max_len if bounded else None

    def to_dict(self) -> dict:
        return asdict(self)


# -----------------------------------------------------------------------------
# Delegable primitives


NEG_INF = float("-inf")


def _exporting() -> bool:
    # Export (torch.export, PT2E quantization) takes the delegable forms; eager keeps fused kernels.
    return torch.compiler.is_exporting()


def constant(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A numpy-built constant on ``like``'s device and dtype, in memory of its own.

    Built with numpy so that torch.export lifts it as a constant instead of
    tracing the ops that made it (arange, tril, where), which would run outside
    the XNNPACK delegate. Always a copy: the masks are cached, and an exporter
    that rewrites a lifted constant in place (one replaced the masks' -inf)
    must not change the cache every later forward reads.
    """
    return torch.from_numpy(np.array(array, copy=True)).to(device=like.device, dtype=like.dtype)


def eps_softmax(s: torch.Tensor, eps: float) -> torch.Tensor:
    """``exp(s_i) / (sum_j exp(s_j) + eps)`` over the last dim, for any finite logits.

    Appending one logit of value log(eps) and taking a plain softmax gives
    exactly this; softmax subtracts the row maximum, so it never overflows, and
    XNNPACK delegates pad, softmax and slice (it refuses amax and sum).
    """
    return F.softmax(pad_last(s, math.log(eps)), dim=-1)[..., :-1]


def pad_last(t: torch.Tensor, value: float) -> torch.Tensor:
    """(..., D) -> (..., D+1), the new last column all ``value``.

    A zero pad plus a constant row rather than ``F.pad(value=...)``: LiteRT's
    XNNPACK delegate refuses the PADV2 a non-zero pad becomes, which split
    every layer into its own partition; PAD and ADD it delegates. Exact, since
    adding 0 changes nothing, -inf included.
    """
    last = np.zeros(t.shape[-1] + 1, np.float32)
    last[-1] = value
    return F.pad(t, (0, 1)) + constant(last, t)


def first(t: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
    """The first n entries along dim; whole tensors pass through, since a whole slice exports as an
    undelegated alias."""
    return t if t.shape[dim] == n else t.narrow(dim, 0, n)


def mix(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T over the last dim, as one batch-1 bmm.

    With a weight that is computed or constant rather than a parameter,
    F.linear exports as expand + bmm (3-D input) or mm (2-D), which XNNPACK
    refuses; a single bmm it delegates.
    """
    n_out, n_in = w.shape
    return torch.bmm(x.reshape(1, -1, n_in), w.t().reshape(1, n_in, n_out)).reshape(*x.shape[:-1], n_out)


def eps_softmax_(s: torch.Tensor, eps: float) -> torch.Tensor:
    """``eps_softmax`` computed in place in ``s``, for inference: no padded or sliced copies."""
    log_eps = math.log(eps)
    m = s.amax(dim=-1, keepdim=True).clamp_(min=log_eps)  # the eps logit joins the max, so nothing overflows
    s.sub_(m).exp_()
    return s.div_(s.sum(dim=-1, keepdim=True).add_(torch.exp(log_eps - m)))


def _fill_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(BH, N, D) -> (BH, N+n, D): copies of leading rows appended, for rows that get masked, zero-weighted or dropped.

    Not a zero pad: XNNPACK fails to build a pad whose input is an int8 tensor
    (its qkv projection, in a quantized model), while cat it runs on int8.
    """
    parts, N = [t], t.shape[1]
    while n > 0:
        parts.append(first(t, min(n, N)))
        n -= min(n, N)
    return torch.cat(parts, dim=1) if len(parts) > 1 else t


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 from relu and exp, which XNNPACK delegates (its elu is disabled)."""
    return F.relu(x) + torch.exp(-F.relu(-x))


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                        eps: float) -> torch.Tensor:
    """The O(N^2) masked eps-softmax attention every efficient kind is tested against.

    Args:
        q, k, v: (..., N, D) queries, keys, values.
        visible: (N, N) bool, True where query i may attend to key j.
        eps: the eps of the eps-softmax.

    Returns:
        (..., N, D) attention output.
    """
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~visible, NEG_INF)
    return eps_softmax(s, eps) @ v


def fused_eps_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eps-softmax attention through PyTorch's fused SDPA kernel (eager mode only).

    The eps term is one extra "null" key whose logit is log(eps) for every
    query and whose value is zero: queries get an extra coordinate 1 and the
    null key log(eps)/scale there, so SDPA's fused kernel computes
    exp(s_i) / (sum_j exp(s_j) + eps) without building the score matrix.

    Args:
        q: (..., Nq, D) queries; k, v: (..., Nk, D) keys and values.
        eps: the eps of the eps-softmax.
        mask: None, or (Nq, Nk) bool, True where a query may see a key.

    Returns:
        (..., Nq, D) attention output.
    """
    D, Nk = q.shape[-1], k.shape[-2]
    scale = D ** -0.5
    null = np.zeros((Nk + 1, D + 1), np.float32)
    null[0, D] = math.log(eps) / scale
    q1 = F.pad(q, (0, 1), value=1.0)  # (..., Nq, D+1)
    k1 = F.pad(k, (0, 1, 1, 0)) + constant(null, k)  # (..., Nk+1, D+1): null key first
    v1 = F.pad(v, (0, 1, 1, 0))  # (..., Nk+1, D+1): zero value for the null key, D padded to match q
    if mask is not None:  # every query sees the null key
        mask = F.pad(mask, (1, 0), value=True)
    return F.scaled_dot_product_attention(q1, k1, v1, attn_mask=mask, scale=scale)[..., :D]


@functools.lru_cache(maxsize=64)
def _bias(visible: bytes, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.frombuffer(visible, dtype=bool).reshape(shape)
    return np.where(mask, 0.0, NEG_INF).astype(np.float32)


def additive_mask(visible: np.ndarray) -> np.ndarray:
    """0 where visible, -inf elsewhere; cached because shapes repeat every step."""
    return _bias(visible.tobytes(), visible.shape)


# -----------------------------------------------------------------------------
# Attention kinds. Each maps (B, H, N, D) queries, keys and values to (B, H, N, D).

ATTENTION: dict[str, type[nn.Module]] = {}


def register_attention(name: str):
    """Class decorator: make an attention kind selectable by ``name``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        ATTENTION[name] = cls
        return cls

    return wrap


@register_attention("softmax")
class SoftmaxAttention(nn.Module):
    """Full attention with the eps-softmax; the quadratic baseline."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.causal, self.eps = cfg.causal, cfg.eps

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.explicit(q, k, v) if _exporting() else self.fused(q, k, v)

    def explicit(self, q, k, v):
        """The eps term as a null key, as in ``fused_eps_attention``, so no N x N tensor is padded or sliced.

        Padding and slicing the scores (``eps_softmax``) costs three extra
        passes over N x N memory, which made the .pte slower than eager's
        fused kernel at N=1024; here the pads touch (N, D) tensors only.
        """
        B, H, N, D = q.shape
        q, k, v = (t.reshape(B * H, N, D) for t in (q, k, v))  # (BH, N, D)
        q1 = pad_last(q * D ** -0.5, 1.0)  # (BH, N, D+1)
        # Every real key's extra coordinate is -log(eps) and the null key is a zero row, so the null
        # logit sits log(eps) below theirs: softmax is shift-invariant, and no (N+1, D+1) constant
        # holding a single non-zero ends up in the exported file.
        k1 = F.pad(pad_last(k, -math.log(self.eps)), (0, 0, 0, 1))  # (BH, N+1, D+1): null key last
        s = torch.bmm(q1, k1.transpose(1, 2))  # (BH, N, N+1)
        if self.causal:  # every query sees the null key
            s = s + constant(additive_mask(np.tri(N, N + 1, dtype=bool) | (np.arange(N + 1) == N)), s)
        v1 = F.pad(v, (0, 0, 0, 1))  # (BH, N+1, D): zero value for the null key
        return torch.bmm(F.softmax(s, dim=-1), v1).reshape(B, H, N, D)

    def fused(self, q, k, v):
        N = q.shape[2]
        mask = torch.from_numpy(np.tri(N, dtype=bool)).to(q.device) if self.causal else None
        return fused_eps_attention(q, k, v, self.eps, mask)


@register_attention("local")
class LocalAttention(nn.Module):
    """Sliding-window attention, block-wise: cost O(N * window), never an N x N matrix.

    Query i sees key j when |i - j| < window (causal: 0 <= i - j < window). The
    sequence is cut into blocks of length b = min(window, N); each query block
    scores only its own block and its neighbours (the previous one, and the
    next one unless causal), masked to the exact window. The first ``n_global``
    tokens attend to every (visible) key and every query attends to them.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.window, self.n_global, self.causal, self.eps = cfg.window, cfg.n_global, cfg.causal, cfg.eps

    def visible(self, N: int) -> np.ndarray:
        """(N, N) bool: the mask this kind is equivalent to."""
        d = np.arange(N)[:, None] - np.arange(N)[None, :]  # i - j
        vis = (d >= 0) & (d < self.window) if self.causal else np.abs(d) < self.window
        g = min(self.n_global, N)
        vis[:g, :] = True
        vis[:, :g] = True
        if self.causal:
            vis &= d >= 0
        return vis

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def scores_bias(N: int, b: int, nb: int, g: int, window: int, causal: bool) -> tuple[np.ndarray, np.ndarray]:
        """The additive mask over each query's block keys, then the g global keys, as two broadcast factors.

        Returns ``(offsets, keys)``. ``offsets`` (b, L+g) is the window, a function of the query's and
        the key's offsets alone, the same in every block. ``keys`` (nb, 1, L+g) hides, per block, the
        keys outside [g, N): global keys (scored in their own columns) and padding. Their sum is the
        (nb, b, L+g) mask; two tables that do not grow with N keep the exported file small.
        """
        n_neighbours = 2 if causal else 3
        # (b, L) i - j for query offset r and key offset l: block t's keys start at block t-1
        d = np.arange(b)[:, None] + b - np.arange(n_neighbours * b)[None, :]
        window_vis = (d >= 0) & (d < window) if causal else np.abs(d) < window
        j = (np.arange(nb)[:, None] - 1) * b + np.arange(n_neighbours * b)[None, :]  # (nb, L) key positions
        key_vis = (j >= g) & (j < N)
        # Every query sees the global keys: causal queries i >= g come after all of them, and the rows
        # i < g are the global queries, whose output the full strip replaces (the eps logit keeps them finite).
        offsets = np.concatenate([window_vis, np.ones((b, g), bool)], axis=1)
        keys = np.concatenate([key_vis, np.ones((nb, g), bool)], axis=1)[:, None, :]
        return additive_mask(offsets), additive_mask(keys)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, N, D = q.shape
        BH, g = B * H, min(self.n_global, N)
        b = min(self.window, N)
        nb = -(-N // b)
        pad = nb * b - N
        # Padding rows, and the blocks before the first and after the last, are filled with
        # copies of real rows rather than zeros: the mask hides them (scores_bias masks key
        # positions outside [g, N)) and padded queries are dropped, and cat runs on int8 in
        # XNNPACK where pad does not.
        q, k, v = (_fill_rows(t.reshape(BH, N, D), pad) for t in (q, k, v))  # (BH, Np, D)
        q = q * D ** -0.5

        def neighbours(t):  # (BH, Np, D) -> (BH*nb, L, D): each block's previous, own (and next) block
            t = t.reshape(BH, nb, b, D)
            own = t.reshape(BH, nb, b * D)
            prev = torch.cat([first(own, 1), first(own, nb - 1)], dim=1) if nb > 1 else own  # block i-1 (0: masked)
            parts = [prev, own]
            if not self.causal:
                parts.append(torch.cat([own[:, 1:], own[:, nb - 1:]], dim=1) if nb > 1 else own)  # block i+1
            return torch.cat([p.reshape(BH, nb, b, D) for p in parts], dim=2).reshape(BH * nb, len(parts) * b, D)

        k_blocks, v_blocks = neighbours(k), neighbours(v)
        s = torch.bmm(q.reshape(BH * nb, b, D), k_blocks.transpose(1, 2))  # (BH*nb, b, L)
        L = s.shape[-1]
        s = s.reshape(BH, nb * b, L)  # (BH, Np, L)
        if g:
            s = torch.cat([s, torch.bmm(q, k[:, :g].transpose(1, 2))], dim=2)  # (BH, Np, L+g)
        # The mask is added after the cat, so no -inf ever reaches an op a quantizer may observe.
        # Each mask is added in a shape of its own: with one add right after the other, LiteRT's
        # converter folds the two small tables back into the (nb, b, L+g) one.
        offsets, keys = (constant(m, s) for m in self.scores_bias(N, b, nb, g, self.window, self.causal))
        s = s.reshape(BH * nb, b, L + g)
        if torch.is_grad_enabled() or _exporting():
            s = (s + offsets).reshape(BH, nb, b, L + g) + keys
            p = eps_softmax(s.reshape(BH, nb * b, L + g), self.eps)
        else:
            s = s.add_(offsets).reshape(BH, nb, b, L + g).add_(keys)
            p = eps_softmax_(s.reshape(BH, nb * b, L + g), self.eps)
        out = torch.bmm(first(p, L, dim=2).reshape(BH * nb, b, L), v_blocks).reshape(BH, nb * b, D)
        if g:
            out = out + torch.bmm(p[:, :, L:], v[:, :g])
            # Global queries see every key: a (g x N) strip of full attention.
            s_rows = torch.bmm(q[:, :g], first(k, N).transpose(1, 2))  # (BH, g, N)
            if self.causal:
                s_rows = s_rows + constant(additive_mask(np.tri(g, N, dtype=bool)), s_rows)
            rows = torch.bmm(eps_softmax(s_rows, self.eps), first(v, N))  # (BH, g, D)
            out = torch.cat([rows, out[:, g:]], dim=1)
        return first(out, N).reshape(B, H, N, D)


@register_attention("linear")
class LinearAttention(nn.Module):
    """Kernel attention, phi(x) = elu(x) + 1: o_i = phi(q_i) S / (phi(q_i) z + eps), O(N).

    Bidirectional: S = phi(K)^T V and z = phi(K)^T 1 over the whole sequence.
    Causal: a chunked scan. Within a chunk the masked C x C form is exact;
    across chunks a running (D x D+1) state is carried by a strictly
    lower-triangular matmul over chunk states, which XNNPACK delegates (cumsum
    it would not). The ones column appended to V yields z in the same matmuls.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.causal, self.eps, self.chunk = cfg.causal, cfg.eps, cfg.chunk

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, N, D = q.shape
        BH = B * H
        q, k = elu_plus_one(q.reshape(BH, N, D)), elu_plus_one(k.reshape(BH, N, D))
        v = pad_last(v.reshape(BH, N, D), 1.0)  # (BH, N, D+1): last column sums phi(k)
        if not self.causal:
            num = torch.bmm(q, torch.bmm(k.transpose(1, 2), v))  # (BH, N, D+1)
        else:
            num = self._causal_scan(q, k, v)
        return (num[..., :D] / (num[..., D:] + self.eps)).reshape(B, H, N, D)

    def _causal_scan(self, q, k, v):
        BH, N, D = q.shape
        C = min(self.chunk, N)
        nc = -(-N // C)
        pad = nc * C - N  # padded keys only reach padded queries, which are dropped
        q, k, v = (F.pad(t, (0, 0, 0, pad)).reshape(BH * nc, C, t.shape[-1]) for t in (q, k, v))
        within = torch.bmm(q, k.transpose(1, 2)) * constant(np.tri(C, dtype=np.float32), q)  # (BH*nc, C, C)
        num = torch.bmm(within, v)  # (BH*nc, C, D+1)
        if nc > 1:
            states = torch.bmm(k.transpose(1, 2), v).reshape(BH, nc, D * (D + 1))  # per-chunk phi(K)^T V
            before = constant(np.tri(nc, k=-1, dtype=np.float32), q)  # chunk c sums chunks < c
            prefix = mix(states.transpose(1, 2), before).transpose(1, 2)  # (BH, nc, D*(D+1))
            num = num + torch.bmm(q, prefix.reshape(BH * nc, D, D + 1))
        return first(num.reshape(BH, nc * C, D + 1), N)


@register_attention("lowrank")
class LowRankAttention(nn.Module):
    """Linformer: keys and values projected along the sequence to rank r, O(N*r).

    Bidirectional: K' = E[:, :N] K and V' = F[:, :N] V, shared by all heads.
    Causal: the sequence is cut into r segments of s = ceil(max_len / r)
    positions and slot n only pools segment n (E is masked block-diagonal).
    Query i sees the slots of finished segments plus a partial slot pooling
    its own segment up to i, so no future token leaks. With identity
    projections both modes equal full softmax attention.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.causal, self.eps, self.rank, self.max_len = cfg.causal, cfg.eps, cfg.rank, cfg.max_len
        self.seg = -(-cfg.max_len // cfg.rank)
        self.proj_k = nn.Parameter(torch.randn(cfg.rank, cfg.max_len) / math.sqrt(cfg.max_len))
        self.proj_v = nn.Parameter(torch.randn(cfg.rank, cfg.max_len) / math.sqrt(cfg.max_len))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, N, D = q.shape
        if N > self.max_len:
            raise ValueError(f"sequence length {N} exceeds the low-rank projection's max_len {self.max_len}")
        q, k, v = (t.reshape(B * H, N, D) for t in (q, k, v))
        q = q * D ** -0.5
        if not self.causal:
            k_r = mix(k.transpose(1, 2), first(self.proj_k, N)).transpose(1, 2)  # (BH, r, D)
            v_r = mix(v.transpose(1, 2), first(self.proj_v, N)).transpose(1, 2)  # (BH, r, D)
            out = torch.bmm(eps_softmax(torch.bmm(q, k_r.transpose(1, 2)), self.eps), v_r)
        else:
            out = self._causal(q, k, v)
        return out.reshape(B, H, N, D)

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def causal_masks(N: int, r: int, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segment membership (r, N), the visible-slot mask (N, r+1) and the within-segment (s, s) prefix."""
        seg_of = np.arange(N) // s
        block = (np.arange(r)[:, None] == seg_of[None, :]).astype(np.float32)  # (r, N) segment membership
        # (N, r+1): slots of segments before i's own, then the always-visible partial slot
        finished = additive_mask(np.concatenate([np.arange(r)[None, :] < seg_of[:, None], np.ones((N, 1), bool)], 1))
        return block, finished, np.tri(s, dtype=np.float32)

    def _causal(self, q, k, v):
        BH, N, D = q.shape
        r, s = self.rank, self.seg
        block, finished, tri = (constant(m, q) for m in self.causal_masks(N, r, s))
        proj_k, proj_v = first(self.proj_k, N) * block, first(self.proj_v, N) * block  # (r, N) block-diagonal
        k_r = mix(k.transpose(1, 2), proj_k).transpose(1, 2)  # (BH, r, D) whole-segment slots
        v_r = mix(v.transpose(1, 2), proj_v).transpose(1, 2)

        def partial(t, proj):  # (BH, N, D) -> (BH, N, D): sum over j <= i in i's segment of E[seg, j] t_j
            w = F.pad(proj, (0, r * s - N)).reshape(r, r, s).transpose(1, 2)  # (slot, offset, segment)
            # proj is block-diagonal, so summing over segments (a matmul with ones) keeps each slot's own.
            w = mix(w, constant(np.ones((1, r), np.float32), w)).transpose(1, 2)  # (r, 1, s)
            w = w * tri  # (r, s, s): row a pools offsets <= a
            # Rows past N meet zero weights in w and are dropped after, so copies fill them.
            t = _fill_rows(t, r * s - N).reshape(BH, r, s, D).permute(1, 2, 0, 3).reshape(r, s, BH * D)
            t = torch.bmm(w, t)  # (r, s, BH*D)
            return first(t.reshape(r * s, BH, D).permute(1, 0, 2), N)

        k_p, v_p = partial(k, proj_k), partial(v, proj_v)  # (BH, N, D)
        ones = constant(np.ones((1, D), np.float32), q)
        s_own = mix(q * k_p, ones)  # (BH, N, 1) score of the partial slot
        s_done = torch.bmm(q, k_r.transpose(1, 2))  # (BH, N, r)
        # The mask is added after the cat, so no -inf ever reaches an op a quantizer may observe.
        p = eps_softmax(torch.cat([s_done, s_own], dim=2) + finished, self.eps)
        return torch.bmm(p[:, :, :r], v_r) + p[:, :, r:] * v_p


@register_attention("hybrid")
class HybridAttention(nn.Module):
    """Local heads (exact short range) beside linear heads (cheap long range) in one layer.

    The first ceil(H/2) heads use local attention, the rest linear attention;
    both keep O(N) cost.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_local = -(-cfg.n_heads // 2)
        self.local, self.linear = LocalAttention(cfg), LinearAttention(cfg)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h = self.n_local
        local = self.local(q[:, :h], k[:, :h], v[:, :h])  # (B, h, N, D)
        linear = self.linear(q[:, h:], k[:, h:], v[:, h:])  # (B, H-h, N, D)
        return torch.cat([local, linear], dim=1)


# -----------------------------------------------------------------------------
# Blocks


class LayerNorm(nn.Module):
    """LayerNorm that exports as mean/rsqrt, which XNNPACK delegates (its layer_norm is missing)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _exporting():
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return self.explicit(x)

    def explicit(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        x4 = x.reshape(B, N, C, 1)  # XNNPACK delegates mean only over dims [2, 3] of a 4-D tensor
        centred = x4 - x4.mean(dim=[2, 3], keepdim=True)
        var = (centred * centred).mean(dim=[2, 3], keepdim=True)
        return (centred * torch.rsqrt(var + self.eps)).reshape(B, N, C) * self.weight + self.bias


class MultiHeadAttention(nn.Module):
    """Projections around one attention kind."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.n_heads, self.d_model = cfg.n_heads, cfg.d_model
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.core = ATTENTION[kind](cfg)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H, D = self.n_heads, C // self.n_heads
        qkv = self.qkv(x)  # (B, N, 3C); slices, not split, lower to XNNPACK
        # (B, H, N, D) each
        q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, N, H, D).permute(0, 2, 1, 3) for i in range(3))
        y = self.core(q, k, v).permute(0, 2, 1, 3).reshape(B, N, C)
        return self.out(y)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        d_ff = cfg.d_ff or 4 * cfg.d_model
        self.ln_attn, self.ln_mlp = LayerNorm(cfg.d_model), LayerNorm(cfg.d_model)
        self.attn = MultiHeadAttention(cfg, kind)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, d_ff), nn.GELU(), nn.Linear(d_ff, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x)))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class LearnedPosition(nn.Module):
    """A trainable table: one vector per position up to max_len."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.table = nn.Parameter(torch.randn(cfg.max_len, cfg.d_model) * 0.02)

    def forward(self, N: int) -> torch.Tensor:
        if N > self.table.shape[0]:
            raise ValueError(f"sequence length {N} exceeds the learned position table ({self.table.shape[0]}): "
                             "use position='sinusoidal' or a larger max_len")
        return self.table[:N]  # (N, C)


class SinusoidalPosition(nn.Module):
    """sin(t * freq + phase) with trainable frequencies and phases, defined for any length.

    Initialised to the classic sin/cos pairs (phase pi/2 is cos).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.d_model
        pair = torch.arange(C) // 2
        self.freq = nn.Parameter(torch.exp(-math.log(10000.0) * 2 * pair / C))
        self.phase = nn.Parameter((torch.arange(C) % 2) * (math.pi / 2))

    def forward(self, N: int) -> torch.Tensor:
        t = constant(np.arange(N, dtype=np.float32)[:, None], self.freq)  # (N, 1)
        return torch.sin(t * self.freq + self.phase)  # (N, C)


class DiffTransformer(nn.Module):
    """Pre-LayerNorm Transformer encoder with a classification or causal-LM head.

    Input: (B, N) int64 token ids, or (B, N, F) float features.
    Output: (B, n_outputs) logits for "classify", (B, N, n_outputs) for "lm".
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.vocab_size is not None:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        else:
            self.embed = nn.Linear(cfg.input_dim, cfg.d_model)
        self.position = LearnedPosition(cfg) if cfg.position == "learned" else SinusoidalPosition(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_kinds())
        self.ln_out = LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_outputs)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[1]
        h = self.drop(self.embed(x) + self.position(N))  # (B, N, C)
        for block in self.blocks:
            h = block(h)
        h = self.ln_out(h)
        if self.cfg.head == "lm":
            return self.head(h)  # (B, N, n_outputs)
        # Mean over the sequence as a matmul with a constant 1/N vector: XNNPACK refuses sum.
        pooled = mix(h.transpose(1, 2), constant(np.full((1, N), 1.0 / N, np.float32), h))  # (B, C, 1)
        return self.head(pooled.reshape(-1, self.cfg.d_model))  # (B, n_outputs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
