"""Causal multi-head self-attention with rotary position embeddings (Su et al., 2021).

One :meth:`MultiHeadAttention.forward` serves training and inference. Without positions it is
the training path: positions 0..T-1, fused RoPE, causal SDPA. With ``positions`` and a
:class:`LayerCache` it is the inference path: the call's keys and values are written into the
cache at the given slots and its queries read the whole cache through the cache's mask, so the
queries can be a subset of the tokens whose keys they read (decoding one token against a KV
cache, or the deep tokens of an early-exit forward against every token's keys).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lash_kernels import apply_rotary, values_checked

from lash.modules.projection import project


class LayerCache(NamedTuple):
    """One layer's keys and values, where a call writes into them, and what its queries read.

    The buffers are laid out like the queries, ``(B, nh, S, hs)``, so attention reads them as
    they are; their column ``s`` is a slot, not a position (a left-padded row's first token sits
    at position 0 in a later slot).
    """

    keys: torch.Tensor  # (B, nh, S, hs), written in place
    values: torch.Tensor  # (B, nh, S, hs), written in place
    slots: torch.Tensor  # (B, n) int64: the column each of the call's n tokens writes, per row
    # (B, 1, m, S) float, 0 where a query reads a column and -inf where not. Its m rows are the
    # queries of the call's last m tokens (m <= n): the earlier ones only write their keys and
    # values, and the layer returns the last m tokens' states.
    mask: torch.Tensor


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "may read" mask as SDPA's additive mask in the queries' dtype: 0 or -inf.

    Built once per call and shared by its layers: SDPA converts a boolean mask itself, in
    every layer, with three more ops."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, -torch.inf)


class RotaryPositionalEmbedding(nn.Module):
    """Rotate-half RoPE with ``inv_freq = 1 / base^(2i / head_dim)`` at positions 0..T-1.

    The cos/sin tables are cached for ``max_seq_len`` positions as non-persistent buffers, so the
    state dict holds no RoPE entries.

    Args:
        head_dim: per-head width (even).
        max_seq_len: the longest sequence the tables cover.
        base: the frequency base.
    """

    def __init__(self, head_dim: int, max_seq_len: int = 1024, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hs/2,)
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (L, hs/2)
        # Half tables: c stands for cat(c, c) (apply_rotary), so the kernel reads half the bytes.
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k (one fused kernel launch on CUDA).

        Args:
            q: queries ``(B, nh, T, hs)``.
            k: keys ``(B, nh, T, hs)``.
            positions: ``(T,)`` or ``(B, T)`` positions of the tokens; default ``0..T-1``.

        Returns:
            The rotated ``(q, k)``, same shapes and dtypes.
        """
        if positions is None:
            T = q.shape[-2]
            return apply_rotary(q, k, self.cos[:T], self.sin[:T])  # half tables (T, hs/2)
        with values_checked():  # positions come from the decoding and early-exit engines, in range by construction
            return apply_rotary(q, k, self.cos, self.sin, positions=positions)  # rows picked in the kernel


class MultiHeadAttention(nn.Module):
    """Causal self-attention: ``o_proj(softmax(q kᵀ / sqrt(hs) + causal) v)`` with RoPE on q, k.

    Args:
        dim: model width.
        num_heads: number of heads; ``dim`` must divide evenly.
        max_seq_len: longest sequence the RoPE tables cover.
    """

    def __init__(self, dim: int, num_heads: int, max_seq_len: int = 1024) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.rope = RotaryPositionalEmbedding(self.head_dim, max_seq_len)
        # q, k and v come from one GEMM over [Wq; Wk; Wv] (3·D, D): stacked per call in training
        # (lash.modules.projection), and kept here while inference runs
        # (lash.modules.inference_weights), so decoding does not stack per token.
        self.qkv_weight: torch.Tensor | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of the reference implementation also saved these two derived buffers;
        # they are recomputed here, so a strict load simply drops them.
        state_dict.pop(prefix + "rope.inv_freq", None)
        state_dict.pop(prefix + "causal_mask", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, nh, T, hs)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """Attention of ``x`` (B, T, D) → ``(B, T, D)``.

        Args:
            x: hidden states of the tokens whose queries (and keys, values) this call computes.
            positions: ``(T,)`` or ``(B, T)`` positions of those tokens; ``None``: ``0..T-1``.
            cache: with ``positions``, where the keys and values go and what the queries read
                (its mask's rows: the last tokens whose states come back); ``None``: the tokens
                attend causally among themselves.
        """
        return self.with_residual(x, positions, cache)[0]

    def with_residual(
        self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: LayerCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` and ``x`` passed on as the block's residual (see :func:`project`)."""
        B, T, D = x.shape
        weights = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        qkv, x = project(x, weights, self.qkv_weight)  # (B, T, 3D)
        q, k, v = qkv.split(D, dim=-1)  # (B, T, D) each
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)  # (B, nh, T, hs)
        q, k = self.rope(q, k, positions)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        else:
            index = cache.slots[:, None, :, None].expand(B, self.num_heads, T, self.head_dim)
            cache.keys.scatter_(2, index, k)
            cache.values.scatter_(2, index, v)
            queries = cache.mask.shape[-2]
            if queries < T:  # only the last tokens' states are wanted
                q, x = q[:, :, T - queries :], x[:, T - queries :]
            y = F.scaled_dot_product_attention(q, cache.keys, cache.values, attn_mask=cache.mask)
        return self.o_proj(y.transpose(1, 2).flatten(2)), x  # (B, T or m, D) each
