"""Fine-tunes a tiny model with LoRA in its own process (or as one torchrun rank), so the tests can
SIGKILL it, or compare its losses across world sizes.

Usage: python tiny_finetune.py RUN_DIR BASE_DIR [--resume] [--parallelism ddp|fsdp --losses FILE]

With ``--parallelism`` (under torchrun or alone) every rank takes 8 / WORLD_SIZE examples per
micro-step, so each world size takes the same steps, without dropout (its masks are drawn per
process), and rank 0 writes the train losses to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from record_losses import RecordLosses  # beside this script, which runs as a file

from gptflow.data.finetune_data import PreparedSplit
from gptflow.model.config import TrainConfig
from gptflow.model.finetune import FinetuneObjective, run_finetuning
from gptflow.model.finetune_config import FinetuneConfig

PAD_ID = 1
# A checkpoint every step, as in tiny_training.py: a random kill often lands mid-write.
TRAIN_CONFIG = TrainConfig(
    max_steps=40, micro_batch_size=4, grad_accum_steps=2, learning_rate=1e-2, warmup_steps=2, weight_decay=0.0,
    log_interval=5, val_interval=10, checkpoint_interval=1, keep_checkpoints=2, device="cpu",
)


def sft_examples(count: int, seed: int) -> PreparedSplit:
    """Prompts of random tokens, each answered by 1 to 4 tokens counting up from 60 and the end
    token (0): responses of different lengths, so ranks hold different numbers of targets."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 5, size=count)
    examples = [[0, *rng.integers(10, 40, size=3).tolist(), 5, *range(60, 60 + length), 0] for length in lengths]
    return PreparedSplit(input_ids=[np.array(ids, dtype=np.int32) for ids in examples],
                         locations=[f"data.jsonl:{line}" for line in range(count)],
                         loss_mask=[np.array([False] * 5 + [True] * (length + 1)) for length in lengths])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("base_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--parallelism")
    parser.add_argument("--losses", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # float reductions depend on the thread count; fix it for bit-identity
    config, lora_dropout, callback = TRAIN_CONFIG, 0.1, None
    if args.parallelism:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        config = TrainConfig(**{**TRAIN_CONFIG.__dict__, "micro_batch_size": 8 // world_size, "nproc": world_size,
                                "parallelism": args.parallelism, "max_steps": 10, "checkpoint_interval": 10})
        lora_dropout, callback = 0.0, RecordLosses()
    objective = FinetuneObjective(args.base_dir, "sft", [], FinetuneConfig(lora_rank=4, lora_dropout=lora_dropout),
                                  sft_examples(40, seed=0), sft_examples(8, seed=1), PAD_ID, max_length=8)
    run_finetuning(objective, config, args.run_dir, callback, resume=args.resume)
    if callback is not None and int(os.environ.get("RANK", 0)) == 0:
        args.losses.write_text(json.dumps(callback.losses))
