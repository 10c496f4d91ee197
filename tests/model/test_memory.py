"""The parameter count and per-GPU memory estimate behind ``gptflow presets``."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.gpt import GPT
from gptflow.model.memory import block_parameters, parameter_count, training_memory

SWITCHES = list(itertools.product(("gelu", "relu2", "swiglu"), (True, False), ("layernorm", "rmsnorm"),
                                  ("learned", "rotary"), (False, True)))


@pytest.mark.parametrize(("mlp", "tie_embeddings", "norm", "position", "bias_and_qk_norm"), SWITCHES)
def test_the_parameter_count_is_that_of_the_built_model(mlp, tie_embeddings, norm, position, bias_and_qk_norm):
    config = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=256, mlp=mlp,
                         tie_embeddings=tie_embeddings, norm=norm, position=position, bias=bias_and_qk_norm,
                         qk_norm=bias_and_qk_norm)
    model = GPT(config)
    assert parameter_count(config) == sum(parameter.numel() for parameter in model.parameters())
    assert block_parameters(config) == sum(parameter.numel() for parameter in model.transformer.h[0].parameters())


@pytest.mark.parametrize("attention", [
    {"n_kv_head": 1, "bias": True}, {"n_kv_head": 2, "head_dim": 48, "bias": True}, {"mlp_hidden": 100, "bias": True},
    {"n_kv_head": 2, "qkv_bias": True},
])
def test_the_parameter_count_follows_grouped_queries_head_width_mlp_width_and_biases(attention):
    config = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=256, mlp="swiglu",
                         qk_norm=True, **attention)
    model = GPT(config)
    assert parameter_count(config) == sum(parameter.numel() for parameter in model.parameters())
    assert block_parameters(config) == sum(parameter.numel() for parameter in model.transformer.h[0].parameters())


def test_ddp_keeps_sixteen_bytes_a_parameter_and_fsdp_shards_them():
    model = ModelConfig(n_layer=24, n_head=16, n_embd=2048, block_size=2048, vocab_size=50304)
    train = TrainConfig(micro_batch_size=8)
    ddp = training_memory(model, train, "ddp")
    fsdp = training_memory(model, train, "fsdp", gpus=8)
    assert ddp.weights + ddp.gradients + ddp.optimizer == 16 * ddp.parameters  # fp32 weights, grads, AdamW m and v
    assert fsdp.optimizer == pytest.approx(ddp.optimizer / 8, abs=1)
    assert ddp.weights / 8 < fsdp.weights < ddp.weights / 4  # a shard plus two gathered bf16 blocks
    assert fsdp.activations == ddp.activations
    assert fsdp.total - fsdp.activations < (ddp.total - ddp.activations) / 4


def test_recomputed_blocks_hold_far_fewer_activations_and_muon_keeps_one_moment():
    model = ModelConfig(n_layer=24, n_head=16, n_embd=2048, block_size=2048, vocab_size=50304)
    train = TrainConfig(micro_batch_size=8)
    stored = training_memory(model, train)
    recomputed = training_memory(dataclasses.replace(model, activation_checkpointing=True), train)
    assert recomputed.activations < stored.activations / 3
    muon = training_memory(model, dataclasses.replace(train, optimizer="muon"))
    assert stored.optimizer / 2 < muon.optimizer < stored.optimizer


def test_float32_training_holds_twice_the_block_activations():
    model = ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=128)
    train = TrainConfig()
    assert training_memory(model, train, on_gpu=False).activations > 1.9 * training_memory(model, train).activations


def test_an_unknown_parallelism_is_refused():
    with pytest.raises(ValueError, match="parallelism must be one of ddp, fsdp"):
        training_memory(ModelConfig(vocab_size=128), TrainConfig(), "zero3")
