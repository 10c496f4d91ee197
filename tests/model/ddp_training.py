"""One rank of the data-parallel test, started by torchrun (or alone as the one-process baseline).

Usage: python ddp_training.py RUN_DIR TRAIN_SHARD VAL_SHARD MICRO_BATCH LOSSES_JSON
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.train import pretrain

# No dropout: its masks are drawn per process, so they could not match across world sizes.
MODEL_CONFIG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=128)
TRAIN_CONFIG = TrainConfig(
    max_steps=20, grad_accum_steps=2, learning_rate=3e-3, warmup_steps=5, log_interval=2,
    val_interval=10, val_tokens=128, checkpoint_interval=10, device="cpu",
)


class RecordLosses:
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.losses[step] = metrics["train/loss"]

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass


if __name__ == "__main__":
    run_dir, train_shard, val_shard = map(Path, sys.argv[1:4])
    micro_batch, losses_path = int(sys.argv[4]), Path(sys.argv[5])
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    config = dataclasses.replace(TRAIN_CONFIG, micro_batch_size=micro_batch, nproc=world_size)
    recorder = RecordLosses()
    pretrain(MODEL_CONFIG, config, [train_shard], [val_shard], run_dir, callback=recorder)
    if int(os.environ.get("RANK", 0)) == 0:
        losses_path.write_text(json.dumps(recorder.losses))
