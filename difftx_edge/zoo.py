"""Models difftx-edge did not write, built from configs in code (never downloaded): what users bring to ``convert``.

The compatibility benchmark (``benchmarks/foreign_models.py``) and the tests of
``convert``'s rewrites and int8 path run these. Each builder returns
``(model in eval mode, example input of batch 1)``; the sizes are arguments, so
tests build tiny ones and the benchmark the sizes its table names. The HF
models need ``transformers`` (in the ``test`` extra), imported when built.

torchvision's ``mobilenet_v3_small`` is not here: no torchvision release
installs beside torch 2.13's CPU wheel (0.28 fails to import its operators,
0.29 needs torch 2.14). HF's MobileNetV2, built from its config, stands in as
the convolutional image model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class EncoderClassifier(nn.Module):
    """Token ids -> ``nn.TransformerEncoder`` (PyTorch's own layers) -> mean over tokens -> class logits."""

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int, classes: int, max_len: int,
                 norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(1, max_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=norm_first, activation="gelu")
        # enable_nested_tensor would take the fast path's nested tensors, which torch.export cannot trace.
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d_model) if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, N) int64
        x = self.embed(ids) + self.pos[:, :ids.shape[1]]  # (B, N, D)
        return self.head(self.encoder(x).mean(dim=1))  # (B, classes)


class RecurrentClassifier(nn.Module):
    """Token ids -> embedding -> GRU or LSTM -> last state -> class logits."""

    def __init__(self, vocab: int, hidden: int, classes: int, cell: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell](hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, N) int64
        out, _ = self.rnn(self.embed(ids))  # (B, N, H)
        return self.head(out[:, -1])


class ConvClassifier(nn.Module):
    """Token ids -> embedding -> two 1-D convolutions -> max over positions -> class logits."""

    def __init__(self, vocab: int, channels: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, channels)
        self.convs = nn.Sequential(nn.Conv1d(channels, channels, 5, padding=2), nn.ReLU(),
                                   nn.Conv1d(channels, channels, 5, padding=2), nn.ReLU())
        self.head = nn.Linear(channels, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, N) int64
        x = self.convs(self.embed(ids).transpose(1, 2))  # (B, C, N)
        return self.head(x.amax(dim=2))


class Logits(nn.Module):
    """An HF model's ``.logits``: torch.export and every runtime want a tensor, not a ModelOutput."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def _ids(vocab: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))


def encoder(d_model: int = 128, heads: int = 4, layers: int = 2, seq_len: int = 256, norm_first: bool = True,
            vocab: int = 1000, classes: int = 10):
    model = EncoderClassifier(vocab, d_model, heads, layers, classes, max(seq_len, 2048), norm_first)
    return model.eval(), _ids(vocab, seq_len)


def bert(hidden: int = 128, layers: int = 2, heads: int = 4, seq_len: int = 128, vocab: int = 1000,
         classes: int = 10):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=max(seq_len, 512), num_labels=classes)
    return Logits(BertForSequenceClassification(config)).eval(), _ids(vocab, seq_len)


def distilbert(hidden: int = 128, layers: int = 2, heads: int = 4, seq_len: int = 128, vocab: int = 1000,
               classes: int = 10):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=4 * hidden,
                              max_position_embeddings=max(seq_len, 512), num_labels=classes)
    return Logits(DistilBertForSequenceClassification(config)).eval(), _ids(vocab, seq_len)


def vit(hidden: int = 128, layers: int = 2, heads: int = 4, image_size: int = 64, patch_size: int = 8,
        classes: int = 10):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=3, hidden_size=hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
                       num_labels=classes)
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return Logits(ViTForImageClassification(config)).eval(), x


def mobilenet(image_size: int = 96, depth_multiplier: float = 0.35, classes: int = 10):
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config = MobileNetV2Config(image_size=image_size, depth_multiplier=depth_multiplier, num_labels=classes)
    model = MobileNetV2ForImageClassification(config)
    # HF initializes every conv with std 0.02 (its pretrained weights replace them): through 50-odd convs the
    # activations vanish and the logits come out near 1e-24, which makes parity vacuous and leaves int8 nothing
    # to quantize. He initialization (fan in) keeps the logits of order 1, as trained weights would.
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in",
                                    nonlinearity="relu" if isinstance(module, nn.Conv2d) else "linear")
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return Logits(model).eval(), x


def gru(hidden: int = 64, seq_len: int = 64, vocab: int = 5, classes: int = 4, cell: str = "gru"):
    return RecurrentClassifier(vocab, hidden, classes, cell).eval(), _ids(vocab, seq_len)


def cnn(channels: int = 64, seq_len: int = 128, vocab: int = 1000, classes: int = 10):
    return ConvClassifier(vocab, channels, classes).eval(), _ids(vocab, seq_len)


# name -> builder; "transformer" marks the models the partition targets of issue 17 hold for.
ZOO: dict[str, tuple[Callable, bool]] = {
    "encoder-prenorm": (lambda **kw: encoder(norm_first=True, **kw), True),
    "encoder-postnorm": (lambda **kw: encoder(norm_first=False, **kw), True),
    "bert": (bert, True),
    "distilbert": (distilbert, True),
    "vit": (vit, True),
    "mobilenet-v2": (mobilenet, False),
    "gru": (gru, False),
    "cnn-1d": (cnn, False),
}


def build(name: str, **sizes):
    """``(model, example)`` of zoo model ``name`` at ``sizes``; raises ValueError for an unknown name."""
    torch.manual_seed(0)  # the weights are random; the same every time
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}: use one of {', '.join(ZOO)}")
    return ZOO[name][0](**sizes)


def save(name: str, path, **sizes) -> None:
    """Export zoo model ``name`` with its example input and write it with ``torch.export.save``."""
    model, example = build(name, **sizes)
    torch.export.save(torch.export.export(model, (example,)), path)
