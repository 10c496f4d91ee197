"""Chinchilla's parametric scaling law, fitted to trained models' final losses.

``L(N, D) = E + A / N**alpha + B / D**beta``: the loss of a model of ``N`` parameters trained on
``D`` tokens (Hoffmann et al. 2022, "approach 3"). The fit follows the paper: minimise the Huber
loss (delta 1e-3) between ``log L`` and ``log L(N, D)`` written as a log-sum-exp of
``a - alpha log N``, ``b - beta log D`` and ``e`` (``A = exp a``, ``B = exp b``, ``E = exp e``), with
L-BFGS from a grid of starting points, keeping the best. With training costing about ``6 N D``
FLOPs, the law gives the model size that reaches the lowest loss for a compute budget.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by the fit alone: the command line checks a scaling sweep without torch
    import torch

HUBER_DELTA = 1e-3
FLOPS_PER_PARAMETER_TOKEN = 6
"""Training FLOPs per parameter and token: 2 for the forward pass, 4 for the backward pass."""
# Chinchilla's grid of starting points, thinned (its 4,500 starts cost minutes for a few points).
START_EXPONENTS = (0.0, 0.5, 1.0, 1.5, 2.0)
START_LOG_E = (-1.0, 0.0, 1.0)
START_LOG_AB = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
MIN_POINTS = 5
"""The law has five constants: fewer points than that leave it undetermined."""


class ScalingFitError(ValueError):
    """The points cannot determine the law: too few, or one model size or token budget only."""


@dataclass(frozen=True)
class ScalingLaw:
    E: float
    """The irreducible loss: what an infinite model on infinite data would reach."""
    A: float
    alpha: float
    B: float
    beta: float
    residual: float
    """Root mean square of ``log L - log L(N, D)`` over the fitted points."""

    def loss(self, parameters: float, tokens: float) -> float:
        return self.E + self.A / parameters**self.alpha + self.B / tokens**self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """``(N, D)`` of the lowest loss for ``flops`` = ``6 N D`` (the paper's equation 4)."""
        scale = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        budget = flops / FLOPS_PER_PARAMETER_TOKEN
        parameters = scale * budget ** (self.beta / (self.alpha + self.beta))
        return parameters, budget / parameters

    def describe(self) -> str:
        return (f"L(N, D) = {self.E:.3f} + {self.A:.4g} / N^{self.alpha:.3f} + {self.B:.4g} / D^{self.beta:.3f}"
                f" (rms log-residual {self.residual:.4f})")


def fit_scaling_law(parameters: Sequence[float], tokens: Sequence[float], losses: Sequence[float]) -> ScalingLaw:
    """The law through ``(N, D, L)`` points; ``ScalingFitError`` unless there are at least
    ``MIN_POINTS`` with two model sizes and two token budgets or more."""
    if not len(parameters) == len(tokens) == len(losses):
        raise ValueError("parameters, tokens and losses must be as many")
    if len(losses) < MIN_POINTS:
        raise ScalingFitError(f"a scaling law has 5 constants: it needs at least {MIN_POINTS} trained points, "
                              f"got {len(losses)}")
    if len(set(parameters)) < 2 or len(set(tokens)) < 2:
        raise ScalingFitError("a scaling law needs at least two model sizes and two token budgets")
    if min(losses) <= 0:
        raise ScalingFitError("losses must be positive")
    import torch

    log_n = torch.tensor([math.log(value) for value in parameters], dtype=torch.float64)
    log_d = torch.tensor([math.log(value) for value in tokens], dtype=torch.float64)
    log_l = torch.tensor([math.log(value) for value in losses], dtype=torch.float64)

    def objective(constants: torch.Tensor) -> torch.Tensor:
        """Per starting point (rows of ``constants``: a, b, e, alpha, beta), its summed Huber loss."""
        a, b, e, alpha, beta = constants.unbind(-1)
        predicted = torch.logsumexp(torch.stack([
            a[:, None] - alpha[:, None] * log_n, b[:, None] - beta[:, None] * log_d, e[:, None].expand(-1, len(log_l)),
        ]), dim=0)
        return torch.nn.functional.huber_loss(predicted, log_l.expand_as(predicted), reduction="none",
                                              delta=HUBER_DELTA).sum(-1)

    starts = torch.tensor(list(itertools.product(START_LOG_AB, START_LOG_AB, START_LOG_E, START_EXPONENTS,
                                                 START_EXPONENTS)), dtype=torch.float64)
    # Every start descends at once: their objectives are independent, so the sum's gradient is each one's.
    fitted = _minimise(objective, starts)
    losses_per_start = objective(fitted)
    losses_per_start[~torch.isfinite(losses_per_start)] = math.inf
    best = fitted[losses_per_start.argmin()][None]
    best = _minimise(objective, best)[0]  # polished alone, with a line search of its own
    a, b, e, alpha, beta = best.tolist()
    predicted = torch.logsumexp(torch.stack([a - alpha * log_n, b - beta * log_d, torch.full_like(log_l, e)]), dim=0)
    residual = float(((predicted - log_l) ** 2).mean().sqrt())
    return ScalingLaw(E=math.exp(e), A=math.exp(a), alpha=alpha, B=math.exp(b), beta=beta, residual=residual)


def _minimise(objective, starts: torch.Tensor) -> torch.Tensor:
    import torch

    constants = starts.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([constants], lr=1.0, max_iter=500, tolerance_grad=1e-12,
                                  tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        total = objective(constants).sum()
        total.backward()
        return total

    optimizer.step(closure)
    return constants.detach()
