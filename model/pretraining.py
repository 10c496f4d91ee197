"""Pretraining's objective: next-token prediction on token shards, through ``model.train.train``.

A pretraining starts from random weights, from another model's weights (``initial_weights``), or
continues an earlier model's checkpoint on a grown corpus (``Continuation``), mixing old and new
shards; with a data mixture, each source's shards are drawn at its weight. The windows are those
of ``data.loader``'s shuffled epochs: each global micro-batch takes the next positions of that
order, and each rank every ``world_size``-th of them (``data.loader.rank_positions``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from gptflow.data.loader import MixedWindows, TokenWindows, prefetch_batches, rank_positions
from gptflow.data.mixture import MixturePart
from gptflow.data.store import LOCAL_STORE, ArtifactStore
from gptflow.data.streaming import ShardCache
from gptflow.model.checkpoint import load_checkpoint, load_model, save_final
from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.distributed import Ranks
from gptflow.model.evaluate import evaluate_loss
from gptflow.model.gpt import GPT
from gptflow.model.objective import Batch, TrainingCallback, TrainingObjective, TrainResult
from gptflow.model.train import train


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

    def to_json(self) -> dict[str, Any]:
        """As a training job holds it, in plain JSON (``from_json`` reads it back)."""
        return {"checkpoint": str(self.checkpoint), "new_train_paths": [str(path) for path in self.new_train_paths],
                "new_data_fraction": self.new_data_fraction}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Continuation:
        return cls(Path(value["checkpoint"]), [Path(path) for path in value["new_train_paths"]],
                   value["new_data_fraction"])


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
    shard_store: ArtifactStore | None = None
    """The store the shards were committed to, whose content hash each is checked against when
    first read; None: shards written outside a store (tests, benchmarks)."""
    shard_tokens: Mapping[Path, int] | None = None
    """Each shard's token count (the token manifest's), so that none is opened before it is read."""
    shard_cache: ShardCache | None = None
    """The shards stream from ``shard_store``, a workspace on an object store, through it (``data.streaming``)."""

    def __post_init__(self) -> None:
        self.train_windows = training_windows(self.train_paths, self.continuation, self.mixture, self.model_config,
                                              self.shard_store, self.shard_tokens, self.shard_cache)
        self.val_windows = (_windows(self.val_paths, self.model_config, self.shard_store, self.shard_tokens,
                                     self.shard_cache) if self.val_paths else None)

    def build_model(self) -> GPT:
        return GPT(self.model_config)

    def trunk(self, model: nn.Module) -> GPT:
        return model

    def batches(self, seed: int, first_sequence: int, steps: range, accum_steps: int, micro_batch_size: int,
                ranks: Ranks, pin_memory: bool) -> Iterator[Batch]:
        global_micro_batch = micro_batch_size * ranks.world_size
        positions = (rank_positions(first_sequence + index * global_micro_batch, micro_batch_size, ranks.rank,
                                    ranks.world_size) for index in range(len(steps) * accum_steps))
        for inputs, targets in prefetch_batches(self.train_windows, seed, positions, pin_memory=pin_memory):
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
    verify_shards: bool = False,
    shard_tokens: Mapping[Path, int] | None = None,
    shard_cache: ShardCache | None = None,
) -> TrainResult:
    """Train a GPT on the token shards ``train_paths`` (see ``train``), validating on up to
    ``val_tokens`` tokens in windows spread over all of ``val_paths`` (skipped when empty).

    A fresh start begins from random weights, from the model in ``initial_weights`` (its weights;
    the optimizer starts afresh), or from ``continuation``'s checkpoint, sampling its new shards
    at its ``new_data_fraction``. With ``mixture`` (a data mixture, never with a
    continuation), each part's shards are drawn at its probability instead of ``train_paths`` as one stream.
    ``verify_shards``: the shards are artifacts of ``artifacts``, each checked against its content
    hash when first read (``CorruptArtifactError`` naming it when altered). ``shard_tokens``: each
    shard's token count; ``shard_cache``: the shards stream from ``artifacts`` through it.
    """
    objective = PretrainObjective(model_config, train_paths, val_paths, continuation, mixture, initial_weights,
                                  artifacts if verify_shards else None, shard_tokens, shard_cache)
    return train(objective, train_config, run_dir, callback, resume, artifacts)


def training_windows(
    train_paths: Sequence[Path],
    continuation: Continuation | None,
    mixture: Sequence[MixturePart],
    model_config: ModelConfig,
    shard_store: ArtifactStore | None = None,
    shard_tokens: Mapping[Path, int] | None = None,
    shard_cache: ShardCache | None = None,
) -> TokenWindows | MixedWindows:
    """The training windows: one stream of ``train_paths``; with ``mixture``, each part's at its
    weight; continuing, the old shards and the new at the continuation's fraction."""
    def stream(paths: Sequence[Path]) -> TokenWindows:
        return _windows(paths, model_config, shard_store, shard_tokens, shard_cache)

    if mixture:
        if continuation is not None:
            raise ValueError("a data mixture trains from scratch: continuing a model mixes old and new data instead")
        return MixedWindows([(stream(part.train_paths), part.probability) for part in mixture])
    if continuation is None or not continuation.new_train_paths:
        return stream(train_paths)
    new = stream(continuation.new_train_paths)
    if not train_paths:
        return new
    old = stream(train_paths)
    return MixedWindows([(old, 1.0 - continuation.new_data_fraction), (new, continuation.new_data_fraction)])


def _windows(paths: Sequence[Path], model_config: ModelConfig, shard_store: ArtifactStore | None,
             shard_tokens: Mapping[Path, int] | None, shard_cache: ShardCache | None) -> TokenWindows:
    counts = None if shard_tokens is None else [shard_tokens[Path(path)] for path in paths]
    return TokenWindows(paths, model_config.block_size, model_config.vocab_size, shard_store, num_tokens=counts,
                        cache=shard_cache)
