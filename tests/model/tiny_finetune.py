"""Fine-tunes a tiny model with LoRA in its own process, so the kill-and-resume test can SIGKILL it.

Usage: python tiny_finetune.py RUN_DIR BASE_DIR [--resume]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from gptflow.data.finetune_data import PreparedSplit
from gptflow.model.config import TrainConfig
from gptflow.model.finetune import FinetuneObjective, finetune
from gptflow.model.finetune_config import FinetuneConfig

PAD_ID = 1
# A checkpoint every step, as in tiny_training.py: a random kill often lands mid-write.
TRAIN_CONFIG = TrainConfig(
    max_steps=40, micro_batch_size=4, grad_accum_steps=2, learning_rate=1e-2, warmup_steps=2, weight_decay=0.0,
    log_interval=5, val_interval=10, checkpoint_interval=1, keep_checkpoints=2, device="cpu",
)


def sft_examples(count: int, seed: int) -> PreparedSplit:
    """Prompts of random tokens, each answered by the same two tokens and the end token (0)."""
    rng = np.random.default_rng(seed)
    examples = [[0, *rng.integers(10, 40, size=3).tolist(), 5, 60, 61, 0] for _ in range(count)]
    return PreparedSplit(input_ids=[np.array(ids, dtype=np.int32) for ids in examples],
                         locations=[f"data.jsonl:{line}" for line in range(count)],
                         loss_mask=[np.array([False] * 5 + [True] * 3) for _ in examples])


if __name__ == "__main__":
    run_dir, base_dir = map(Path, sys.argv[1:3])
    torch.set_num_threads(1)  # float reductions depend on the thread count; fix it for bit-identity
    objective = FinetuneObjective(base_dir, "sft", [], FinetuneConfig(lora_rank=4, lora_dropout=0.1),
                                  sft_examples(40, seed=0), sft_examples(8, seed=1), PAD_ID, max_length=8)
    finetune(objective, TRAIN_CONFIG, run_dir, resume="--resume" in sys.argv)
