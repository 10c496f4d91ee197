"""One rank of the resume tests, started by torchrun (or alone for one process): pretraining on
counting shards, whose windows' first tokens name them, logging each step's windows per rank.

Usage: python window_log_training.py RUN_DIR LOG_DIR SHARD... [--mixture] [--resume]
           [--die-after-checkpoint STEP]

``--mixture`` trains on the shards as the parts of a mixture at equal weights, else as one
stream. Each rank appends ``{"step": s, "starts": [...]}`` to ``LOG_DIR/rank-R-of-W.jsonl`` as it
takes the batches of step ``s``: the first token of each of its rows, micro-step after micro-step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from record_losses import RecordLosses  # beside this script, which runs as a file

from gptflow.data.mixture import MixturePart
from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.distributed import Ranks
from gptflow.model.objective import Batch
from gptflow.model.pretraining import PretrainObjective
from gptflow.model.train import train

MODEL_CONFIG = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=32768)
TRAIN_CONFIG = TrainConfig(max_steps=50, micro_batch_size=2, global_batch_size=8, learning_rate=1e-3, warmup_steps=2,
                           log_interval=5, val_interval=0, val_tokens=64, checkpoint_interval=10, device="cpu")


@dataclasses.dataclass
class WindowLoggingObjective(PretrainObjective):
    log_dir: Path = Path()

    def batches(self, seed: int, first_sequence: int, steps: range, accum_steps: int, micro_batch_size: int,
                ranks: Ranks, pin_memory: bool) -> Iterator[Batch]:
        log = self.log_dir / f"rank-{ranks.rank}-of-{ranks.world_size}.jsonl"
        batches = super().batches(seed, first_sequence, steps, accum_steps, micro_batch_size, ranks, pin_memory)
        for step in steps:
            taken = [next(batches) for _ in range(accum_steps)]
            with open(log, "a") as file:
                file.write(json.dumps({"step": step, "starts": [int(b.inputs[row, 0]) for b in taken
                                                                for row in range(len(b.inputs))]}) + "\n")
            yield from taken


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("log_dir", type=Path)
    parser.add_argument("shards", type=Path, nargs="+")
    parser.add_argument("--mixture", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--die-after-checkpoint", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    config = dataclasses.replace(TRAIN_CONFIG, nproc=world_size)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    mixture = [MixturePart(str(shard), 0.5, [shard]) for shard in args.shards] if args.mixture else []
    objective = WindowLoggingObjective(MODEL_CONFIG, [] if args.mixture else args.shards, [], mixture=mixture,
                                       log_dir=args.log_dir)
    train(objective, config, args.run_dir, RecordLosses(args.die_after_checkpoint), resume=args.resume)
