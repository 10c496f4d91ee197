"""The optimizer (AdamW, or Muon with AdamW) and the warmup + cosine learning-rate schedule.

``build_optimizer`` is the one entry point. Whatever it returns, the training loop drives it
the same way: write the schedule's learning rate into every ``param_groups`` entry's ``"lr"``,
then ``step()`` and ``zero_grad(set_to_none=True)``; checkpoints hold ``state_dict()``, which
``torch.load(..., weights_only=True)`` reads back.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gptflow.model.config import TrainConfig
from gptflow.model.gpt import GPT
from gptflow.model.muon import Muon


class MuonWithAdamW:
    """Muon for the matrices inside the transformer blocks, AdamW for every other parameter,
    driven as one optimizer.

    ``param_groups`` lists AdamW's groups, then Muon's: the same dicts the two optimizers read,
    so writing ``group["lr"]`` in every group sets both. Muon's groups carry ``lr_scale``
    (``muon_learning_rate / learning_rate``), so one schedule value gives each its own peak.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: Muon) -> None:
        self.adamw = adamw
        self.muon = muon

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups + self.muon.param_groups

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"adamw", "muon"}:
            raise ValueError(
                "this optimizer state was not saved by train.optimizer=muon (it has no 'adamw' and 'muon' "
                "parts): resume with the optimizer the checkpoint was trained with"
            )
        self.adamw.load_state_dict(state_dict["adamw"])
        self.muon.load_state_dict(state_dict["muon"])


def build_optimizer(model: GPT, train_config: TrainConfig, device: torch.device) -> torch.optim.AdamW | MuonWithAdamW:
    """The optimizer ``train_config.optimizer`` names, for the bare model (not a DDP or compiled
    wrapper: Muon's share is found by module path).

    Weight decay applies to matrices and embeddings (≥ 2-D), not to norms and biases, which set
    scale and offset and gain nothing from being pulled towards zero. On CUDA the fused AdamW
    kernel updates its parameters in one launch.
    """
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if train_config.optimizer == "adamw":
        return _adamw(parameters, train_config, device)
    hidden_matrices = [
        (name, parameter)
        for name, parameter in model.transformer.h.named_parameters()
        if parameter.requires_grad and parameter.dim() == 2
    ]
    in_muon = {id(parameter) for _, parameter in hidden_matrices}
    muon_groups: dict[int | tuple[int, ...], list[torch.Tensor]] = {}
    for name, parameter in hidden_matrices:
        muon_groups.setdefault(_stacked_matrices(name, model), []).append(parameter)
    muon = Muon(
        # Equal-block counts in order, a grouped-query projection's row counts last: the groups' order is
        # the optimizer state's, which checkpoints keep.
        [{"params": group, "stacked_matrices": stacked} for stacked, group in
         sorted(muon_groups.items(), key=lambda item: item[0] if isinstance(item[0], int) else math.inf)],
        lr=learning_rate_at(0, train_config),
        lr_scale=train_config.muon_learning_rate / train_config.learning_rate,
        momentum=train_config.muon_momentum,
        weight_decay=train_config.weight_decay,
    )
    adamw = _adamw([parameter for parameter in parameters if id(parameter) not in in_muon], train_config, device)
    return MuonWithAdamW(adamw, muon)


def _adamw(parameters: list[torch.Tensor], train_config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": train_config.weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=learning_rate_at(0, train_config),
        betas=(train_config.beta1, train_config.beta2),
        fused=device.type == "cuda",
    )


def _stacked_matrices(name: str, model: GPT) -> int | tuple[int, ...]:
    """How many separate linear maps a block's fused weight stacks along its rows (their row
    counts when they differ): Muon orthogonalises each on its own."""
    config = model.config
    if name.endswith("attn.c_attn.weight"):
        if config.kv_heads == config.n_head:
            return 3  # query, key, value
        # Grouped-query attention: narrower keys and values.
        return (config.n_head * config.head_size, config.kv_heads * config.head_size, config.kv_heads * config.head_size)
    if name.endswith("mlp.c_fc.weight") and model.config.mlp == "swiglu":
        return 2  # gate, value
    return 1


def learning_rate_at(step: int, train_config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warmup reaching the peak at step ``warmup_steps - 1`` (step 0 already moves the
    weights), then a cosine decay from the peak at ``warmup_steps`` to
    ``min_lr_ratio · peak`` at ``max_steps``.
    """
    peak = train_config.learning_rate
    if step < train_config.warmup_steps:
        return peak * (step + 1) / train_config.warmup_steps
    decay_steps = max(1, train_config.max_steps - train_config.warmup_steps)
    progress = min(1.0, (step - train_config.warmup_steps) / decay_steps)
    minimum = train_config.min_lr_ratio * peak
    return minimum + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - minimum)
