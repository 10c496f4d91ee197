"""Trains the tiny model of the kill-and-resume test in its own process, so it can be SIGKILLed.

Usage: python tiny_training.py RUN_DIR TRAIN_SHARD VAL_SHARD [--resume]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.pretraining import run_pretraining

MODEL_CONFIG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=128, dropout=0.1)
# A checkpoint every step: most of the run is spent writing one, so a random kill often lands
# in the middle of a write.
TRAIN_CONFIG = TrainConfig(
    max_steps=50, micro_batch_size=4, grad_accum_steps=2, learning_rate=3e-3, warmup_steps=5,
    log_interval=5, val_interval=20, val_tokens=128, checkpoint_interval=1, keep_checkpoints=2,
    device="cpu",
)

if __name__ == "__main__":
    run_dir, train_shard, val_shard = map(Path, sys.argv[1:4])
    torch.set_num_threads(1)  # float reductions depend on the thread count; fix it for bit-identity
    run_pretraining(MODEL_CONFIG, TRAIN_CONFIG, [train_shard], [val_shard], run_dir, resume="--resume" in sys.argv)
