from __future__ import annotations

import math

import pytest
import torch

from data.loader import TokenWindows
from model.evaluate import bits_per_byte, evaluate_loss, generate_samples, perplexity
from model.gpt import GPT


@pytest.fixture
def model(tiny_config) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config)


def test_evaluate_loss_is_the_token_weighted_mean_over_sequential_windows(model, tiny_config, pattern_shards):
    windows = TokenWindows(pattern_shards[1], tiny_config.block_size)
    model.train()
    loss, n_tokens = evaluate_loss(model, windows, max_tokens=160, batch_size=3, device="cpu")
    assert model.training  # mode restored
    assert n_tokens == 160  # 10 windows of 16 targets, in batches of 3, 3, 3, 1

    model.eval()
    with torch.no_grad():
        losses = [(model(x, y)[1].item(), y.numel()) for x, y in windows.sequential_batches(3, 160)]
    expected = sum(value * count for value, count in losses) / sum(count for _, count in losses)
    assert loss == pytest.approx(expected, rel=1e-6)
    # Dropout is off during evaluation, so the figure is reproducible.
    assert evaluate_loss(model, windows, 160, 3, "cpu") == (loss, n_tokens)


def test_bits_per_byte_and_perplexity():
    # ln 2 nats per token over as many bytes as tokens is one bit per byte.
    assert bits_per_byte(math.log(2), n_tokens=1000, n_bytes=1000) == pytest.approx(1.0)
    assert bits_per_byte(math.log(2), n_tokens=1000, n_bytes=4000) == pytest.approx(0.25)
    assert perplexity(math.log(50)) == pytest.approx(50)


def test_generate_samples_are_reproducible_and_independent_of_other_prompts(model):
    prompts = [[5, 6, 7], [9], [11, 12]]
    samples = generate_samples(model, prompts, max_new_tokens=20, temperature=1.0, top_k=None, seed=3, device="cpu")
    assert [sample[: len(prompt)] for sample, prompt in zip(samples, prompts)] == prompts
    assert [len(sample) - len(prompt) for sample, prompt in zip(samples, prompts)] == [20, 20, 20]
    assert generate_samples(model, prompts, 20, 1.0, None, seed=3, device="cpu") == samples
    assert generate_samples(model, prompts[:1], 20, 1.0, None, seed=3, device="cpu") == samples[:1]
    assert generate_samples(model, prompts, 20, 1.0, None, seed=4, device="cpu") != samples


def test_generate_samples_needs_a_token_to_start_from(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_samples(model, [[1], []], 5, 1.0, None, seed=0, device="cpu")
