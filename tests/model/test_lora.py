"""LoRA: the adapted model starts as the base model, trains only its low-rank updates, and merges
into plain GPT weights that compute the same logits."""

from __future__ import annotations

import pytest
import torch

from gptflow.model.checkpoint import load_model, save_final
from gptflow.model.classifier import GPTClassifier
from gptflow.model.gpt import GPT
from gptflow.model.lora import ADAPTED_MATRICES, LoRALinear, apply_lora, merge_lora


@pytest.fixture
def base(tiny_config) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


@pytest.fixture
def tokens(tiny_config) -> torch.Tensor:
    return torch.randint(0, tiny_config.vocab_size, (3, tiny_config.block_size), generator=torch.Generator().manual_seed(1))


def _logits(gpt: GPT, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return gpt(tokens, torch.zeros_like(tokens))[0]


def test_every_attention_and_mlp_matrix_is_adapted_and_b_starts_at_zero(base, tokens, tiny_config):
    before = _logits(base, tokens)
    added = apply_lora(base, rank=4, alpha=8.0, dropout=0.0)
    adapted = [name for name, module in base.named_modules() if isinstance(module, LoRALinear)]
    assert adapted == [f"transformer.h.{block}.{path}" for block in range(tiny_config.n_layer) for path in ADAPTED_MATRICES]
    assert all(module.lora_B.abs().sum() == 0 and module.lora_A.abs().sum() > 0
               for module in base.modules() if isinstance(module, LoRALinear))
    assert added == sum(p.numel() for name, p in base.named_parameters() if "lora_" in name)
    assert torch.equal(_logits(base, tokens), before)


def test_only_lora_parameters_and_a_later_head_train(base, tokens):
    frozen = {name: parameter.detach().clone() for name, parameter in base.named_parameters()}
    apply_lora(base, rank=4, alpha=8.0, dropout=0.1)
    classifier = GPTClassifier(base, ["a", "b"])
    trainable = {name for name, parameter in classifier.named_parameters() if parameter.requires_grad}
    assert trainable == {name for name, _ in classifier.named_parameters() if "lora_" in name or name.startswith("head.")}

    classifier.train()
    optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        _, loss = classifier(tokens, torch.full((3,), tokens.size(1)), torch.tensor([0, 1, 0]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, parameter in base.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
    assert any(module.lora_B.abs().sum() > 0 for module in base.modules() if isinstance(module, LoRALinear))


def test_merged_model_is_a_plain_gpt_with_the_same_logits(base, tokens, tiny_config, tmp_path):
    base_keys = set(base.state_dict())
    apply_lora(base, rank=4, alpha=8.0, dropout=0.1)
    with torch.no_grad():
        for module in base.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(std=0.05)  # a trained update, not the zero start
    base.eval()
    adapted = _logits(base, tokens)
    merge_lora(base)
    assert not any(isinstance(module, LoRALinear) for module in base.modules())
    assert set(base.state_dict()) == base_keys
    merged = _logits(base, tokens)
    assert (merged - adapted).abs().max() <= 1e-5
    assert not torch.equal(merged, _logits(GPT(tiny_config).eval(), tokens))
    reloaded = load_model(save_final(tmp_path / "run", base))
    assert torch.equal(_logits(reloaded, tokens), merged)
