"""CUDA checks of the modern recipe: bf16 Newton–Schulz, a compiled Muon run, memory options."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.device import autocast
from gptflow.model.gpt import GPT
from gptflow.model.muon import orthogonalize
from gptflow.model.optim import build_optimizer, learning_rate_at

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODERN = ModelConfig(
    n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=8192, position="rotary", norm="rmsnorm",
    qk_norm=True, mlp="relu2", tie_embeddings=False, zero_init_projections=True, logit_softcap=15.0,
)


def test_newton_schulz_runs_in_bfloat16_on_cuda():
    torch.manual_seed(0)
    result = orthogonalize(torch.randn(4, 256, 1024, device="cuda"))
    assert result.dtype == torch.bfloat16
    singular_values = torch.linalg.svdvals(result.float())
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25


def test_compiled_muon_run_learns_in_bf16():
    torch.manual_seed(0)
    model = GPT(MODERN).cuda()
    train_config = TrainConfig(optimizer="muon", learning_rate=3e-3, max_steps=30, warmup_steps=3)
    optimizer = build_optimizer(model, train_config, torch.device("cuda"))
    compiled = torch.compile(model, fullgraph=True)
    idx = torch.randint(0, MODERN.vocab_size, (8, MODERN.block_size), device="cuda")
    losses = []
    for step in range(train_config.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, train_config)
        with autocast(torch.device("cuda"), torch.bfloat16):
            _, loss = compiled(idx, idx, return_logits=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    assert losses[-1].item() < 0.5 * losses[0].item()


def _peak_training_memory(config: ModelConfig, return_logits: bool) -> int:
    torch.manual_seed(0)
    model = GPT(config).cuda()
    idx = torch.randint(0, config.vocab_size, (16, config.block_size), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    with autocast(torch.device("cuda"), torch.bfloat16):
        _, loss = model(idx, idx, return_logits=return_logits)
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def test_lean_loss_and_activation_checkpointing_lower_peak_memory():
    config = dataclasses.replace(MODERN, vocab_size=32768)
    full = _peak_training_memory(config, return_logits=True)
    lean = _peak_training_memory(config, return_logits=False)
    checkpointed = _peak_training_memory(dataclasses.replace(config, activation_checkpointing=True), return_logits=False)
    logits_bytes = 16 * config.block_size * config.vocab_size * 4  # one float32 (B, T, V) tensor
    assert full - lean > logits_bytes  # at least one float32 copy of the logits fewer
    assert checkpointed < lean
