from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import ModelConfig, TrainConfig
from model.gpt import GPT
from model.optim import build_optimizer, learning_rate_at


@pytest.fixture
def schedule() -> TrainConfig:
    return TrainConfig(max_steps=1100, warmup_steps=100, learning_rate=1e-3, min_lr_ratio=0.1)


def test_warmup_is_linear_and_reaches_the_peak(schedule):
    assert learning_rate_at(0, schedule) == pytest.approx(1e-5)
    assert learning_rate_at(49, schedule) == pytest.approx(5e-4)
    assert learning_rate_at(99, schedule) == pytest.approx(1e-3)


def test_cosine_decays_from_peak_to_the_floor(schedule):
    assert learning_rate_at(100, schedule) == pytest.approx(1e-3)
    assert learning_rate_at(600, schedule) == pytest.approx(0.55e-3)  # halfway: (peak + floor) / 2
    assert learning_rate_at(1100, schedule) == pytest.approx(1e-4)
    assert learning_rate_at(5000, schedule) == pytest.approx(1e-4)
    rates = [learning_rate_at(step, schedule) for step in range(100, 1100)]
    assert all(later < earlier for earlier, later in zip(rates, rates[1:]))


def test_no_warmup_starts_at_the_peak(schedule):
    assert learning_rate_at(0, dataclasses.replace(schedule, warmup_steps=0)) == pytest.approx(1e-3)


def test_weight_decay_applies_to_matrices_only():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64, bias=True))
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in not_decayed["params"])
    # The tied embedding appears once, and nothing is left out.
    grouped = decayed["params"] + not_decayed["params"]
    assert len({id(p) for p in grouped}) == len(grouped) == len(list(model.parameters()))
    assert not optimizer.defaults["fused"]
