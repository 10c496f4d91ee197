"""Chinchilla's law, fitted to points it generated: the constants and the compute-optimal size come back."""

from __future__ import annotations

import itertools
import math

import pytest

from gptflow.model.scaling_law import ScalingFitError, ScalingLaw, fit_scaling_law

# Hoffmann et al.'s fitted constants (approach 3).
CHINCHILLA = ScalingLaw(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28, residual=0.0)


def _points(law: ScalingLaw, sizes, budgets, noise: float = 0.0):
    points = [(n, d, law.loss(n, d)) for n, d in itertools.product(sizes, budgets)]
    # A deterministic ±noise wobble: the fit must average it out, not pass through it.
    return [(n, d, loss * (1 + noise * (-1) ** index)) for index, (n, d, loss) in enumerate(points)]


def test_the_fit_recovers_the_law_that_made_the_points():
    parameters, tokens, losses = zip(*_points(CHINCHILLA, [1e6, 3e6, 1e7, 3e7, 1e8], [1e7, 1e8, 1e9]))
    law = fit_scaling_law(parameters, tokens, losses)
    for name in ("E", "A", "alpha", "B", "beta"):
        assert getattr(law, name) == pytest.approx(getattr(CHINCHILLA, name), rel=1e-3), name
    assert law.residual < 1e-6


def test_noisy_points_fit_close_to_the_law():
    parameters, tokens, losses = zip(*_points(CHINCHILLA, [1e6, 3e6, 1e7, 3e7, 1e8, 3e8], [1e7, 1e8, 1e9, 1e10],
                                              noise=0.002))
    law = fit_scaling_law(parameters, tokens, losses)
    assert law.residual == pytest.approx(0.002, rel=0.2)
    for n, d in [(1e7, 1e8), (1e8, 1e10)]:
        assert law.loss(n, d) == pytest.approx(CHINCHILLA.loss(n, d), rel=0.005)


def test_the_compute_optimal_size_is_the_lowest_loss_on_its_budget():
    flops = 1e21
    parameters, tokens = CHINCHILLA.compute_optimal(flops)
    assert 6 * parameters * tokens == pytest.approx(flops)
    # Along the budget's curve N x D = flops / 6, every other size reaches a higher loss.
    for factor in (0.5, 0.8, 1.25, 2.0):
        other = parameters * factor
        assert CHINCHILLA.loss(other, flops / 6 / other) > CHINCHILLA.loss(parameters, tokens)
    # Chinchilla's exponents: N grows as C^(beta/(alpha+beta)).
    bigger, _ = CHINCHILLA.compute_optimal(flops * 10)
    assert math.log10(bigger / parameters) == pytest.approx(0.28 / 0.62)


@pytest.mark.parametrize(
    ("sizes", "budgets", "message"),
    [
        ([1e6, 1e7], [1e8, 1e9], "at least 5 trained points"),
        ([1e6], [1e7, 1e8, 1e9, 1e10, 1e11], "two model sizes and two token budgets"),
        ([1e6, 1e7, 1e8, 1e9, 1e10], [1e8], "two model sizes and two token budgets"),
    ],
)
def test_points_that_cannot_determine_the_law_are_refused(sizes, budgets, message):
    with pytest.raises(ScalingFitError, match=message):
        fit_scaling_law(*zip(*_points(CHINCHILLA, sizes, budgets)))
