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
def inference_weights(model: nn.Module) -> Iterator[None]:
    """For the duration, every block's stacked q/k/v and gate/value weights are built once, not per call.

    A block projects q, k, v with one GEMM and gate and value with another, over weights it
    stacks on every call (so training's gradients reach each parameter). Here they are stacked
    once on entry and dropped on exit, so the parameters, the state dict and training are
    untouched; the weights must not change inside. Decoding and early exit run under it.
    """
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    with torch.no_grad():
        for block in blocks:
            attn, ffn = block.attn, block.ffn
            attn.qkv_weight = torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))  # (3D, D)
            ffn.w13_weight = torch.cat((ffn.w1.weight, ffn.w3.weight))  # (2F, D)
    try:
        yield
    finally:
        for block in blocks:
            block.attn.qkv_weight = block.ffn.w13_weight = None

__all__ = [
    "GatedLinearUnit",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryPositionalEmbedding",
    "TransformerBlock",
    "inference_weights",
]
