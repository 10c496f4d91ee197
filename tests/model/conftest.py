"""Tiny models and token shards for the model tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gptflow.model.config import ModelConfig, TrainConfig

VOCAB_SIZE = 128


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and a second thread contending with other work on
    a 2-core machine slows every op by an order of magnitude."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB_SIZE, dropout=0.1)


@pytest.fixture
def tiny_train_config() -> TrainConfig:
    return TrainConfig(
        max_steps=30, micro_batch_size=4, grad_accum_steps=2, learning_rate=3e-3, warmup_steps=5,
        log_interval=5, val_interval=10, val_tokens=256, checkpoint_interval=10, keep_checkpoints=2,
        device="cpu",
    )


@pytest.fixture
def pattern_shards(tmp_path, write_shard) -> tuple[list[Path], list[Path]]:
    """Train and val shards repeating one random 40-token phrase: a tiny model learns it fast."""
    phrase = np.random.default_rng(0).integers(2, VOCAB_SIZE, size=40)
    tokens = np.tile(phrase, 150).astype(np.uint16)
    train = [write_shard(tmp_path / "train-a.arrow", tokens[:3000]), write_shard(tmp_path / "train-b.arrow", tokens[3000:])]
    val = [write_shard(tmp_path / "val.arrow", tokens[:800])]
    return train, val
