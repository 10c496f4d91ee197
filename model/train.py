"""The training loop of pretraining and fine-tuning: resumable, deterministic, reporting through a
callback.

What a run trains on and how it is scored is its ``TrainingObjective``: ``PretrainObjective``
(next-token prediction on token shards) here, ``model.finetune.FinetuneObjective`` (sft,
classification) beside it. Everything else is the same for both: the step (micro-steps with
gradient accumulation, clipping, the learning-rate schedule), DDP or FSDP over ``torchrun``'s ranks,
``torch.compile``, periodic checkpoints and resume, throughput and MFU.

Every random stream is a function of ``(seed, step)``: initial weights come from ``seed``, batches
from ``(seed, step, micro_step)`` (see ``data.loader`` and ``model.finetune.example_indices``),
dropout from ``(seed, step)``. A checkpoint therefore needs only weights, optimizer state and the
step to continue exactly, and on CPU a run killed at any moment and resumed ends with the same bits
as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.nn.parallel import DistributedDataParallel

from gptflow.data.commits import discard_contents
from gptflow.data.loader import MixedWindows, TokenWindows, prefetch_batches
from gptflow.data.mixture import MixturePart
from gptflow.data.store import LOCAL_STORE, ArtifactStore
from gptflow.model.checkpoint import (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    TrainerState,
    checkpoint_directories,
    checkpoint_path,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    save_checkpoint,
    save_final,
    save_sharded_checkpoint,
)
from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.device import autocast, peak_flops, resolve_autocast_dtype, resolve_device
from gptflow.model.distributed import Ranks, clip_grad_norm_, gather_full_model, is_sharded, shard_model
from gptflow.model.evaluate import evaluate_loss
from gptflow.model.gpt import GPT
from gptflow.model.optim import build_optimizer, learning_rate_at

# Leading entropy word that keeps the dropout stream apart from the data stream of the same step.
DROPOUT_STREAM = 0x64726F70


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
    def batches(self, seed: int, steps: range, accum_steps: int, micro_batch_size: int, ranks: Ranks,
                pin_memory: bool) -> Iterator[Batch]:
        """This rank's share of every micro-batch of ``steps``, in order: rank ``r`` of N takes rows
        ``r·B .. (r+1)·B`` of the global micro-batch of N·B, a pure function of (seed, step, micro-step)."""

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


@dataclass(frozen=True)
class Continuation:
    """Continue a trained model on a grown corpus instead of starting from random weights."""

    checkpoint: Path
    """A checkpoint of the earlier run: its weights and optimizer state are the starting point
    (the learning-rate schedule starts over: warmup, then decay over this run's steps)."""
    new_train_paths: Sequence[Path]
    """Token shards added since that run; ``train_paths`` holds the ones it already saw."""
    new_data_fraction: float
    """Share of training windows drawn from the new shards; the rest replays the old ones."""


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
    initial_val: dict[str, float] = field(default_factory=dict)
    """Validation metrics before the first step, for objectives that take them."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "final_dir": str(self.final_dir)}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> TrainResult:
        return cls(**{**value, "final_dir": Path(value["final_dir"])})


@dataclass
class PretrainObjective(TrainingObjective):
    """Next-token prediction on token shards, from random weights, from a trained model's weights
    (``initial_weights``) or continuing a checkpoint."""

    model_config: ModelConfig
    train_paths: Sequence[Path]
    val_paths: Sequence[Path]
    continuation: Continuation | None = None
    mixture: Sequence[MixturePart] = ()
    initial_weights: Path | None = None
    """A model directory (``final/``, an import) whose weights, not optimizer state, step 0 starts from."""

    def __post_init__(self) -> None:
        self.train_windows = _training_windows(self.train_paths, self.continuation, self.mixture, self.model_config)
        self.val_windows = (TokenWindows(self.val_paths, self.model_config.block_size, self.model_config.vocab_size)
                            if self.val_paths else None)

    def build_model(self) -> GPT:
        return GPT(self.model_config)

    def trunk(self, model: nn.Module) -> GPT:
        return model

    def batches(self, seed: int, steps: range, accum_steps: int, micro_batch_size: int, ranks: Ranks,
                pin_memory: bool) -> Iterator[Batch]:
        for inputs, targets in prefetch_batches(self.train_windows, seed, steps, accum_steps, micro_batch_size,
                                                ranks.rank, ranks.world_size, pin_memory=pin_memory):
            yield Batch(inputs, targets, inputs.numel())

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch.inputs, batch.targets, return_logits=False)[1]

    def validate(self, model: nn.Module, train_config: TrainConfig, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> dict[str, float]:
        if self.val_windows is None:
            return {}
        loss, _ = evaluate_loss(model, self.val_windows, train_config.val_tokens, train_config.micro_batch_size,
                                device, autocast_dtype)
        return {"loss": loss}

    def start_fresh(self, model: nn.Module, optimizer: torch.optim.Optimizer, artifacts: ArtifactStore) -> None:
        if self.continuation is not None:
            load_checkpoint(self.continuation.checkpoint, model, optimizer, artifacts)
        elif self.initial_weights is not None:
            initial = load_model(self.initial_weights, artifacts=artifacts)
            if initial.config != self.model_config:
                raise ValueError(f"{self.initial_weights} holds a model of config {initial.config}, not "
                                 f"{self.model_config}: train with the model's own settings")
            set_model_state_dict(model, initial.state_dict(), options=StateDictOptions(full_state_dict=True))

    def export(self, model: nn.Module, run_dir: Path, artifacts: ArtifactStore) -> None:
        save_final(run_dir, model, artifacts)


def run_pretraining(
    model_config: ModelConfig,
    train_config: TrainConfig,
    train_paths: Sequence[Path],
    val_paths: Sequence[Path],
    run_dir: Path,
    callback: TrainingCallback | None = None,
    resume: bool = False,
    continuation: Continuation | None = None,
    mixture: Sequence[MixturePart] = (),
    initial_weights: Path | None = None,
    artifacts: ArtifactStore = LOCAL_STORE,
) -> TrainResult:
    """Train a GPT on the token shards ``train_paths`` (see ``train``), validating on up to
    ``val_tokens`` tokens in windows spread over all of ``val_paths`` (skipped when empty).

    A fresh start begins from random weights, from the model in ``initial_weights`` (its weights;
    the optimizer starts afresh), or from ``continuation``'s checkpoint, sampling its new shards
    at its ``new_data_fraction``. With ``mixture`` (a data mixture, never with a
    continuation), each part's shards are drawn at its probability instead of ``train_paths`` as one stream.
    """
    objective = PretrainObjective(model_config, train_paths, val_paths, continuation, mixture, initial_weights)
    return train(objective, train_config, run_dir, callback, resume, artifacts)


def train(
    objective: TrainingObjective,
    train_config: TrainConfig,
    run_dir: Path,
    callback: TrainingCallback | None = None,
    resume: bool = False,
    artifacts: ArtifactStore = LOCAL_STORE,
) -> TrainResult:
    """Train ``objective``'s model as ``train_config`` says, checkpointing into ``run_dir``, and
    export it to ``run_dir/final``; checkpoints and export are read and committed through ``artifacts``.

    ``resume=True`` continues from the latest checkpoint of ``run_dir`` that loads: one that does not
    (altered, or another model's) is reported through the callback, discarded and the one before it
    tried; with none left, training starts from step 0. ``resume=False`` deletes the run's
    checkpoints and export first. Validation runs every ``val_interval`` steps and after the last
    one. Seeds torch's global RNG.

    Under ``torchrun`` with ``train.nproc`` processes, trains data-parallel (``model.distributed``):
    every rank calls this function with the same arguments; rank 0 reports and writes. With
    ``train.parallelism=fsdp`` the model is sharded over the ranks and so are its checkpoints.
    """
    ranks = Ranks.from_environment()
    if ranks.world_size != train_config.nproc:
        raise ValueError(
            f"train.nproc is {train_config.nproc} but this process is one of {ranks.world_size} "
            f"(WORLD_SIZE): launch it with torchrun --nproc_per_node {train_config.nproc}, as the pretrain task does"
        )
    device = ranks.device(resolve_device(train_config.device))
    joined = ranks.join(device)
    try:
        return _train(objective, train_config, Path(run_dir), callback if ranks.is_main else None, resume, ranks,
                      device, artifacts)
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _train(
    objective: TrainingObjective,
    train_config: TrainConfig,
    run_dir: Path,
    callback: TrainingCallback | None,
    resume: bool,
    ranks: Ranks,
    device: torch.device,
    artifacts: ArtifactStore,
) -> TrainResult:
    started = time.perf_counter()
    autocast_dtype = resolve_autocast_dtype(train_config.dtype, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls autocast leaves
        torch.cuda.reset_peak_memory_stats(device)

    sharded = train_config.parallelism == "fsdp" and ranks.is_distributed
    model, optimizer = _initial_model(objective, train_config, device, sharded)
    restored = None
    if resume:
        checkpoints = checkpoint_directories(run_dir, artifacts)
        restored = _restore_latest_loadable(checkpoints, model, optimizer, callback, ranks, artifacts)
        if checkpoints and restored is None:
            # Each one failed to load, possibly after writing part of itself into them.
            model, optimizer = _initial_model(objective, train_config, device, sharded)
    else:
        _delete_checkpoints_and_export(run_dir, ranks)
    if restored is None:
        objective.start_fresh(model, optimizer, artifacts)
    start_step = restored.step if restored else 0
    tokens_seen = restored.tokens_seen if restored else 0
    initial_val = restored.initial_val if restored else {}
    if objective.validates_before_training and restored is None:
        initial_val = objective.validate(model, train_config, device, autocast_dtype)
        if callback and initial_val:
            callback.on_metrics(0, _prefixed("val", initial_val))
    parallel_model = DistributedDataParallel(model) if ranks.is_distributed and not sharded else model
    step_model = torch.compile(parallel_model) if train_config.compile else parallel_model

    accum_steps = train_config.grad_accum_steps
    flops_per_token = objective.trunk(model).flops_per_token()
    device_peak_flops = peak_flops(device)
    # Losses and gradient norms are summed on the device and read once per report, so steps in
    # between never wait for the GPU.
    loss_sum = torch.zeros((), device=device)
    grad_norm_sum = torch.zeros((), device=device)
    # This rank's real tokens not yet summed over the ranks into tokens_seen.
    uncounted_tokens = 0
    steps_since_report, tokens_since_report, paused_s = 0, 0, 0.0
    report_clock = time.perf_counter()
    final_train_loss = None
    final_val: dict[str, float] = {}
    batches = objective.batches(train_config.seed, range(start_step, train_config.max_steps), accum_steps,
                                train_config.micro_batch_size, ranks, pin_memory=device.type == "cuda")
    model.train()
    for step in range(start_step, train_config.max_steps):
        taken = take_step(objective.loss, model, step_model, parallel_model, optimizer, batches, step, train_config,
                          device, autocast_dtype)
        loss_sum += taken.loss_sum
        grad_norm_sum += taken.grad_norm
        uncounted_tokens += taken.real_tokens
        learning_rate = taken.learning_rate
        steps_done = step + 1
        steps_since_report += 1
        is_last = steps_done == train_config.max_steps
        report_now = steps_done % train_config.log_interval == 0 or is_last
        evaluate_now = (train_config.val_interval and steps_done % train_config.val_interval == 0) or is_last
        checkpoint_now = steps_done % train_config.checkpoint_interval == 0 or is_last

        metrics: dict[str, float] = {}
        if report_now or checkpoint_now:
            counted = int(ranks.sum(torch.tensor(uncounted_tokens, dtype=torch.float64, device=device)).item())
            tokens_seen += counted
            tokens_since_report += counted
            uncounted_tokens = 0
        if report_now:
            final_train_loss = ranks.mean(loss_sum).item() / (steps_since_report * accum_steps)
            now = time.perf_counter()
            tokens_per_sec = tokens_since_report / (now - report_clock - paused_s)
            metrics.update(
                {
                    "train/loss": final_train_loss,
                    "train/lr": learning_rate,
                    "train/grad_norm": grad_norm_sum.item() / steps_since_report,
                    "train/tokens_per_sec": tokens_per_sec,
                    "train/tokens": float(tokens_seen),
                    "train/elapsed_s": now - started,
                }
            )
            if device_peak_flops:
                metrics["train/mfu"] = flops_per_token * tokens_per_sec / device_peak_flops
            loss_sum.zero_()
            grad_norm_sum.zero_()
            steps_since_report, tokens_since_report, report_clock, paused_s = 0, 0, now, 0.0
        if evaluate_now or checkpoint_now:
            # Timed from an idle device, so throughput counts training alone.
            _wait_for(device)
            pause_started = time.perf_counter()
            if evaluate_now:
                final_val = objective.validate(model, train_config, device, autocast_dtype)
                metrics.update(_prefixed("val", final_val))
            if checkpoint_now:
                checkpoint = checkpoint_path(run_dir, steps_done)
                state = TrainerState(steps_done, tokens_seen, train_config.seed, asdict(train_config), initial_val)
                if sharded:
                    save_sharded_checkpoint(run_dir, model, optimizer, state, ranks.is_main, artifacts)
                elif ranks.is_main:
                    save_checkpoint(run_dir, model, optimizer, state, artifacts)
                if ranks.is_main:
                    prune_checkpoints(run_dir, train_config.keep_checkpoints, artifacts)
                ranks.barrier()
            paused_s += time.perf_counter() - pause_started
        if callback and metrics:
            callback.on_metrics(steps_done, metrics)
        if callback and checkpoint_now:
            callback.on_checkpoint(steps_done, checkpoint)

    if start_step >= train_config.max_steps:
        # Resumed from the last step's checkpoint (killed while exporting): score what is exported.
        final_val = objective.validate(model, train_config, device, autocast_dtype)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    if sharded:
        trainable, total = (int(ranks.sum(torch.tensor(count, device=device)).item()) for count in (trainable, total))
    # Downstream (evaluation, export, MLflow) reads one model.safetensors, whatever the parallelism.
    exported = gather_full_model(model, ranks.is_main, objective.build_model) if sharded else model
    if ranks.is_main:
        exported.eval()
        objective.export(exported, run_dir, artifacts)
    ranks.barrier()
    return TrainResult(
        final_dir=run_dir / FINAL_DIR,
        steps=max(start_step, train_config.max_steps),
        tokens_seen=tokens_seen,
        final_train_loss=final_train_loss,
        final_val_loss=final_val.get("loss"),
        elapsed_s=time.perf_counter() - started,
        resumed_from_step=restored.step if restored else None,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        trainable_parameters=trainable,
        total_parameters=total,
        initial_val=initial_val,
    )


@dataclass
class TakenStep:
    loss_sum: torch.Tensor
    """The micro-steps' mean losses summed, on the device (reading it waits for the device)."""
    grad_norm: torch.Tensor
    """The gradient norm before clipping, on the device."""
    real_tokens: int
    """This rank's tokens that are not padding."""
    learning_rate: float


def take_step(
    loss_of: Callable[[nn.Module, Batch], torch.Tensor],
    model: nn.Module,
    step_model: nn.Module,
    parallel_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    step: int,
    train_config: TrainConfig,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> TakenStep:
    """Optimizer step ``step`` (0-based): the schedule's learning rate, ``grad_accum_steps``
    micro-batches of ``batches`` with their gradients accumulated, clipping, the update. ``model``
    is the bare (or sharded) model, ``parallel_model`` it under DDP, ``step_model`` that compiled;
    ``loss_of`` is the objective's loss. No host syncs: nothing waits for the device."""
    learning_rate = learning_rate_at(step, train_config)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    torch.manual_seed(_dropout_seed(train_config.seed, step))
    accum_steps = train_config.grad_accum_steps
    loss_sum = torch.zeros((), device=device)
    real_tokens = 0
    for micro_step in range(accum_steps):
        batch = next(batches).to(device)
        # Gradients are averaged across ranks once per step, on the last micro-step.
        with _gradient_sync(parallel_model, micro_step == accum_steps - 1):
            with autocast(device, autocast_dtype):
                loss = loss_of(step_model, batch) * batch.loss_scale
            (loss / accum_steps).backward()
        loss_sum += loss.detach()
        real_tokens += batch.real_tokens
    grad_norm = clip_grad_norm_(model, train_config.grad_clip or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return TakenStep(loss_sum, grad_norm, real_tokens, learning_rate)


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{name}": value for name, value in metrics.items()}


def _training_windows(
    train_paths: Sequence[Path],
    continuation: Continuation | None,
    mixture: Sequence[MixturePart],
    model_config: ModelConfig,
) -> TokenWindows | MixedWindows:
    block_size, vocab_size = model_config.block_size, model_config.vocab_size
    if mixture:
        if continuation is not None:
            raise ValueError("a data mixture trains from scratch: continuing a model mixes old and new data instead")
        return MixedWindows([(TokenWindows(part.train_paths, block_size, vocab_size), part.probability)
                             for part in mixture])
    if continuation is None or not continuation.new_train_paths:
        return TokenWindows(train_paths, block_size, vocab_size)
    new = TokenWindows(continuation.new_train_paths, block_size, vocab_size)
    if not train_paths:
        return new
    old = TokenWindows(train_paths, block_size, vocab_size)
    return MixedWindows([(old, 1.0 - continuation.new_data_fraction), (new, continuation.new_data_fraction)])


def _initial_model(
    objective: TrainingObjective, train_config: TrainConfig, device: torch.device, sharded: bool
) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(train_config.seed)
    model = objective.build_model().to(device)
    if sharded:
        # Every rank initialised the same whole model from the seed and keeps its shards of it.
        model = shard_model(model, device, objective.trunk(model))
    return model, build_optimizer(model, train_config, device)


def _restore_latest_loadable(
    checkpoints: Sequence[Path],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    callback: TrainingCallback | None,
    ranks: Ranks,
    artifacts: ArtifactStore,
) -> TrainerState | None:
    """Load the newest of ``checkpoints`` (oldest first) that loads; None when none does."""
    newest_first = list(reversed(checkpoints))
    for checkpoint, fallback in zip(newest_first, [*newest_first[1:], None]):
        try:
            state = load_checkpoint(checkpoint, model, optimizer, artifacts)
        # What load_checkpoint refuses (altered bytes, another model config, another optimizer's
        # state) is never usable under this run; an older checkpoint or step 0 gives the same
        # training. Errors of the machine (I/O, device memory) propagate: the checkpoint may be fine.
        except (ValueError, KeyError) as error:
            if ranks.is_main:
                # No longer listed, so the step's next save replaces it instead of keeping it.
                discard_contents(checkpoint)
            if callback:
                callback.on_unusable_checkpoint(checkpoint, error, fallback)
            continue
        if callback:
            callback.on_resume(state.step, checkpoint)
        return state
    return None


def _delete_checkpoints_and_export(run_dir: Path, ranks: Ranks) -> None:
    if ranks.is_main:
        for name in (CHECKPOINTS_DIR, FINAL_DIR):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    ranks.barrier()


def _gradient_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` on all but the last micro-step: one all-reduce per optimizer step (FSDP:
    one reduce-scatter, the micro-steps before it accumulating whole gradients)."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _wait_for(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dropout_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([DROPOUT_STREAM, seed, step]).generate_state(1, np.uint64)[0])
