"""The post-norm transformer block: ``h = norm1(h + attn(h)); h = norm2(h + ffn(h))``."""

from __future__ import annotations

import torch
from torch import nn

from lash_kernels import RMSNorm, add_rms_norm

from lash.modules.attention import LayerCache, MultiHeadAttention
from lash.modules.ffn import GatedLinearUnit


class TransformerBlock(nn.Module):
    """One post-norm layer: attention and a gated FFN, each followed by residual add + RMSNorm.

    Args:
        dim: model width.
        num_heads: attention heads.
        ffn_dim: FFN hidden width (default ``4 * dim``).
        max_seq_len: longest sequence the RoPE tables cover.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int | None = None, max_seq_len: int = 1024) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, num_heads, max_seq_len)
        self.ffn = GatedLinearUnit(dim, ffn_dim)
        self.norm1 = RMSNorm(dim)
        self.norm2 = RMSNorm(dim)

    def forward(
        self, h: torch.Tensor, positions: torch.Tensor | None = None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """``(B, T, D)`` → ``(B, T, D)``, or the last ``m`` tokens' ``(B, m, D)`` where the cache's
        mask has ``m`` query rows; training and inference alike (see :meth:`MultiHeadAttention.forward`)."""
        # Residual add and norm fused: one pass over the activations instead of two. The residual
        # comes back through each projection, whose backward adds its gradient in the GEMM.
        attn, h = self.attn.with_residual(h, positions, cache)
        h, _ = add_rms_norm(attn, h, self.norm1.weight, self.norm1.eps)  # (B, T, D)
        ffn, h = self.ffn.with_residual(h)
        h, _ = add_rms_norm(ffn, h, self.norm2.weight, self.norm2.eps)
        return h
