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
weight.

RoPE: every supported family's attention calls its modeling module's
``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``, which evaluates ``q * cos +
rotate_half(q) * sin`` in the activations' dtype with ``(B, T, head_dim)`` tables already cast to
it. :func:`lash_kernels.apply_rotary` with ``eager_rounding`` rounds the same way, so LASH's
version is bitwise the model's (seen on an H200 in bf16 and fp16, outputs and gradients; under
``torch.compile`` within one rounding step, see ``apply_rotary``). Rotary variants only change
the tables, which the model still builds; partial rotary (Phi-3 with ``partial_rotary_factor``)
and other layouts go to the family's own function. Where LASH's dispatch picks torch (CPU
tensors), ``apply_rotary``'s reference evaluates the model's own formula.
Hugging Face calls the function as a module global, so the swap is made in the family's module,
for every model of that family in the process; being exact in eager mode, it changes none of
their numbers.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch
from torch import nn

from lash_kernels import KERNEL_DTYPES, apply_rotary, rms_norm

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


def lash_rotary_pos_emb(original: Callable) -> Callable:
    """A family's ``apply_rotary_pos_emb`` on LASH's RoPE kernel, falling back to ``original``.

    :func:`lash_kernels.apply_rotary` takes the call where it reproduces ``original`` exactly:
    ``unsqueeze_dim=1``, ``(B, H, T, D)`` q and k and ``(B or 1, T, D)`` tables in one kernel
    dtype, full rotary (tables as wide as the heads); it then picks kernel or torch itself.
    """

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (
            unsqueeze_dim == 1
            and q.ndim == k.ndim == 4
            and cos.ndim == sin.ndim == 3
            and cos.shape[-1] == q.shape[-1]
            and q.dtype == k.dtype == cos.dtype == sin.dtype
            and q.dtype in KERNEL_DTYPES
        ):
            return apply_rotary(q, k, cos, sin, eager_rounding=True)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.lash_original = original
    return apply_rotary_pos_emb


def use_lash_kernels(model: nn.Module, *, rope: bool = True) -> dict[str, int]:
    """Run ``model``'s RMSNorms and (with ``rope``) its RoPE on LASH's kernels, in place.

    RMSNorms of the classes :data:`RMS_NORMS` knows become :class:`LashRMSNorm` (others are left
    alone; parameters stay the same objects, so optimizers built before keep working). RoPE is
    swapped in the modeling module of each attention class that calls a module-level
    ``apply_rotary_pos_emb`` (see the module docstring); calling this twice swaps nothing twice.

    Returns:
        ``{"RMSNorm": norms replaced, "RoPE": attention modules whose RoPE now runs on LASH's}``.
    """
    swapped = {"RMSNorm": 0, "RoPE": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            offset = RMS_NORMS.get(type(child).__name__)
            if offset is None:
                continue
            eps = child.eps if offset else child.variance_epsilon
            setattr(parent, name, LashRMSNorm(child.weight, eps, offset))
            swapped["RMSNorm"] += 1
    if rope:
        for module in model.modules():
            source = sys.modules.get(type(module).__module__)
            original = getattr(source, "apply_rotary_pos_emb", None)
            if not type(module).__name__.endswith("Attention") or original is None:
                continue
            if not hasattr(original, "lash_original"):
                source.apply_rotary_pos_emb = lash_rotary_pos_emb(original)
            swapped["RoPE"] += 1
    return swapped
