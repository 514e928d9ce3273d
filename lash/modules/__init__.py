"""LASH's building blocks, with the names and state-dict keys of the reference implementation.

Norms and rotary embeddings run through :mod:`lash_kernels` (fused Triton kernels on CUDA, their
torch references elsewhere; ``LASH_KERNELS`` overrides).
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lash_kernels import RMSNorm

from lash.modules.attention import MultiHeadAttention, RotaryPositionalEmbedding
from lash.modules.ffn import GatedLinearUnit
from lash.modules.transformer import TransformerBlock


@contextlib.contextmanager
def inference_weights(model: nn.Module, buffers: dict | None = None) -> Iterator[None]:
    """For the duration, every block's stacked q/k/v and gate/value weights are built once, not per call.

    A block projects q, k, v with one GEMM and gate and value with another, over weights it
    stacks on every call (so training's gradients reach each parameter). Here they are stacked
    once on entry and dropped on exit, so the parameters, the state dict and training are
    untouched; the weights must not change inside. Decoding and early exit run under it.

    Args:
        model: the model whose blocks project with stacked weights.
        buffers: a dict the caller keeps between entries: the stacked weights are then written
            into the same tensors each time (a CUDA graph reads them by address), so they hold
            the current weights. ``None``: new tensors.
    """
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    with torch.no_grad():
        for i, block in enumerate(blocks):
            attn, ffn = block.attn, block.ffn
            attn.qkv_weight = _stacked(buffers, (i, "qkv"), (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))
            ffn.w13_weight = _stacked(buffers, (i, "w13"), (ffn.w1.weight, ffn.w3.weight))  # (2F, D)
    try:
        yield
    finally:
        for block in blocks:
            block.attn.qkv_weight = block.ffn.w13_weight = None


def _stacked(buffers: dict | None, key: tuple, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``cat(weights)``, written into ``buffers[key]`` when that tensor fits."""
    held = None if buffers is None else buffers.get(key)
    fits = held is not None and held.shape == (sum(w.shape[0] for w in weights), *weights[0].shape[1:])
    if not fits or held.dtype != weights[0].dtype or held.device != weights[0].device:
        held = torch.cat(weights)
        if buffers is not None:
            buffers[key] = held
        return held
    return torch.cat(weights, out=held)


__all__ = [
    "GatedLinearUnit",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryPositionalEmbedding",
    "TransformerBlock",
    "inference_weights",
]
