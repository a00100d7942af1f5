"""Training under ``torchrun``: where this process sits, its device, and DistributedDataParallel around the model.

Without torchrun the world is one process and every step here does nothing,
so ``difftx_edge.train`` runs the same code either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """Where this process sits in a torchrun job (world 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The device ``--device`` names (auto, cpu or cuda): this process's own GPU under torchrun.

        Raises:
            ValueError: cuda is asked for and torch sees no CUDA GPU.
        """
        if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise ValueError("device cuda asked for, but torch sees no CUDA GPU: use --device cpu")
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def start(self, device: torch.device) -> None:
        """Join the torchrun job's process group (NCCL on GPUs, gloo on CPUs)."""
        if self.world > 1:
            import torch.distributed as tdist

            tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` in DistributedDataParallel, which averages the gradients across processes."""
        if self.world == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                         else None)

    def finish(self) -> None:
        """Wait for every process, then leave the process group."""
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()
            tdist.destroy_process_group()
