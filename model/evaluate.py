"""Held-out loss, the metrics derived from it, zero-shot multiple-choice scoring, and sample
generations.

Token ids in, token ids out: decoding text is the caller's job, so this module needs only torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gptflow.data.loader import TokenWindows
from gptflow.data.units import Progress
from gptflow.model.config import SamplingConfig
from gptflow.model.device import autocast
from gptflow.model.gpt import GPT


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

    The windows scored are spread evenly over all of ``windows`` (``TokenWindows.evaluation_batches``),
    so any budget estimates the loss of the whole stream, and the same model, shards and
    ``max_tokens`` always give the same figure. The model is in eval mode (no dropout) for the
    pass and returned to its previous mode.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    # Summed on the device in float64 so a long pass neither syncs per batch nor loses precision.
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    for inputs, targets in windows.evaluation_batches(batch_size, max_tokens, pin_memory=device.type == "cuda"):
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
    sampling: SamplingConfig,
    device: torch.device | str,
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """Each prompt followed by ``sampling.max_new_tokens`` sampled tokens, never an id at or above
    ``vocab_limit`` (the tokenizer's vocabulary size; the embedding rows above it are padding).

    Prompts are sampled one at a time (they differ in length), each from a generator seeded by
    ``(sampling.seed, prompt index)``: a sample does not change when other prompts are added or removed.
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
        generator.manual_seed(int(np.random.SeedSequence([sampling.seed, index]).generate_state(1)[0]))
        idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
        sample = model.generate(idx, sampling.max_new_tokens, temperature=sampling.temperature,
                                top_k=sampling.top_k_or_none, generator=generator, vocab_limit=vocab_limit)
        samples.append(sample[0].tolist())
    model.train(was_training)
    return samples


@dataclass
class ContinuationScores:
    log_likelihoods: list[float]
    """Per request: the summed log-probability (nats) of its continuation's tokens given its context."""
    truncated: list[bool]
    """Per request: whether context + continuation exceeded the window, so the context's start was cut."""
    greedy: list[bool]
    """Per request: whether each continuation token is the model's most likely next token."""


@torch.no_grad()
def score_continuations(
    model: GPT,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_tokens: int,
    device: torch.device | str,
    autocast_dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> ContinuationScores:
    """log P(continuation | context) for each ``(context ids, continuation ids)`` request, as
    lm-evaluation-harness computes a loglikelihood request.

    A request longer than ``block_size + 1`` tokens keeps its last ``block_size + 1`` (the context
    is cut from the left). Requests are sorted by length and batched up to ``batch_tokens``
    padded tokens; padding sits after each sequence, where causal attention cannot see it, and
    only continuation positions are scored. ``progress(done, total)`` counts requests scored.
    """
    device = torch.device(device)
    block_size = model.config.block_size
    windows = []
    for index, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"request {index} needs at least one context token and one continuation token")
        if len(continuation) > block_size:
            raise ValueError(f"request {index}: its continuation of {len(continuation)} tokens does not fit "
                             f"the model's block_size of {block_size}")
        windows.append([*context, *continuation][-(block_size + 1):])
    log_likelihoods = [0.0] * len(windows)
    greedy = [False] * len(windows)
    was_training = model.training
    model.eval()
    longest_first = sorted(range(len(windows)), key=lambda index: -len(windows[index]))
    done = 0
    for batch in _batches_of_tokens(longest_first, [len(window) - 1 for window in windows], batch_tokens):
        length = len(windows[batch[0]]) - 1
        inputs = torch.zeros((len(batch), length), dtype=torch.long)  # (B, T); 0 pads, never attended to
        targets = torch.full((len(batch), length), -1, dtype=torch.long)  # (B, T); -1: not scored
        for row, index in enumerate(batch):
            window, n_scored = windows[index], len(requests[index][1])
            inputs[row, : len(window) - 1] = torch.tensor(window[:-1])
            targets[row, len(window) - 1 - n_scored : len(window) - 1] = torch.tensor(window[-n_scored:])
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device, autocast_dtype):
            logits, _ = model(inputs, targets)  # (B, T, V)
        scored = targets >= 0  # (B, T)
        # Log-softmax over the scored positions only: (N, V) instead of (B, T, V).
        log_probs = logits[scored].float().log_softmax(dim=-1)  # (N, V)
        token_log_probs = log_probs.gather(1, targets[scored].unsqueeze(1)).squeeze(1)  # (N,)
        rows = torch.arange(len(batch), device=device).unsqueeze(1).expand_as(targets)[scored]  # (N,)
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, token_log_probs.double())
        missed = (log_probs.argmax(dim=-1) != targets[scored]).long()  # (N,)
        misses = torch.zeros(len(batch), dtype=torch.long, device=device).index_add_(0, rows, missed)
        for index, value, miss_count in zip(batch, sums.tolist(), misses.tolist()):  # one device sync per batch
            log_likelihoods[index] = value
            greedy[index] = miss_count == 0
        done += len(batch)
        if progress:
            progress(done, len(windows))
    model.train(was_training)
    truncated = [len(context) + len(continuation) > block_size + 1 for context, continuation in requests]
    return ContinuationScores(log_likelihoods=log_likelihoods, truncated=truncated, greedy=greedy)


def predicted_choice(log_likelihoods: Sequence[float], lengths: Sequence[int] | None = None) -> int:
    """The choice with the highest log-likelihood (``acc``), or with the highest log-likelihood per
    unit of length when ``lengths`` are given (``acc_norm``: lm-evaluation-harness divides by each
    choice's length in characters). The first wins a tie, as with ``numpy.argmax``."""
    scores = log_likelihoods if lengths is None else [ll / length for ll, length in zip(log_likelihoods, lengths)]
    return max(range(len(scores)), key=lambda index: (scores[index], -index))


def _batches_of_tokens(order: list[int], lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """``order`` (longest first) cut into batches whose padded size, rows × first row's length,
    stays within ``batch_tokens`` (a batch holds at least one row)."""
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches
