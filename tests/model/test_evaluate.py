from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from gptflow.data.loader import TokenWindows
from gptflow.model.config import SamplingConfig
from gptflow.model.evaluate import (
    bits_per_byte,
    evaluate_loss,
    generate_samples,
    perplexity,
    predicted_choice,
    score_continuations,
)
from gptflow.model.gpt import GPT


@pytest.fixture
def model(tiny_config) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config)


def test_evaluate_loss_is_the_token_weighted_mean_over_the_evaluation_windows(model, tiny_config, pattern_shards):
    windows = TokenWindows(pattern_shards[1], tiny_config.block_size, tiny_config.vocab_size)
    model.train()
    loss, n_tokens = evaluate_loss(model, windows, max_tokens=160, batch_size=3, device="cpu")
    assert model.training  # mode restored
    assert n_tokens == 160  # 10 windows of 16 targets, in batches of 3, 3, 3, 1

    model.eval()
    with torch.no_grad():
        losses = [(model(x, y)[1].item(), y.numel()) for x, y in windows.evaluation_batches(3, 160)]
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
    sampling = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=0, seed=3)
    samples = generate_samples(model, prompts, sampling, device="cpu")
    assert [sample[: len(prompt)] for sample, prompt in zip(samples, prompts)] == prompts
    assert [len(sample) - len(prompt) for sample, prompt in zip(samples, prompts)] == [20, 20, 20]
    assert generate_samples(model, prompts, sampling, device="cpu") == samples
    assert generate_samples(model, prompts[:1], sampling, device="cpu") == samples[:1]
    assert generate_samples(model, prompts, dataclasses.replace(sampling, seed=4), device="cpu") != samples


def test_generate_samples_needs_a_token_to_start_from(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_samples(model, [[1], []], SamplingConfig(max_new_tokens=5), device="cpu")


def _log_likelihood_alone(model: GPT, context: list[int], continuation: list[int]) -> float:
    """The reference: one unpadded sequence, every position's log-probabilities computed."""
    window = [*context, *continuation][-(model.config.block_size + 1):]
    inputs, targets = torch.tensor([window[:-1]]), torch.tensor([window[1:]])
    with torch.no_grad():
        logits, _ = model(inputs, targets)
    log_probs = logits[0].float().log_softmax(-1).gather(1, targets[0].unsqueeze(1)).squeeze(1)
    return log_probs[-len(continuation):].sum().item()


def test_batched_scores_equal_each_request_scored_alone(model, tiny_config):
    rng = np.random.default_rng(1)
    vocab = tiny_config.vocab_size
    requests = [
        (rng.integers(0, vocab, n_context).tolist(), rng.integers(0, vocab, n_continuation).tolist())
        for n_context, n_continuation in [(1, 1), (5, 3), (12, 4), (3, 16), (30, 2), (8, 8)]
    ]
    model.train()
    # A budget of 40 padded tokens: batches of several rows of unequal length, padded.
    scores = score_continuations(model, requests, batch_tokens=40, device="cpu")
    assert model.training  # mode restored
    model.eval()
    expected = [_log_likelihood_alone(model, *request) for request in requests]
    assert scores.log_likelihoods == pytest.approx(expected, abs=1e-4)
    # 30 + 2 and 3 + 16 tokens exceed block_size + 1 = 17: their contexts were cut from the left.
    assert scores.truncated == [False, False, False, True, True, False]
    assert all(value < 0 for value in scores.log_likelihoods)


def test_requests_that_cannot_be_scored_are_refused(model):
    with pytest.raises(ValueError, match="at least one context token"):
        score_continuations(model, [([], [1, 2])], 64, "cpu")
    with pytest.raises(ValueError, match="does not fit the model's block_size of 16"):
        score_continuations(model, [([1], list(range(17)))], 64, "cpu")


def test_a_model_trained_on_a_phrase_prefers_its_true_continuation(tiny_config):
    torch.manual_seed(0)
    phrase = np.random.default_rng(0).integers(2, tiny_config.vocab_size, size=40)
    stream = np.tile(phrase, 20)
    gpt = GPT(tiny_config)
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-2)
    for step in range(60):
        starts = np.random.default_rng(step).integers(0, len(stream) - 17, size=16)
        windows = torch.tensor(np.stack([stream[start:start + 17] for start in starts]))
        _, loss = gpt(windows[:, :-1], windows[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    distractors = np.random.default_rng(5).integers(2, tiny_config.vocab_size, size=(3, 4)).tolist()
    contexts = [phrase[start:start + 8].tolist() for start in (0, 10, 20, 28)]
    truths = [phrase[start + 8:start + 12].tolist() for start in (0, 10, 20, 28)]
    requests = [(context, ending) for context, truth in zip(contexts, truths) for ending in [*distractors, truth]]
    scores = score_continuations(gpt, requests, batch_tokens=64, device="cpu").log_likelihoods
    chosen = [predicted_choice(scores[index:index + 4]) for index in range(0, len(scores), 4)]
    assert chosen == [3, 3, 3, 3]


def test_acc_norm_divides_by_length_and_ties_go_to_the_first_choice():
    # -4 over 2 characters is worse per character than -6 over 6: acc and acc_norm disagree.
    assert predicted_choice([-4.0, -6.0]) == 0
    assert predicted_choice([-4.0, -6.0], lengths=[2, 6]) == 1
    assert predicted_choice([-3.0, -1.0, -1.0]) == 1
