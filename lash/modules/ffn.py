"""The gated feed-forward network: ``w2(silu(w1(x)) * w3(x))`` (SwiGLU, Shazeer 2020)."""

from __future__ import annotations

import torch
from torch import nn

from lash_kernels import swiglu

from lash.modules.projection import project


class GatedLinearUnit(nn.Module):
    """SwiGLU feed-forward block.

    Args:
        dim: model width.
        ffn_dim: hidden width of the gate and value projections (default ``4 * dim``).
    """

    def __init__(self, dim: int, ffn_dim: int | None = None) -> None:
        super().__init__()
        ffn_dim = 4 * dim if ffn_dim is None else ffn_dim
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)  # down projection
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)  # value
        # Gate and value from one GEMM over [W1; W3] (2·F, D): stacked per call in training
        # (lash.modules.projection), kept here while inference runs (lash.modules.inference_weights).
        self.w13_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.with_residual(x)[0]

    def with_residual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ffn(x), x)``, x passed on as the block's residual (see :func:`project`)."""
        gate_value, x = project(x, (self.w1.weight, self.w3.weight), self.w13_weight)  # (B, T, 2F)
        # silu(gate) · value in one launch on CUDA, whose backward hands the GEMM one (B, T, 2F) gradient.
        return self.w2(swiglu(gate_value)), x  # (B, T, D)
