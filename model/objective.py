"""What a training trains, for the loop in ``model.train``: its ``TrainingObjective`` (the model,
each rank's ``Batch`` es, the loss, validation, the export), the ``TrainingCallback`` it reports
through, and the ``TrainResult`` it returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn

from gptflow.data.store import ArtifactStore
from gptflow.model.config import TrainConfig
from gptflow.model.distributed import Ranks
from gptflow.model.gpt import GPT


@dataclass
class Batch:
    """One rank's micro-batch."""

    inputs: torch.Tensor
    """(B, T) token ids; fine-tuning's are padded on the right."""
    targets: torch.Tensor
    """(B, T) next-token targets (tagging: tag indices), -1 where not trained; classification: (B,) class indices."""
    real_tokens: int
    """Tokens that are not padding: what throughput counts."""
    lengths: torch.Tensor | None = None
    """Classification: (B,) real tokens per row."""
    loss_scale: float = 1.0
    """The weight of this rank's mean loss in the mean over the global micro-batch, times the
    world size: its targets over the mean targets per rank. Gradients averaged over the ranks then
    follow the mean over all the micro-batch's targets, as one process would take it, also when
    ranks hold different numbers of them (fine-tuning's responses vary in length)."""

    def to(self, device: torch.device) -> Batch:
        def moved(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device, non_blocking=True)

        return Batch(moved(self.inputs), moved(self.targets), self.real_tokens,
                     moved(self.lengths) if self.lengths is not None else None, self.loss_scale)


class TrainingObjective(ABC):
    """What the loop trains and on what: the model, each rank's batches, the loss, validation and
    the exported result."""

    validates_before_training: ClassVar[bool] = False
    """Also validate before the first step (fine-tuning: the base model's score, step 0)."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A new model on the CPU (the same weights on any device), its random parts drawn from
        torch's global RNG, which the loop seeds first."""

    @abstractmethod
    def trunk(self, model: nn.Module) -> GPT:
        """The GPT in ``model``: its transformer blocks are FSDP's units, its FLOPs are MFU's."""

    @abstractmethod
    def batches(self, seed: int, first_sequence: int, steps: range, accum_steps: int, micro_batch_size: int,
                ranks: Ranks, pin_memory: bool) -> Iterator[Batch]:
        """This rank's share of every micro-batch of ``steps``, in order. The global micro-batches
        (N·B sequences for N ranks) take consecutive positions of the objective's endless order of
        sequences, the first from ``first_sequence``; each rank takes a fixed slice of each, so
        the sequences of a step are a pure function of (seed, position) at any world size."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The mean loss of ``batch`` under ``model`` (possibly wrapped by DDP or ``torch.compile``)."""

    @abstractmethod
    def validate(self, model: nn.Module, train_config: TrainConfig, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> dict[str, float]:
        """Validation metrics by name (``loss`` among them); empty without validation data. Every
        rank calls it (a sharded model's forward needs them all)."""

    def start_fresh(self, model: nn.Module, optimizer: torch.optim.Optimizer, artifacts: ArtifactStore) -> None:
        """Prepare a run that starts at step 0 rather than resuming (nothing by default)."""

    @abstractmethod
    def export(self, model: nn.Module, run_dir: Path, artifacts: ArtifactStore) -> None:
        """Commit the trained ``model`` (whole, on rank 0 alone) to ``run_dir/final`` and whatever
        belongs beside it."""


class TrainingCallback(Protocol):
    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Called after optimizer step ``step`` (1-based) with the metrics measured there."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """Called once the checkpoint of ``step`` is committed at ``path``."""

    def on_resume(self, step: int, path: Path) -> None:
        """Called before the first step when training continues from the checkpoint ``path``."""

    def on_unusable_checkpoint(self, path: Path, error: Exception, fallback: Path | None) -> None:
        """Called when the checkpoint ``path`` cannot be loaded; ``fallback`` (an older checkpoint)
        is tried next, or training starts from step 0 when it is None."""


@dataclass
class TrainResult:
    final_dir: Path
    """``run_dir/final``: model.safetensors + config.json, loadable with ``load_model``."""
    steps: int
    """Optimizer steps the exported model has taken."""
    tokens_seen: int
    """Training tokens consumed over the whole run, resumed parts included (padding left out)."""
    final_train_loss: float | None
    """Mean training loss over the last report interval; None if no step ran in this call."""
    final_val_loss: float | None
    """Validation loss after the last step; None without validation data."""
    elapsed_s: float
    """Wall time of this call (a resumed run counts only its own part)."""
    resumed_from_step: int | None
    """Step of the checkpoint this call continued from; None for a fresh start."""
    peak_memory_bytes: int | None
    """Peak CUDA memory allocated by tensors; None off CUDA."""
    trainable_parameters: int
    total_parameters: int
    precision: str
    """What the steps computed in: ``bfloat16`` (autocast) or ``float32`` (``model.device.precision_name``)."""
    initial_val: dict[str, float] = field(default_factory=dict)
    """Validation metrics before the first step, for objectives that take them."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "final_dir": str(self.final_dir)}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> TrainResult:
        return cls(**{**value, "final_dir": Path(value["final_dir"])})
