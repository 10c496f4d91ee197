"""Muon: momentum SGD whose step for each weight matrix is orthogonalised.

For a matrix parameter with momentum-averaged gradient M = U S Vᵀ, Muon steps along U Vᵀ, the
semi-orthogonal matrix nearest to M: every singular direction moves by the same amount, so the
directions a raw gradient step would barely touch (small singular values, typically most of
them) learn as fast as the few dominant ones. U Vᵀ is approximated by a few Newton–Schulz
iterations, matmuls only, which run well in bfloat16 on a GPU. The idea is Keller Jordan's
("Muon: An optimizer for hidden layers in neural networks", 2024); this is an implementation
of it, not a copy.

Muon is for the 2-D matrices inside the network. Embeddings (a lookup, not a linear map), the
output projection, norms and biases belong with AdamW; ``model.optim.build_optimizer`` splits
them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

# Coefficients (a, b, c) of the odd quintic p(s) = a·s + b·s³ + c·s⁵ applied to the singular
# values at each iteration. The slope a > 3 lifts small singular values towards 1 in few steps,
# at the price of not converging exactly: after 5 iterations every singular value of a
# normalised matrix lands in roughly [0.7, 1.2], close enough to 1 for a descent direction.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5


def orthogonalize(matrices: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """≈ U Vᵀ of each ``M = U S Vᵀ`` over the last two dimensions (leading ones are a batch).

    Runs in bfloat16 on CUDA (tensor-core matmuls; the iteration tolerates the rounding) and
    float32 elsewhere; the result has that dtype. A zero matrix stays zero.
    """
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = matrices.bfloat16() if matrices.is_cuda else matrices.float()
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT  # iterate on the wide orientation, whose Gram matrix x·xᵀ is the smaller one
    # Dividing by the Frobenius norm puts every singular value in [0, 1], where p converges.
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x


class Muon(torch.optim.Optimizer):
    """Orthogonalised Nesterov momentum for 2-D parameters.

    Per parameter W (fan_out × fan_in) with gradient G:
    ``B ← momentum·B + G``; ``O = orthogonalize(G + momentum·B)``;
    ``W ← W·(1 - lr·weight_decay) - lr·lr_scale·sqrt(max(1, fan_out/fan_in))·O``.

    - ``lr_scale`` separates Muon's step size from the schedule: a training loop that writes one
      learning rate into every group of a combined optimizer (AdamW's scale) still gets
      ``lr·lr_scale`` for Muon's step, while weight decay stays at ``lr·weight_decay`` per step,
      the same rate as AdamW's matrices.
    - O has unit singular values, so its RMS entry is 1/sqrt(max(fan_out, fan_in)) whatever the
      gradient's scale. The sqrt(max(1, fan_out/fan_in)) factor makes the step's effect on a
      layer's output about the same for tall matrices (expanding, e.g. an MLP's input
      projection) as for square and wide ones.
    - ``stacked_matrices`` > 1 treats a parameter as that many matrices stacked along its rows
      (e.g. a fused query, key and value projection) and orthogonalises each on its own; a tuple
      gives their row counts when they differ (grouped-query attention's narrower keys and values).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        lr_scale: float = 1.0,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        stacked_matrices: int | tuple[int, ...] = 1,
        ns_steps: int = NEWTON_SCHULZ_STEPS,
    ) -> None:
        if lr < 0 or lr_scale <= 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(
                f"Muon needs lr >= 0, lr_scale > 0, 0 <= momentum < 1, weight_decay >= 0 and ns_steps >= 1; got "
                f"lr={lr}, lr_scale={lr_scale}, momentum={momentum}, weight_decay={weight_decay}, ns_steps={ns_steps}"
            )
        defaults = dict(
            lr=lr, lr_scale=lr_scale, momentum=momentum, weight_decay=weight_decay,
            stacked_matrices=stacked_matrices, ns_steps=ns_steps,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            blocks = group["stacked_matrices"]
            for parameter in group["params"]:
                fits = (parameter.size(0) % blocks == 0 if isinstance(blocks, int) else sum(blocks) == parameter.size(0))
                if parameter.dim() != 2 or not fits:
                    raise ValueError(
                        f"Muon optimises 2-D matrices whose rows split into stacked_matrices={blocks} blocks (equal "
                        f"ones for a count); got a parameter of shape {tuple(parameter.shape)}. Give vectors, "
                        "embeddings and output projections to AdamW."
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, blocks = group["momentum"], group["stacked_matrices"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(parameter)
                buffer = state["momentum_buffer"]
                buffer.mul_(momentum).add_(parameter.grad)
                direction = parameter.grad.add(buffer, alpha=momentum)  # Nesterov: look one step ahead
                rows, columns = parameter.shape
                if isinstance(blocks, int):  # equal blocks: orthogonalised as one batch
                    update = orthogonalize(direction.view(blocks, rows // blocks, columns), group["ns_steps"])
                    update = update.reshape(parameter.shape) * math.sqrt(max(1.0, rows / blocks / columns))
                else:
                    update = torch.cat([orthogonalize(part.unsqueeze(0), group["ns_steps"])[0]
                                        * math.sqrt(max(1.0, part.size(0) / columns)) for part in direction.split(blocks)])
                parameter.mul_(1.0 - group["lr"] * group["weight_decay"])
                parameter.add_(update, alpha=-group["lr"] * group["lr_scale"])
        return loss
