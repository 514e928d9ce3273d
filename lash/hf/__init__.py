"""LASH for Hugging Face ``transformers`` decoder-only causal LMs (the ``hf`` extra).

:func:`apply_lash` gives a model LASH's layer-wise loss through the fused multi-exit kernel;
:func:`layer_param_groups` its per-layer learning rates; :func:`use_lash_kernels` swaps its
RMSNorms and RoPE for LASH's kernels with the same semantics; :mod:`lash.hf.structure` finds a
model's parts and runs its decoder only as deep as needed; :func:`generate` decodes greedily
with early exit or self-speculation on one ``DynamicCache``.
"""

from lash.hf.generation import generate
from lash.hf.kernels import LashRMSNorm, use_lash_kernels
from lash.hf.optim import layer_param_groups
from lash.hf.structure import DecoderParts, DecoderRun, decoder_hidden_states, decoder_parts
from lash.hf.training import LashCausalLMOutput, apply_lash, lash_loss

__all__ = [
    "DecoderParts",
    "DecoderRun",
    "LashCausalLMOutput",
    "LashRMSNorm",
    "apply_lash",
    "decoder_hidden_states",
    "decoder_parts",
    "generate",
    "lash_loss",
    "layer_param_groups",
    "use_lash_kernels",
]
