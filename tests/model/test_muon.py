from __future__ import annotations

import math

import pytest
import torch

from gptflow.model.muon import Muon, orthogonalize


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (3, 48, 16)])
def test_newton_schulz_output_is_near_orthogonal(shape):
    torch.manual_seed(0)
    matrices = torch.randn(*shape)
    result = orthogonalize(matrices)
    assert result.shape == matrices.shape and result.dtype == torch.float32
    singular_values = torch.linalg.svdvals(result)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25
    # The singular vectors of the input: close in direction to the exact U Vᵀ.
    u, _, vh = torch.linalg.svd(matrices, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(result.flatten(), (u @ vh).flatten(), dim=0) > 0.97


def test_newton_schulz_is_scale_free_batched_and_keeps_zero():
    torch.manual_seed(0)
    matrices = torch.randn(2, 24, 40)
    torch.testing.assert_close(orthogonalize(1000.0 * matrices), orthogonalize(matrices), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(orthogonalize(matrices)[1], orthogonalize(matrices[1]))
    assert torch.count_nonzero(orthogonalize(torch.zeros(8, 8))) == 0


def test_step_is_the_scaled_orthogonalised_nesterov_momentum():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 16))  # tall: fan_out / fan_in = 4
    start = weight.detach().clone()
    optimizer = Muon([weight], lr=0.1, lr_scale=0.5, momentum=0.9, weight_decay=0.2)
    gradients = [torch.randn(64, 16) for _ in range(2)]
    weight.grad = gradients[0]
    optimizer.step()
    expected = start * (1 - 0.1 * 0.2) - 0.1 * 0.5 * math.sqrt(4) * orthogonalize(gradients[0] * 1.9)
    torch.testing.assert_close(weight.detach(), expected)
    weight.grad = gradients[1]
    optimizer.step()
    buffer = 0.9 * gradients[0] + gradients[1]
    expected = expected * (1 - 0.1 * 0.2) - 0.1 * 0.5 * 2 * orthogonalize(gradients[1] + 0.9 * buffer)
    torch.testing.assert_close(weight.detach(), expected)


def test_stacked_matrices_are_orthogonalised_one_by_one():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(3 * 16, 16))
    weight.grad = torch.randn(3 * 16, 16)
    Muon([weight], lr=1.0, momentum=0.0, stacked_matrices=3).step()
    for block, gradient in zip(weight.detach().split(16), weight.grad.split(16)):
        torch.testing.assert_close(block, -orthogonalize(gradient))


def test_stacked_matrices_of_different_heights_are_orthogonalised_one_by_one():
    """Grouped-query attention's fused projection: 32 query rows, then 8 key and 8 value rows."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(48, 16))
    weight.grad = torch.randn(48, 16)
    Muon([weight], lr=1.0, momentum=0.0, stacked_matrices=(32, 8, 8)).step()
    for block, gradient in zip(weight.detach().split((32, 8, 8)), weight.grad.split((32, 8, 8))):
        torch.testing.assert_close(block, -orthogonalize(gradient) * math.sqrt(max(1.0, gradient.size(0) / 16)))
    with pytest.raises(ValueError, match=r"stacked_matrices=\(32, 8\)"):
        Muon([torch.nn.Parameter(torch.zeros(48, 16))], stacked_matrices=(32, 8))


def test_muon_refuses_what_is_not_a_matrix():
    with pytest.raises(ValueError, match="AdamW"):
        Muon([torch.nn.Parameter(torch.zeros(8))])
    with pytest.raises(ValueError, match="stacked_matrices=3"):
        Muon([torch.nn.Parameter(torch.zeros(8, 8))], stacked_matrices=3)
    with pytest.raises(ValueError, match="momentum"):
        Muon([torch.nn.Parameter(torch.zeros(8, 8))], momentum=1.0)


def test_muon_fits_a_linear_map():
    torch.manual_seed(0)
    inputs = torch.randn(256, 32)
    targets = inputs @ (0.1 * torch.randn(32, 48))  # spectral norm ≈ 1.3: within reach of 200 steps
    weight = torch.nn.Parameter(torch.zeros(48, 32))
    optimizer = Muon([weight], lr=0.05)
    losses = []
    for step in range(200):
        loss = (inputs @ weight.T - targets).pow(2).mean()
        losses.append(loss.item())
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = 0.05 * (1 - step / 200)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert losses[-1] < 0.01 * losses[0]
