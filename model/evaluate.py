"""Held-out loss, the metrics derived from it, and sample generations.

Token ids in, token ids out: decoding text is the caller's job, so this module needs only torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from data.loader import TokenWindows
from model.device import autocast
from model.gpt import GPT


@torch.no_grad()
def evaluate_loss(
    model: GPT,
    windows: TokenWindows,
    max_tokens: int,
    batch_size: int,
    device: torch.device | str,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, int]:
    """Mean cross-entropy in nats over up to ``max_tokens`` target tokens, and the count scored.

    Uses ``windows.sequential_batches``, so the same model and shards always give the same figure.
    The model is in eval mode (no dropout) for the pass and returned to its previous mode.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    # Summed on the device in float64 so a long pass neither syncs per batch nor loses precision.
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    for inputs, targets in windows.sequential_batches(batch_size, max_tokens, pin_memory=device.type == "cuda"):
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, autocast_dtype):
            _, loss = model(inputs, targets)
        total_nats += loss.double() * targets.numel()
        n_tokens += targets.numel()
    model.train(was_training)
    return (total_nats / n_tokens).item(), n_tokens


def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Loss per UTF-8 byte of text in bits: comparable across tokenizers, unlike loss per token."""
    return loss_nats * n_tokens / (n_bytes * math.log(2))


def perplexity(loss_nats: float) -> float:
    return math.exp(loss_nats)


@torch.no_grad()
def generate_samples(
    model: GPT,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    device: torch.device | str,
) -> list[list[int]]:
    """Each prompt followed by ``max_new_tokens`` sampled tokens.

    Prompts are sampled one at a time (they differ in length), each from a generator seeded by
    ``(seed, prompt index)``: a sample does not change when other prompts are added or removed.
    Every prompt needs at least one token (the end-of-text id is a neutral start).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    samples = []
    for index, prompt in enumerate(prompt_ids):
        if not prompt:
            raise ValueError(f"prompt {index} is empty: start it with at least one token, e.g. end-of-text")
        generator = torch.Generator(device=device)
        generator.manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
        idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
        sample = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
        samples.append(sample[0].tolist())
    model.train(was_training)
    return samples
