"""Eager PyTorch, on the CPU and on CUDA when present: the baseline every exported format is measured against.

It runs a training run directory (``config.json`` + ``model.safetensors``),
not a bundle: eager PyTorch is what the artifacts were exported from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difftx_edge.runtimes.registry import register_runtime


@register_runtime("torch", format="torch", extra="all", requires=(("torch", "safetensors"),), devices=("cpu", "cuda"))
class TorchRunner:
    def __init__(self, path: str | Path, threads: int = 1, device: str = "cpu"):
        import torch

        from difftx_edge.io import load_run
        from difftx_edge.threads import pin_threads

        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("torch finds no CUDA device here: run the cuda target on a machine with an NVIDIA GPU "
                             "and a CUDA build of torch")
        pin_threads(threads)
        self.path, self.threads, self.device = Path(path), threads, device
        self.model, self.config = load_run(self.path, device)

    @staticmethod
    def import_runtime() -> None:
        import torch  # noqa: F401

        import difftx_edge.model  # noqa: F401

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            logits = self.model(*(torch.from_numpy(np.ascontiguousarray(x)).to(self.device) for x in inputs))
        return [logits.cpu().numpy()]  # .cpu() waits for the GPU, so a timed call includes the kernels

    def input_specs(self, seq_len: int, batch: int) -> list[dict]:
        """The input a bundle's manifest would describe, for this run at ``seq_len`` and ``batch``."""
        cfg = self.model.cfg
        limit = cfg.max_serving_len()
        if limit is not None and seq_len > limit:
            raise ValueError(f"sequence length {seq_len} is longer than this model serves ({limit}): "
                             f"choose --seq-lens up to {limit}")
        if cfg.vocab_size is not None:
            return [{"name": "x", "shape": [batch, seq_len], "dtype": "int64"}]
        return [{"name": "x", "shape": [batch, seq_len, cfg.input_dim], "dtype": "float32"}]

    def peak_device_memory_mb(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None

    def info(self) -> dict:
        import torch

        found = {"runtime": "torch", "version": torch.__version__, "threads": self.threads, "device": self.device}
        if self.device == "cuda":
            found["gpu"] = torch.cuda.get_device_name()
        return found
