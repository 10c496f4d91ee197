"""LoRA (Hu et al., 2021): train a low-rank update ``W + (alpha / r) · B A`` instead of ``W``.

``apply_lora`` swaps the block's attention and MLP matrices (``attn.c_attn``, ``attn.c_proj``,
``mlp.c_fc``, ``mlp.c_proj``) for ``LoRALinear`` modules in place and freezes every other
parameter of the model. ``LoRALinear`` subclasses ``nn.Linear`` and keeps ``weight`` and
``bias`` under their names, so the model's state dict is the base model's plus ``lora_A`` /
``lora_B`` entries. ``B`` starts at zero, so the adapted model computes exactly what the base
model did until the first step. ``merge_lora`` folds every update into its weight and puts plain
``nn.Linear`` modules back: the result is an ordinary GPT that saves, loads and exports as one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptflow.model.gpt import GPT

ADAPTED_MATRICES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
"""Module paths, inside each transformer block, of the matrices LoRA adapts."""


class LoRALinear(nn.Linear):
    """``nn.Linear`` with a frozen weight and a trainable rank-``rank`` update beside it."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        # On the meta device: the base's own weight and bias replace these at once.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # (out, r)
        # A as nn.Linear initialises its weight; with B = 0 the update starts at exactly zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out) via (..., r)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this module computes in eval mode."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling  # (out, in)
            linear.weight.copy_(self.weight.float() + delta)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def apply_lora(gpt: GPT, rank: int, alpha: float, dropout: float) -> int:
    """Freeze ``gpt`` and adapt ``ADAPTED_MATRICES`` of each of its blocks, in place; returns the
    number of trainable parameters added. A task head built on ``gpt`` afterwards stays trainable."""
    for parameter in gpt.parameters():
        parameter.requires_grad_(False)
    added = 0
    for block in gpt.transformer.h:
        for path in ADAPTED_MATRICES:
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            adapted = LoRALinear(getattr(parent, name), rank, alpha, dropout)
            setattr(parent, name, adapted)
            added += adapted.lora_A.numel() + adapted.lora_B.numel()
    return added


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight, in place; returns ``model``, now free of LoRA
    modules (its state dict is the base architecture's again)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return model

