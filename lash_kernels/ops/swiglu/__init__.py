"""The SwiGLU product ``silu(gate) · value`` of a gated feed-forward block in one Triton launch.

A LASH block projects gate and value with one GEMM, so they arrive side by side in one tensor
``h = [gate | value]`` of width ``2F``. Eager torch takes three launches for the product (silu,
mul) and four for its backward (two muls, ``silu_backward`` and the cat that stacks the two
halves' gradients for the GEMM); here each direction is one launch that reads ``h`` once.

Maths, per element, with ``σ`` the logistic sigmoid::

    out = g · σ(g) · v
    dv  = dout · g · σ(g)
    dg  = dout · v · σ(g) · (1 + g · (1 - σ(g)))

Envelope: ``h`` of any leading shape whose last dimension (``2F``, even) is unit-stride,
fp32/bf16/fp16. All maths in fp32 with one rounding to ``h``'s dtype per output, so the kernel
is at least as accurate as eager torch, which rounds silu's result before the product.

Layers: the kernel, its launcher and the ``lash::swiglu`` op in :mod:`~lash_kernels.ops.swiglu.kernels`
→ the public :func:`swiglu` here, which checks its input and picks the backend;
:func:`swiglu_reference` in pure torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lash_kernels._launch import check_kernel_dtypes
from lash_kernels.dispatch import HAS_TRITON, backend

if HAS_TRITON:  # optional off Linux: the torch reference still works there
    from lash_kernels.ops.swiglu import kernels


def swiglu_reference(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) · value`` with ``gate, value = h.chunk(2, -1)``, in eager torch."""
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU of gate and value stacked on the last dimension, differentiable in ``h``.

    Args:
        h: ``(..., 2F)``: the gate in the first half of the last dimension, the value in the second.

    Returns:
        ``silu(h[..., :F]) · h[..., F:]``, shaped ``(..., F)`` in ``h``'s dtype. On the Triton path
        its gradient is one ``(..., 2F)`` tensor, laid out as ``h``, ready for the GEMM that made ``h``.

    Raises:
        ValueError: ``h`` is not floating point, has no dimension or an odd last dimension, or
            (Triton) has a dtype other than fp32/bf16/fp16.
    """
    if h.ndim == 0 or h.shape[-1] % 2 or not h.is_floating_point():
        raise ValueError(f"h must be a floating tensor (..., 2F) with an even last dimension; got {h.dtype} {tuple(h.shape)}")
    if backend(h.device) == "torch":
        return swiglu_reference(h)
    check_kernel_dtypes("SwiGLU", h=h)
    return kernels.swiglu_call(h)


__all__ = ["swiglu", "swiglu_reference"]
