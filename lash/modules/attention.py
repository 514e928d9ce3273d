"""Causal multi-head self-attention with rotary position embeddings (Su et al., 2021).

:meth:`MultiHeadAttention.forward` is the training path (positions 0..T-1, fused RoPE, causal
SDPA). The inference paths — KV-cached decoding and compact early exit — split it into
:meth:`~MultiHeadAttention.keys_values`, :meth:`~MultiHeadAttention.queries` and
:meth:`~MultiHeadAttention.attend`, which take explicit positions and an explicit mask, so
queries can be a subset of the tokens whose keys they read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lash_kernels import apply_rotary


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
        angles = torch.cat((freqs, freqs), dim=-1)  # (L, hs)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k (one fused kernel launch on CUDA).

        Args:
            q: queries ``(B, nh, T, hs)``.
            k: keys ``(B, nh, T, hs)``.

        Returns:
            The rotated ``(q, k)``, same shapes and dtypes.
        """
        T = q.shape[-2]
        return apply_rotary(q, k, self.cos[:T], self.sin[:T])  # tables (T, hs)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate one tensor at explicit positions (the inference paths).

        The fused kernel takes one ``(T, hs)`` table shared by q and k; here queries and keys may
        sit at different positions (per row, too), so the rows are gathered and the reference
        formula ``x·cos + rotate_half(x)·sin`` applied in fp32 (or wider).

        Args:
            x: ``(B, nh, T, hs)`` queries or keys.
            positions: ``(T,)`` positions shared by every row, or ``(B, T)`` per row.

        Returns:
            The rotated ``x``, same shape and dtype.
        """
        cos, sin = self.cos[positions], self.sin[positions]  # (T, hs) or (B, T, hs)
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hs), broadcast over heads
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        x_lo, x_hi = xf.chunk(2, dim=-1)
        return (xf * cos + torch.cat((-x_hi, x_lo), dim=-1) * sin).to(x.dtype)


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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of the reference implementation also saved these two derived buffers;
        # they are recomputed here, so a strict load simply drops them.
        state_dict.pop(prefix + "rope.inv_freq", None)
        state_dict.pop(prefix + "causal_mask", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self.split_heads(self.q_proj(x))  # (B, nh, T, hs)
        k = self.split_heads(self.k_proj(x))
        v = self.split_heads(self.v_proj(x))
        q, k = self.rope(q, k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)

    def keys_values(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values of ``x`` (B, T, D) at ``positions`` (T,): two ``(B, nh, T, hs)``."""
        k = self.rope.rotate(self.split_heads(self.k_proj(x)), positions)  # (B, nh, T, hs)
        return k, self.split_heads(self.v_proj(x))

    def queries(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotated queries of ``x`` (B, Tq, D) at ``positions`` (Tq,) or (B, Tq): ``(B, nh, Tq, hs)``."""
        return self.rope.rotate(self.split_heads(self.q_proj(x)), positions)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked attention of queries over keys at positions 0..Tk-1, then the output projection.

        Args:
            q: ``(B, nh, Tq, hs)`` rotated queries.
            k: ``(B, nh, Tk, hs)`` rotated keys.
            v: ``(B, nh, Tk, hs)`` values.
            mask: boolean, True where a query may read a key: ``(Tq, Tk)`` or ``(B, 1, Tq, Tk)``
                (see :func:`causal_mask`). Every query must be allowed at least one key.

        Returns:
            ``(B, Tq, D)``.
        """
        B, _, Tq, _ = q.shape
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, Tq, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, Tq, -1))  # (B, Tq, D)


def causal_mask(query_positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Which keys (at positions 0..num_keys-1) each query may read: those at or before it.

    Args:
        query_positions: ``(Tq,)`` shared by the batch, or ``(B, Tq)`` per row.
        num_keys: Tk.

    Returns:
        Boolean ``(Tq, Tk)``, or ``(B, 1, Tq, Tk)`` for per-row positions (broadcast over heads).
    """
    keys = torch.arange(num_keys, device=query_positions.device)  # (Tk,)
    mask = keys <= query_positions.unsqueeze(-1)  # (..., Tq, Tk)
    return mask.unsqueeze(1) if query_positions.dim() == 2 else mask
