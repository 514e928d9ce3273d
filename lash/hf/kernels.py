"""LASH's RMSNorm kernel in a Hugging Face model, with each family's exact semantics.

Two families of RMSNorm exist among the supported models (their sources differ in one line):

- Llama, Mistral, Qwen2, Qwen3, Phi-3: ``w · (x·r).to(x.dtype)`` with ``r = rsqrt(mean(x²) + eps)``
  in fp32: the normalised value is rounded to the input dtype *before* the weight multiplies
  it, and the result has the promoted dtype of weight and input.
- Gemma: ``(x·r · (1 + w)).to(x.dtype)``, all in fp32, rounded once.

:func:`lash_kernels.rms_norm` computes ``x·r·w`` in fp32 and rounds once to ``x.dtype``: Gemma's
rule with the weight ``1 + w``, and Llama's rule whenever input and weight are fp32 (rounding
to fp32 is then the identity). For a Llama-style norm in lower precision the kernel normalises
with a unit weight (so the rounding happens where Hugging Face's does) and torch applies the
weight. RoPE is left to the model: its variants (scaling, partial rotary) are not all LASH's.
"""

from __future__ import annotations

import torch
from torch import nn

from lash_kernels import rms_norm

# Class name → whether the norm is Gemma's (1 + w, one rounding) rather than Llama's.
RMS_NORMS = {
    "LlamaRMSNorm": False,
    "MistralRMSNorm": False,
    "Qwen2RMSNorm": False,
    "Qwen3RMSNorm": False,
    "Phi3RMSNorm": False,
    "GemmaRMSNorm": True,
}


class LashRMSNorm(nn.Module):
    """A Hugging Face RMSNorm's drop-in on :func:`lash_kernels.rms_norm`, sharing its weight.

    Its state dict is the replaced module's (``weight``), so checkpoints load either way.

    Args:
        weight: the replaced module's ``(N,)`` weight Parameter (kept, not copied).
        eps: its epsilon.
        offset: Gemma's rule (scale by ``1 + weight``, one rounding) instead of Llama's.
    """

    def __init__(self, weight: nn.Parameter, eps: float, offset: bool) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., N)`` → ``(..., N)``: ``x.dtype`` (Gemma), else the promoted dtype of weight and ``x``."""
        if self.offset:
            return rms_norm(x, 1.0 + self.weight.float(), self.eps)
        if x.dtype == torch.promote_types(x.dtype, self.weight.dtype) == torch.float32:
            return rms_norm(x, self.weight, self.eps)  # fp32 out: Hugging Face's rounding is the identity
        unit = torch.ones(x.shape[-1], dtype=torch.float32, device=x.device)  # (N,): normalise only
        return self.weight * rms_norm(x, unit, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}"


def use_lash_kernels(model: nn.Module) -> int:
    """Replace every RMSNorm of ``model`` that :data:`RMS_NORMS` knows by a :class:`LashRMSNorm`, in place.

    Norms of other classes are left alone. Parameters stay the same objects, so optimizers
    built before keep working.

    Returns:
        How many modules were replaced.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            offset = RMS_NORMS.get(type(child).__name__)
            if offset is None:
                continue
            eps = child.eps if offset else child.variance_epsilon
            setattr(parent, name, LashRMSNorm(child.weight, eps, offset))
            replaced += 1
    return replaced
