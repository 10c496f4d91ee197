"""Data parallelism across the processes that ``torchrun`` starts: one device per rank.

Every rank holds the whole model; each micro-step, rank ``r`` trains on its slice of one global
batch (see ``data.loader.TokenWindows.sample_batch``) and DDP averages the gradients, so N
processes with micro-batch B take the same steps as one process with micro-batch N·B. Rank 0
alone logs, evaluates and writes checkpoints; the others wait for it at barriers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Ranks:
        """This process's place in a ``torchrun`` launch; a plain process is rank 0 of 1."""
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """Each rank of a multi-GPU launch takes the GPU of its local rank."""
        if device.type == "cuda" and self.is_distributed:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def join(self, device: torch.device) -> bool:
        """Join the process group (NCCL on GPUs, gloo on CPUs); True if this call created it."""
        if not self.is_distributed or dist.is_initialized():
            return False
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return True

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over ranks (gloo has no AVG reduction, hence SUM / N)."""
        if not self.is_distributed:
            return value
        total = value.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.world_size
