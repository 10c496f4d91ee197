"""Tiny models and token shards for the model tests."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gptflow.data.commits import verify_contents
from gptflow.model.checkpoint import OPTIMIZER_FILE, TRAINER_FILE, WEIGHTS_FILE, latest_checkpoint
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


@pytest.fixture
def kill_repeatedly() -> Callable[[list[str], Path, int], None]:
    """Runs a training script (``command`` + ``--resume`` from the second start on) that checkpoints
    into ``run_dir`` every step, and SIGKILLs it ``kills`` times at a random moment a few
    checkpoints further than the last kill (mostly mid-checkpoint); checks after each kill that the
    latest checkpoint is whole and loadable, then lets a last resumed run finish."""

    def run(command: list[str], run_dir: Path, kills: int) -> None:
        delays = random.Random(0)
        reached_step = 0
        for attempt in range(kills):
            process = subprocess.Popen(command + (["--resume"] if attempt else []))
            target_step = reached_step + delays.randint(1, 10)
            deadline = time.monotonic() + 60
            while _latest_step(run_dir) < target_step:
                assert process.poll() is None and time.monotonic() < deadline, "training stopped before the target step"
                time.sleep(0.002)
            time.sleep(delays.uniform(0.0, 0.03))
            process.send_signal(signal.SIGKILL)
            assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"

            latest = latest_checkpoint(run_dir)
            verify_contents(latest)
            load_file(latest / WEIGHTS_FILE)
            torch.load(latest / OPTIMIZER_FILE, weights_only=True)
            reached_step = json.loads((latest / TRAINER_FILE).read_text())["step"]
            assert reached_step == _latest_step(run_dir)
            print(f"killed at step {reached_step}")
        subprocess.run(command + ["--resume"], check=True)

    return run


def _latest_step(run_dir: Path) -> int:
    latest = latest_checkpoint(run_dir)
    return json.loads((latest / TRAINER_FILE).read_text())["step"] if latest else 0

