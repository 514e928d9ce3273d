"""LASH's building blocks, with the names and state-dict keys of the reference implementation.

Norms and rotary embeddings run through :mod:`lash_kernels` (fused Triton kernels on CUDA, their
torch references elsewhere; ``LASH_KERNELS`` overrides).
"""

from lash_kernels import RMSNorm

from lash.modules.attention import MultiHeadAttention, RotaryPositionalEmbedding
from lash.modules.ffn import GatedLinearUnit
from lash.modules.transformer import TransformerBlock

__all__ = [
    "GatedLinearUnit",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryPositionalEmbedding",
    "TransformerBlock",
]
