"""One rank of the data-parallel tests, started by torchrun (or alone as the one-process baseline).

Usage: python ddp_training.py RUN_DIR TRAIN_SHARD VAL_SHARD MICRO_BATCH LOSSES_JSON
           [--parallelism ddp|fsdp] [--resume] [--die-after-checkpoint STEP]

``--die-after-checkpoint`` ends the process abruptly once the checkpoint of STEP is committed,
as a kill would (torchrun then stops the other ranks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch
from record_losses import RecordLosses  # beside this script, which runs as a file

from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.pretraining import run_pretraining

# No dropout: its masks are drawn per process, so they could not match across world sizes.
MODEL_CONFIG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=128)
TRAIN_CONFIG = TrainConfig(
    max_steps=20, grad_accum_steps=2, learning_rate=3e-3, warmup_steps=5, log_interval=2,
    val_interval=10, val_tokens=128, checkpoint_interval=10, device="cpu",
)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for name in ("run_dir", "train_shard", "val_shard"):
        parser.add_argument(name, type=Path)
    parser.add_argument("micro_batch", type=int)
    parser.add_argument("losses_path", type=Path)
    parser.add_argument("--parallelism", default="ddp")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--die-after-checkpoint", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    config = dataclasses.replace(
        TRAIN_CONFIG, micro_batch_size=args.micro_batch, nproc=world_size, parallelism=args.parallelism
    )
    recorder = RecordLosses(args.die_after_checkpoint)
    run_pretraining(MODEL_CONFIG, config, [args.train_shard], [args.val_shard], args.run_dir, callback=recorder,
             resume=args.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        args.losses_path.write_text(json.dumps(recorder.losses))
