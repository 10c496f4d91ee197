"""Data parallelism across the processes that ``torchrun`` starts: one device per rank.

With ``train.parallelism=ddp`` every rank holds the whole model; with ``fsdp`` (``shard_model``)
each holds a shard of every parameter, gradient and optimizer state, all-gathered per transformer
block for its forward and backward. Either way, each micro-step, rank ``r`` trains on its slice
of one global batch (see ``data.loader.rank_positions``) and the gradients are
averaged over the ranks, so N processes with micro-batch B take the same steps as one process
with micro-batch N·B. Rank 0 alone logs and commits checkpoints; the others wait for it at
barriers (with fsdp, every rank writes its shards of a checkpoint and evaluates its part).

With fsdp, every rank builds the same whole model from the seed, then ``shard_model`` keeps its
shards (FSDP2's ``fully_shard`` on each transformer block, then the root) before the optimizer is
built, so AdamW holds DTensor shards; gradient clipping reduces the norm over the ranks
(``clip_grad_norm_``), and the final model is gathered to rank 0 (``gather_full_model``) and
written as the same ``model.safetensors`` as ever. Muon is refused with fsdp
(``model.config.TrainConfig``): it orthogonalises whole matrices.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from gptflow.model.gpt import GPT

ModelType = TypeVar("ModelType", bound=torch.nn.Module)


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

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over ranks."""
        if not self.is_distributed:
            return value
        total = value.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over ranks (gloo has no AVG reduction, hence SUM / N)."""
        return self.sum(value) / self.world_size if self.is_distributed else value


def shard_model(model: ModelType, device: torch.device, trunk: GPT | None = None) -> ModelType:
    """Shard ``model`` in place over all ranks with FSDP2: one unit per transformer block of its
    GPT ``trunk`` (default: the model itself; the GPT under a task head), whose parameters are
    all-gathered just for its forward and backward, then the root (embeddings, final norm, output
    projection or head). Build the optimizer after this: it must hold the shards."""
    # bf16 compute halves the all-gather and activation traffic; gradients are reduced in fp32
    # so averaging over many ranks loses no precision. On CPU everything stays float32.
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in (trunk or model).transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def clip_grad_norm_(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of ``model`` to ``max_norm``; returns the norm before clipping,
    a plain tensor also when the gradients are shards (its norm is then reduced over the ranks)."""
    parameters = [parameter for parameter in model.parameters() if parameter.grad is not None]
    total_norm = torch.nn.utils.get_total_norm([parameter.grad for parameter in parameters])
    if isinstance(total_norm, DTensor):
        total_norm = total_norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm


def gather_full_model(model: ModelType, is_main: bool, build: Callable[[], ModelType]) -> ModelType | None:
    """The whole of a sharded ``model`` as a plain model on the CPU of rank 0 (None on the others),
    its weights loaded into what ``build`` returns (a new model of the same architecture); every
    rank must call this, since the parameters are gathered from all of them."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    full = build()
    full.load_state_dict(state)
    return full
