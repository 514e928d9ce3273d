"""Several projections of one input in one GEMM, with the input passed on as the block's residual.

In a post-norm block the input ``x`` of the q/k/v (or gate/value) projection is also the
residual that the block adds back. Autograd would sum x's two gradients in a separate launch
after the GEMM that forms one of them; :func:`project` hands ``x`` on through the same function
as the projection, so its backward forms ``dx = dresidual + dy · W`` in one ``addmm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _Projection(torch.autograd.Function):
    """``(x · cat(weights)ᵀ, x)``; the backward adds the residual's gradient in the GEMM."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.cat(weights)  # (ΣO, D)
        ctx.save_for_backward(x, weight)
        ctx.sizes = [w.shape[0] for w in weights]
        ctx.set_materialize_grads(False)
        return F.linear(x, weight), x.view_as(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, dresidual: torch.Tensor | None):
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, weight.shape[0]) if dy is not None else None  # (N, ΣO)
        dx = dresidual
        if ctx.needs_input_grad[0] and dy2 is not None:
            if dresidual is None:
                dx = (dy2 @ weight).view(x.shape)
            else:
                dx = torch.addmm(dresidual.reshape(-1, x.shape[-1]), dy2, weight).view(x.shape)
        if dy2 is None or not any(ctx.needs_input_grad[1:]):
            return dx, *(None for _ in ctx.sizes)
        dweight = dy2.t() @ x.reshape(-1, x.shape[-1])  # (ΣO, D)
        return dx, *dweight.split(ctx.sizes)


def project(x: torch.Tensor, weights: tuple[torch.Tensor, ...], stacked: torch.Tensor | None = None):
    """``(F.linear(x, cat(weights)), x)``: one GEMM for every projection, and ``x`` as the residual.

    Args:
        x: ``(..., D)`` input.
        weights: ``(O_i, D)`` weights whose outputs are laid side by side.
        stacked: their concatenation when the caller already holds it (inference).

    Returns:
        ``(y, residual)``: ``y`` of shape ``(..., ΣO_i)`` and ``x`` itself (a view, when training).
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
    if stacked is not None or not needs_grad or torch.is_autocast_enabled(x.device.type):
        # Inference or a frozen layer (ASHEM's phase 2; torch 2.11's dynamo fails on a Function
        # none of whose inputs needs a gradient), or autocast (whose casts this function would bypass).
        weight = stacked if stacked is not None else torch.cat(weights)
        return F.linear(x, weight), x
    return _Projection.apply(x, *weights)
