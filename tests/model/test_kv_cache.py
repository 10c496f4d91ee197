"""Generation with a KV cache computes what generation without one computes, for every recipe."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gptflow.model.config import ModelConfig
from gptflow.model.gpt import GPT, KVCache

RECIPES = {
    "gpt2": {},
    "gpt2-bias": {"bias": True},
    "rotary": {"position": "rotary"},
    "sinusoidal": {"position": "sinusoidal"},
    "llama-like": {"position": "rotary", "norm": "rmsnorm", "mlp": "swiglu", "tie_embeddings": False},
    "modern": {"position": "rotary", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2", "tie_embeddings": False,
               "logit_softcap": 15.0},
}


def random_model(config: ModelConfig, seed: int = 0) -> GPT:
    """A model in eval mode whose every parameter (gains, biases, zero-initialised projections)
    is perturbed, so that no part of the computation is trivially the identity."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.fixture(params=list(RECIPES), ids=list(RECIPES))
def recipe_model(request, tiny_config) -> GPT:
    return random_model(dataclasses.replace(tiny_config, **RECIPES[request.param]))


def test_each_cached_step_gives_the_logits_of_a_full_forward(recipe_model):
    config = recipe_model.config
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    cache = KVCache(config)
    prefill, _ = recipe_model(idx[:, :5], kv_cache=cache)
    torch.testing.assert_close(prefill, recipe_model(idx[:, :5])[0], atol=1e-5, rtol=0)
    for position in range(5, config.block_size):
        step, _ = recipe_model(idx[:, position : position + 1], kv_cache=cache)  # (2, 1, V)
        full, _ = recipe_model(idx[:, : position + 1])  # (2, 1, V): the last position's logits
        torch.testing.assert_close(step, full, atol=1e-5, rtol=0)
    assert cache.length == config.block_size


def test_several_tokens_after_cached_ones_see_only_their_past(recipe_model):
    config = recipe_model.config
    idx = torch.randint(0, config.vocab_size, (1, 12))
    cache = KVCache(config)
    recipe_model.hidden_states(idx[:, :5], cache)
    chunk = recipe_model.hidden_states(idx[:, 5:], cache)  # (1, 7, C)
    torch.testing.assert_close(chunk, recipe_model.hidden_states(idx)[:, 5:], atol=1e-5, rtol=0)


def test_greedy_tokens_are_the_same_with_and_without_the_cache_past_the_context(recipe_model):
    config = recipe_model.config
    prompt = torch.randint(0, config.vocab_size, (2, 5))
    new_tokens = 2 * config.block_size  # the window slides for the last block_size + 5 tokens
    cached = recipe_model.generate(prompt, new_tokens, top_k=1)
    uncached = recipe_model.generate(prompt, new_tokens, top_k=1, use_kv_cache=False)
    assert torch.equal(cached, uncached)


def test_sampling_draws_the_same_tokens_with_and_without_the_cache(tiny_config):
    model = random_model(tiny_config)
    prompt = torch.randint(0, tiny_config.vocab_size, (3, 4))
    samples = [
        model.generate(prompt, 20, temperature=1.5, generator=torch.Generator().manual_seed(7), use_kv_cache=use)
        for use in (True, False)
    ]
    assert torch.equal(*samples)


def test_a_full_cache_refuses_more_positions(tiny_config):
    model = random_model(tiny_config)
    cache = KVCache(tiny_config)
    model(torch.zeros((1, tiny_config.block_size), dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros((1, 1), dtype=torch.long), kv_cache=cache)


def test_vocab_limit_never_samples_the_padding_rows(tiny_config):
    model = random_model(tiny_config)
    real_tokens = 100
    with torch.no_grad():
        model.lm_head.weight[real_tokens:] *= 20  # padding rows that would win most draws
    prompt = torch.randint(0, real_tokens, (8, 3))
    unlimited = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0))[:, 3:]
    limited = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0), vocab_limit=real_tokens)[:, 3:]
    assert (unlimited >= real_tokens).any()
    assert (limited < real_tokens).all()
