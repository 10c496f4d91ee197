"""The training loop of pretraining and fine-tuning: resumable, deterministic, reporting through a
callback.

What a run trains on and how it is scored is its ``TrainingObjective``:
``model.pretraining.PretrainObjective`` (next-token prediction on token shards) or
``model.finetune.FinetuneObjective`` (sft, classification, tagging). Everything else is the same
for both: the step (micro-steps with gradient accumulation, clipping, the learning-rate schedule),
DDP or FSDP over ``torchrun``'s ranks, ``torch.compile``, periodic checkpoints and resume,
throughput and MFU.

Every random stream is a pure function: initial weights of ``seed``, batches of ``(seed, position)``
in the objective's endless order of sequences (see ``data.loader`` and
``model.finetune.example_indices``), dropout of ``(seed, step)``. A checkpoint therefore needs
only weights, optimizer state, the step and the sequences consumed (``TrainerState.sequences_seen``)
to continue exactly, at the same or another world size, and on CPU a run killed at any moment and
resumed ends with the same bits as an uninterrupted one.

Each step is ``take_step``: the schedule's learning rate, dropout seeded from ``(seed, step)``,
gradient accumulation with one all-reduce (DDP) or reduce-scatter (FSDP) per step, clipping, the
update, no host sync. Metrics, every ``log_interval`` steps through
``TrainingCallback.on_metrics``: ``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/tokens_per_sec``, ``train/tokens`` (summed over ranks, padding left out),
``train/elapsed_s``, ``train/mfu`` on a GPU, and the objective's ``val/*``; a resumed run with no
step left to take still validates once.

Resuming (``resume=True``, what the pretrain and finetune tasks do by default) loads the newest
checkpoint that loads and reports it (``on_resume``). One ``load_checkpoint`` refuses (altered
bytes, another model config or optimizer) is reported with the reason
(``on_unusable_checkpoint``), its ``contents.json`` discarded so the step's next save replaces it,
and the one before it tried; with none left, the model and optimizer are built again (a failed
load may have written part of itself into them) and training starts from step 0. Errors of the
machine (I/O, device memory) propagate instead: the checkpoint may be sound.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from gptflow.data.commits import discard_contents
from gptflow.data.store import LOCAL_STORE, ArtifactStore
from gptflow.model.checkpoint import (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    TrainerState,
    checkpoint_directories,
    checkpoint_path,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_sharded_checkpoint,
)
from gptflow.model.config import TrainConfig
from gptflow.model.device import autocast, peak_flops, precision_name, resolve_autocast_dtype, resolve_device
from gptflow.model.distributed import Ranks, clip_grad_norm_, gather_full_model, is_sharded, shard_model
from gptflow.model.objective import Batch, TrainingCallback, TrainingObjective, TrainResult
from gptflow.model.optim import build_optimizer, learning_rate_at

# Leading entropy word that keeps the dropout stream apart from the data stream of the same step.
DROPOUT_STREAM = 0x64726F70


def train(objective: TrainingObjective, train_config: TrainConfig, run_dir: Path,
          callback: TrainingCallback | None = None, resume: bool = False,
          artifacts: ArtifactStore = LOCAL_STORE) -> TrainResult:
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
    model, optimizer, restored = _start(objective, train_config, run_dir, callback, resume, ranks, device, sharded,
                                        artifacts)
    start_step = restored.step if restored else 0
    initial_val = restored.initial_val if restored else {}
    if objective.validates_before_training and restored is None:
        initial_val = objective.validate(model, train_config, device, autocast_dtype)
        if callback and initial_val:
            callback.on_metrics(0, _prefixed("val", initial_val))
    parallel_model = DistributedDataParallel(model) if ranks.is_distributed and not sharded else model
    step_model = torch.compile(parallel_model) if train_config.compile else parallel_model

    meter = _Meter(device, restored.tokens_seen if restored else 0,
                   objective.trunk(model).flops_per_token(), peak_flops(device))
    final_val: dict[str, float] = {}
    global_batch = train_config.micro_batch_size * train_config.grad_accum_steps * ranks.world_size
    first_sequence = _sequences_seen(restored, global_batch)
    batches = objective.batches(train_config.seed, first_sequence, range(start_step, train_config.max_steps),
                                train_config.grad_accum_steps, train_config.micro_batch_size, ranks,
                                pin_memory=device.type == "cuda")
    model.train()
    for step in range(start_step, train_config.max_steps):
        taken = take_step(objective.loss, model, step_model, parallel_model, optimizer, batches, step, train_config,
                          device, autocast_dtype)
        meter.add(taken)
        steps_done = step + 1
        is_last = steps_done == train_config.max_steps
        report_now = steps_done % train_config.log_interval == 0 or is_last
        evaluate_now = (train_config.val_interval and steps_done % train_config.val_interval == 0) or is_last
        checkpoint_now = steps_done % train_config.checkpoint_interval == 0 or is_last

        metrics: dict[str, float] = {}
        if report_now or checkpoint_now:
            meter.count_tokens(ranks)
        if report_now:
            metrics.update(meter.report(ranks, train_config.grad_accum_steps, started))
        if evaluate_now or checkpoint_now:
            with meter.paused():
                if evaluate_now:
                    final_val = objective.validate(model, train_config, device, autocast_dtype)
                    metrics.update(_prefixed("val", final_val))
                if checkpoint_now:
                    state = TrainerState(steps_done, meter.tokens_seen, train_config.seed, asdict(train_config),
                                         initial_val, first_sequence + (steps_done - start_step) * global_batch)
                    _save_checkpoint(run_dir, model, optimizer, state, sharded, ranks, train_config, artifacts)
        if callback and metrics:
            callback.on_metrics(steps_done, metrics)
        if callback and checkpoint_now:
            callback.on_checkpoint(steps_done, checkpoint_path(run_dir, steps_done))

    if start_step >= train_config.max_steps:
        # Resumed from the last step's checkpoint (killed while exporting): score what is exported.
        final_val = objective.validate(model, train_config, device, autocast_dtype)
    trainable, total = _parameter_counts(model, sharded, ranks, device)
    # Downstream (evaluation, export, MLflow) reads one model.safetensors, whatever the parallelism.
    exported = gather_full_model(model, ranks.is_main, objective.build_model) if sharded else model
    if ranks.is_main:
        exported.eval()
        objective.export(exported, run_dir, artifacts)
    ranks.barrier()
    return TrainResult(
        final_dir=run_dir / FINAL_DIR,
        steps=max(start_step, train_config.max_steps),
        tokens_seen=meter.tokens_seen,
        final_train_loss=meter.last_train_loss,
        final_val_loss=final_val.get("loss"),
        elapsed_s=time.perf_counter() - started,
        resumed_from_step=restored.step if restored else None,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        trainable_parameters=trainable,
        total_parameters=total,
        precision=precision_name(autocast_dtype),
        initial_val=initial_val,
    )


def _start(
    objective: TrainingObjective, train_config: TrainConfig, run_dir: Path, callback: TrainingCallback | None,
    resume: bool, ranks: Ranks, device: torch.device, sharded: bool, artifacts: ArtifactStore,
) -> tuple[nn.Module, torch.optim.Optimizer, TrainerState | None]:
    """The model and optimizer to train, and the state of the checkpoint they were restored from
    (None for a fresh start, which the objective prepares)."""
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
    return model, optimizer, restored


class _Meter:
    """What the loop counts between reports. Losses and gradient norms are summed on the device and
    read once per report, so steps in between never wait for the GPU."""

    def __init__(self, device: torch.device, tokens_seen: int, flops_per_token: float,
                 device_peak_flops: float | None) -> None:
        self.device = device
        self.tokens_seen = tokens_seen
        self.flops_per_token = flops_per_token
        self.device_peak_flops = device_peak_flops
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.uncounted_tokens = 0
        """This rank's real tokens not yet summed over the ranks into ``tokens_seen``."""
        self.steps = 0
        self.tokens = 0
        self.paused_s = 0.0
        self.clock = time.perf_counter()
        self.last_train_loss: float | None = None
        self.learning_rate = 0.0

    def add(self, taken: TakenStep) -> None:
        self.loss_sum += taken.loss_sum
        self.grad_norm_sum += taken.grad_norm
        self.uncounted_tokens += taken.real_tokens
        self.learning_rate = taken.learning_rate
        self.steps += 1

    def count_tokens(self, ranks: Ranks) -> None:
        """Sum every rank's tokens since the last count into ``tokens_seen`` (a collective)."""
        counted = int(ranks.sum(torch.tensor(self.uncounted_tokens, dtype=torch.float64, device=self.device)).item())
        self.tokens_seen += counted
        self.tokens += counted
        self.uncounted_tokens = 0

    def report(self, ranks: Ranks, accum_steps: int, started: float) -> dict[str, float]:
        """The ``train/*`` metrics since the last report; starts the next interval."""
        self.last_train_loss = ranks.mean(self.loss_sum).item() / (self.steps * accum_steps)
        now = time.perf_counter()
        tokens_per_sec = self.tokens / (now - self.clock - self.paused_s)
        metrics = {
            "train/loss": self.last_train_loss,
            "train/lr": self.learning_rate,
            "train/grad_norm": self.grad_norm_sum.item() / self.steps,
            "train/tokens_per_sec": tokens_per_sec,
            "train/tokens": float(self.tokens_seen),
            "train/elapsed_s": now - started,
        }
        if self.device_peak_flops:
            metrics["train/mfu"] = self.flops_per_token * tokens_per_sec / self.device_peak_flops
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.steps, self.tokens, self.clock, self.paused_s = 0, 0, now, 0.0
        return metrics

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (validation, checkpoints) is left out of throughput. Timed from an
        idle device, so throughput counts training alone."""
        _wait_for(self.device)
        pause_started = time.perf_counter()
        yield
        self.paused_s += time.perf_counter() - pause_started


def _save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState,
                     sharded: bool, ranks: Ranks, train_config: TrainConfig, artifacts: ArtifactStore) -> None:
    if sharded:
        save_sharded_checkpoint(run_dir, model, optimizer, state, ranks.is_main, artifacts)
    elif ranks.is_main:
        save_checkpoint(run_dir, model, optimizer, state, artifacts)
    if ranks.is_main:
        prune_checkpoints(run_dir, train_config.keep_checkpoints, artifacts)
    ranks.barrier()


def _parameter_counts(model: nn.Module, sharded: bool, ranks: Ranks, device: torch.device) -> tuple[int, int]:
    """Trainable and total parameters of the whole model (a sharded one's summed over the ranks)."""
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    if sharded:
        trainable, total = (int(ranks.sum(torch.tensor(count, device=device)).item()) for count in (trainable, total))
    return trainable, total


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
    _seed_dropout(train_config.seed, step, device)
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


def _sequences_seen(restored: TrainerState | None, global_batch: int) -> int:
    """Where in the data a run starts: where its checkpoint stopped, at whatever world size wrote it."""
    if restored is None:
        return 0
    return restored.step * global_batch if restored.sequences_seen is None else restored.sequences_seen


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


def _seed_dropout(seed: int, step: int, device: torch.device) -> None:
    """Seed the generator that dropout on ``device`` draws from with ``(seed, step)``, that one alone:
    ``torch.manual_seed`` seeds every backend's and records the caller's stack for each one not
    initialised (CUDA and MTIA on a CPU box, MTIA on a GPU box), ~0.2 ms a step
    (``bench/trainer_overhead.py``)."""
    dropout_seed = _dropout_seed(seed, step)
    if device.type == "cpu":
        torch.default_generator.manual_seed(dropout_seed)
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(dropout_seed)
    else:
        torch.manual_seed(dropout_seed)


def _dropout_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([DROPOUT_STREAM, seed, step]).generate_state(1, np.uint64)[0])
