from __future__ import annotations

import dataclasses

import pytest
import torch

from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.gpt import GPT
from gptflow.model.optim import build_optimizer, learning_rate_at


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


MODERN_MODEL = ModelConfig(
    n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=128, position="rotary", norm="rmsnorm",
    qk_norm=True, mlp="swiglu", tie_embeddings=False, zero_init_projections=True, logit_softcap=15.0,
)


def muon_setup(config: ModelConfig = MODERN_MODEL, **train_fields):
    torch.manual_seed(0)
    model = GPT(config)
    train_fields = {"optimizer": "muon", "learning_rate": 1e-3, "muon_learning_rate": 0.02, **train_fields}
    train_config = TrainConfig(**train_fields)
    return model, build_optimizer(model, train_config, torch.device("cpu"))


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model, optimizer = muon_setup()
    in_muon = {id(p) for group in optimizer.muon.param_groups for p in group["params"]}
    in_adamw = {id(p) for group in optimizer.adamw.param_groups for p in group["params"]}
    names = {id(p): name for name, p in model.named_parameters()}
    assert not in_muon & in_adamw and in_muon | in_adamw == set(names)
    assert {names[i] for i in in_muon} == {
        name for name, p in model.named_parameters() if name.startswith("transformer.h.") and p.dim() == 2
    }
    adamw_names = {names[i] for i in in_adamw}
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.h.0.attn.q_norm.weight"} <= adamw_names
    stacked = {
        names[id(p)]: group["stacked_matrices"] for group in optimizer.muon.param_groups for p in group["params"]
    }
    assert stacked["transformer.h.0.attn.c_attn.weight"] == 3
    assert stacked["transformer.h.0.mlp.c_fc.weight"] == 2  # swiglu's gate and value
    assert stacked["transformer.h.0.mlp.c_proj.weight"] == 1


def test_one_learning_rate_written_to_every_group_gives_muon_its_own_peak():
    _, optimizer = muon_setup()
    for group in optimizer.param_groups:  # what the training loop does each step
        group["lr"] = 5e-4
    assert [group["lr"] for group in optimizer.adamw.param_groups] == [5e-4, 5e-4]
    assert all(group["lr"] * group["lr_scale"] == pytest.approx(1e-2) for group in optimizer.muon.param_groups)
    assert all(group["weight_decay"] == 0.1 for group in optimizer.muon.param_groups)


@pytest.mark.parametrize("config", [MODERN_MODEL, dataclasses.replace(MODERN_MODEL, n_head=4, n_kv_head=2)],
                         ids=["heads", "grouped-query"])
def test_muon_run_overfits_a_batch(config):
    train_config = TrainConfig(
        optimizer="muon", learning_rate=1e-2, muon_learning_rate=0.02, max_steps=40, warmup_steps=0
    )
    model, optimizer = muon_setup(config, **vars(train_config))
    if config.n_kv_head:  # the fused projection's query, key and value rows, orthogonalised apart
        assert optimizer.muon.param_groups[-1]["stacked_matrices"] == (32, 16, 16)
    idx = torch.randint(0, config.vocab_size, (4, config.block_size))
    losses = []
    for step in range(train_config.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, train_config)
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_muon_state_round_trips_through_a_weights_only_file(tmp_path):
    model, optimizer = muon_setup()
    idx = torch.randint(0, MODERN_MODEL.vocab_size, (2, MODERN_MODEL.block_size))
    for _ in range(3):
        model(idx, idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    _, restored = muon_setup()
    restored.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    for part in ("adamw", "muon"):
        saved, loaded = getattr(optimizer, part).state_dict(), getattr(restored, part).state_dict()
        assert saved["param_groups"] == loaded["param_groups"]
        for index, values in saved["state"].items():
            assert all(torch.equal(values[key], loaded["state"][index][key]) for key in values)
    with pytest.raises(ValueError, match="train.optimizer=muon"):
        restored.load_state_dict(torch.optim.AdamW(GPT(MODERN_MODEL).parameters()).state_dict())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("optimizer", "sgd", "train.optimizer must be one of adamw, muon"),
        ("muon_learning_rate", 0.0, "train.muon_learning_rate must be positive"),
        ("muon_momentum", 1.0, r"train.muon_momentum must be in \[0, 1\)"),
    ],
)
def test_bad_optimizer_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})
