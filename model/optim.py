"""AdamW with decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from model.config import TrainConfig


def build_optimizer(model: torch.nn.Module, train_config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW whose weight decay applies to matrices and embeddings (≥ 2-D) but not to norms and
    biases, which set scale and offset and gain nothing from being pulled towards zero.

    On CUDA the fused kernel updates every parameter in one launch.
    """
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": train_config.weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=learning_rate_at(0, train_config),
        betas=(train_config.beta1, train_config.beta2),
        fused=device.type == "cuda",
    )


def learning_rate_at(step: int, train_config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warmup reaching the peak at step ``warmup_steps - 1`` (step 0 already moves the
    weights), then a cosine decay from the peak at ``warmup_steps`` to
    ``min_lr_ratio · peak`` at ``max_steps``.
    """
    peak = train_config.learning_rate
    if step < train_config.warmup_steps:
        return peak * (step + 1) / train_config.warmup_steps
    decay_steps = max(1, train_config.max_steps - train_config.warmup_steps)
    progress = min(1.0, (step - train_config.warmup_steps) / decay_steps)
    minimum = train_config.min_lr_ratio * peak
    return minimum + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - minimum)
