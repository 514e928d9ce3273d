"""A LASH model's parts for :mod:`lash.decoding`'s engine: its own blocks over a static KV cache.

:class:`LashParts` runs a LASH model's own blocks (their one ``forward(h, positions, cache)``,
the training code) over a static KV cache preallocated for the whole call, so decoding cannot
drift from training. CALM-style propagation (``deep_fill="propagate"``) projects an exited
token's keys and values for every deep layer with one GEMM over the layers' stacked ``k_proj``
and ``v_proj`` weights and rotates them in one launch. :mod:`lash.cuda_graphs` replays its
layer calls as CUDA graphs.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, NamedTuple

import torch

from lash.decoding import DecodeState, LayerParts
from lash.modules import inference_weights
from lash.modules.attention import LayerCache, additive_mask
from lash_kernels import apply_rotary, values_checked

if TYPE_CHECKING:
    from lash.models import DeepSupervisionTransformer


class StaticCache(NamedTuple):
    """Every layer's keys and values for a whole decoding call, allocated once."""

    keys: torch.Tensor  # (L, B, nh, S, hs)
    values: torch.Tensor  # (L, B, nh, S, hs)


class LashParts(LayerParts):
    """:class:`lash.decoding.Parts` of a LASH model.

    Args:
        model: a :class:`lash.models.StandardTransformer` (or subclass), in eval mode.
    """

    holes = True  # attention reads the cache's columns by validity alone

    def __init__(self, model: DeepSupervisionTransformer) -> None:
        self.model, self.num_layers = model, model.num_layers

    def new_cache(self, batch: int, slots: int) -> StaticCache:
        m = self.model
        shape = (m.num_layers, batch, m.num_heads, slots, m.dim // m.num_heads)
        weight = m.output_head.weight
        # Zeros, not empty memory: a masked column still meets a zero attention weight, and
        # 0 · NaN (left in uninitialised memory) would be NaN.
        return StaticCache(weight.new_zeros(shape), weight.new_zeros(shape))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embedding(ids)  # ids are checked once, by generate, or were generated

    def run(self, h: torch.Tensor, start: int, positions: torch.Tensor, layers: range, state: DecodeState,
            frozen: torch.Tensor | None = None, outputs: int | None = None) -> torch.Tensor:  # fmt: skip
        end = start + h.shape[1]  # the columns after this call: attention reads no further
        slots = torch.arange(start, end, device=h.device)  # (n,)
        return self.layers(h, slots, end, positions, layers, state.cache, state.valid, frozen, outputs)

    def layers(self, h: torch.Tensor, slots: torch.Tensor, end: int, positions: torch.Tensor, layers: range,
               cache: StaticCache, valid: torch.Tensor, frozen: torch.Tensor | None,
               outputs: int | None = None) -> torch.Tensor:  # fmt: skip
        """:meth:`run` with the call's columns given as ``slots`` (n,), a device tensor: queries read
        the valid columns up to their own, among the first ``end``."""
        n = h.shape[1]
        columns = torch.arange(end, device=h.device)  # (end,)
        allowed = (columns <= slots[:, None]) & valid[:, None, :end]  # (B, n, end): valid columns up to its own
        mask = additive_mask(allowed.unsqueeze(1), h.dtype)  # (B, 1, n, end), shared by the layers
        where = slots.expand(h.shape[0], -1)  # (B, n): every row writes the same columns
        start_h = h
        for i in layers:
            if i == layers[-1] and outputs is not None and outputs < n:
                # The last layer's queries, attention output and FFN only for the tokens whose states
                # the caller wants (the head's); the others still write their keys and values.
                mask, start_h = mask[:, :, n - outputs :], start_h[:, n - outputs :]
                frozen = None if frozen is None else frozen[:, -outputs:]
            layer_cache = LayerCache(cache.keys[i][:, :, :end], cache.values[i][:, :, :end], where, mask)
            h = self.model.layers[i](h, positions, layer_cache)
            if frozen is not None:
                h = torch.where(frozen[..., None], start_h, h)
        return h

    def fill(self, h: torch.Tensor, start: int, positions: torch.Tensor, layers: range, state: DecodeState) -> None:
        blocks = [self.model.layers[i].attn for i in layers]
        stacked = torch.cat([w for a in blocks for w in (a.k_proj.weight, a.v_proj.weight)])  # (2·D·n_layers, D)
        B, n, D = h.shape
        attn = blocks[0]
        kv = (h @ stacked.T).view(B, n, 2 * len(blocks), attn.num_heads, attn.head_dim).transpose(1, 3)  # (B, nh, 2Lk, n, hs)
        keys, values = kv[:, :, 0::2], kv[:, :, 1::2]  # (B, nh, Lk, n, hs)
        heads = keys.transpose(1, 2).reshape(B, len(blocks) * attn.num_heads, n, attn.head_dim)  # layers as heads
        with values_checked():  # the engine's own positions: in range by construction
            rotated, _ = apply_rotary(heads, heads[:, :0], attn.rope.cos, attn.rope.sin, positions=positions)
        rotated = rotated.view(B, len(blocks), attn.num_heads, n, attn.head_dim)
        cache: StaticCache = state.cache
        slots = torch.arange(start, start + n, device=h.device)
        index = slots.view(1, 1, 1, n, 1).expand(len(blocks), B, attn.num_heads, n, attn.head_dim)
        cache.keys[layers.start : layers.stop].scatter_(3, index, rotated.transpose(0, 1))
        cache.values[layers.start : layers.stop].scatter_(3, index, values.permute(2, 0, 1, 3, 4))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.output_head(h)

    def keep(self, state: DecodeState, slots: int) -> None:
        """A static cache keeps every column: later writes overwrite, masks hide what is ahead."""

    def serving(self) -> contextlib.AbstractContextManager:
        """What a whole decoding call runs under: the stacked projection weights
        (:func:`lash.modules.inference_weights`)."""
        return inference_weights(self.model)
