from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from model.config import ModelConfig
from model.gpt import GPT


def build(config: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def test_forward_shapes_and_initial_loss(tiny_config):
    model = build(tiny_config)
    idx = torch.randint(0, tiny_config.vocab_size, (3, tiny_config.block_size))
    targets = torch.randint(0, tiny_config.vocab_size, (3, tiny_config.block_size))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, tiny_config.block_size, tiny_config.vocab_size)
    assert loss.shape == ()
    # Small initial weights give near-uniform predictions: loss ≈ ln(V).
    assert abs(loss.item() - math.log(tiny_config.vocab_size)) < 0.2
    last_logits, no_loss = model(idx)
    assert last_logits.shape == (3, 1, tiny_config.vocab_size) and no_loss is None
    torch.testing.assert_close(last_logits[:, 0], logits[:, -1])


def test_ignored_targets_do_not_count(tiny_config):
    model = build(tiny_config)
    idx = torch.randint(0, tiny_config.vocab_size, (2, 8))
    targets = idx.clone()
    targets[:, 4:] = -1
    _, masked_loss = model(idx, targets)
    logits, _ = model(idx, idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, tiny_config.vocab_size), idx[:, :4].reshape(-1))
    torch.testing.assert_close(masked_loss, expected)


def test_output_projection_is_tied_to_token_embedding(tiny_config):
    model = build(tiny_config)
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_parameters() == sum(unique.values())
    c, v, t = tiny_config.n_embd, tiny_config.vocab_size, tiny_config.block_size
    assert model.num_parameters() == v * c + t * c + tiny_config.n_layer * 12 * c * c + (2 * tiny_config.n_layer + 1) * c
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - t * c


def test_flops_per_token_counts_weights_and_attention(tiny_config):
    model = build(tiny_config)
    attention = 12 * tiny_config.n_layer * tiny_config.n_embd * tiny_config.block_size
    assert model.flops_per_token() == 6 * model.num_parameters(exclude_embeddings=True) + attention


def test_residual_projections_start_smaller_with_depth():
    config = ModelConfig(n_layer=8, n_head=4, n_embd=128, block_size=16, vocab_size=256, bias=True)
    model = build(config)
    block = model.transformer.h[0]
    assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 0.001
    assert abs(block.mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0003
    assert abs(block.attn.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0003
    assert torch.count_nonzero(block.mlp.c_fc.bias) == 0
    assert block.ln_1.bias is not None and build(dataclasses.replace(config, bias=False)).transformer.h[0].ln_1.bias is None


def test_future_tokens_do_not_change_past_logits(tiny_config):
    model = build(tiny_config)
    idx = torch.randint(0, tiny_config.vocab_size, (1, tiny_config.block_size))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % tiny_config.vocab_size
    logits, _ = model(idx, idx)
    changed_logits, _ = model(changed, changed)
    torch.testing.assert_close(changed_logits[:, :10], logits[:, :10])
    assert not torch.allclose(changed_logits[:, 10:], logits[:, 10:])


def test_generate_extends_past_the_context_and_top_k_1_is_greedy(tiny_config):
    model = build(tiny_config)
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    new_tokens = 2 * tiny_config.block_size
    generator = torch.Generator().manual_seed(0)
    first = model.generate(prompt, new_tokens, top_k=1, generator=generator)
    second = model.generate(prompt, new_tokens, temperature=0.5, top_k=1, generator=generator)
    assert first.shape == (2, 5 + new_tokens)
    assert torch.equal(first[:, :5], prompt)
    assert torch.equal(first, second)
    # Greedy: every generated token is the argmax given the (cropped) context before it.
    for position in (5, 5 + tiny_config.block_size + 3):
        context = first[:, :position][:, -tiny_config.block_size :]
        logits, _ = model(context)
        assert torch.equal(first[:, position], logits[:, -1].argmax(dim=-1))


def test_generate_samples_only_among_top_k(tiny_config):
    model = build(tiny_config)
    prompt = torch.randint(0, tiny_config.vocab_size, (64, 3))
    logits, _ = model(prompt)
    allowed = torch.topk(logits[:, -1], 3).indices  # (64, 3)
    sampled = model.generate(prompt, 1, temperature=10.0, top_k=3, generator=torch.Generator().manual_seed(1))[:, -1]
    assert torch.all((allowed == sampled[:, None]).any(dim=1))
    assert len(torch.unique(sampled)) > 3  # high temperature: not just the argmax everywhere


def test_missing_vocab_size_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(ModelConfig())


def test_sequences_longer_than_the_context_are_refused(tiny_config):
    with pytest.raises(ValueError, match="block_size"):
        build(tiny_config)(torch.zeros((1, tiny_config.block_size + 1), dtype=torch.long))
