"""LASH's building blocks, with the names and state-dict keys of the reference implementation."""

from lash.modules.attention import MultiHeadAttention, RotaryPositionalEmbedding, rotate_half
from lash.modules.ffn import GatedLinearUnit
from lash.modules.norm import RMSNorm
from lash.modules.transformer import TransformerBlock

__all__ = [
    "GatedLinearUnit",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryPositionalEmbedding",
    "TransformerBlock",
    "rotate_half",
]
