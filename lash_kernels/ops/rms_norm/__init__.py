"""RMSNorm and residual-add + RMSNorm as fused Triton kernels.

Maths, per row ``s`` of length ``N`` (``s = x`` for :func:`rms_norm`, ``s = x + residual`` for
:func:`add_rms_norm`)::

    r = 1 / sqrt(mean(s²) + eps)          (fp32, saved for the backward)
    y = s · r · w

Backward, with ``g = dy · w`` and ``ŝ = s · r``::

    ∂r/∂s_j = -r³ s_j / N
    ds_j    = r · g_j + Σ_i g_i s_i · (-r³ s_j / N) = r · (g_j - ŝ_j · mean(g · ŝ))
    dw      = Σ_rows dy · ŝ

For :func:`add_rms_norm` the sum ``s`` is also an output, so its incoming gradient is added to
``ds``; then ``dx = dresidual = ds`` (the add passes the gradient through unchanged). The same
backward kernel serves both ops, the extra gradient behind a constexpr flag.

Supported envelope of the Triton path: any leading shape (viewed as ``[M, N]``), hidden size
``N`` up to 16384 (one row fits in one block), fp32/bf16/fp16 activations and weight in any mix.
Statistics, the weight product and all reductions run in fp32.

Dtype rule: the output has the activation's dtype (for :func:`add_rms_norm` the promoted dtype of
``x`` and ``residual``, which is the dtype of ``x + residual``); the weight's dtype never changes
it, as with :func:`torch.nn.functional.rms_norm`. The gradient of the weight has the weight's
dtype. The ops carry no autocast rule, so under autocast they receive their inputs unchanged and
follow the same rule. Torch's own ``rms_norm`` is on CUDA autocast's fp32 list: it upcasts a
bf16 input and returns fp32. LASH does not upcast, because its kernels already compute in fp32
and an fp32 copy would double the memory traffic. LASH's models run their residual stream in the
autocast dtype (they cast the embedding output once), so ``add_rms_norm`` takes and returns bf16
there and no cast surrounds it or the GEMMs that read its output.

Layers: the Triton kernels, their launchers and the ``torch.library`` ops in
:mod:`~lash_kernels.ops.rms_norm.kernels` → the public :func:`rms_norm`, :func:`add_rms_norm`
and :class:`RMSNorm` here, which check their inputs and pick the backend; :func:`rms_norm_reference`
and :func:`add_rms_norm_reference` in pure torch.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from lash_kernels._launch import call_op, check_kernel_dtypes, check_one_device
from lash_kernels.dispatch import HAS_TRITON, backend

if HAS_TRITON:  # optional off Linux: the torch references still work there
    from lash_kernels.ops.rms_norm import kernels

MAX_HIDDEN = 16384


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pure-torch RMSNorm with the kernels' semantics: fp32 (or wider) maths, output in x's dtype.

    Args:
        x: ``(..., N)`` activations.
        weight: ``(N,)`` scale.
        eps: added to ``mean(x²)`` before the square root.

    Returns:
        ``(..., N)`` tensor ``x · rsqrt(mean(x², -1) + eps) · weight`` in ``x.dtype``.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)  # (..., N)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(compute)
    return y.to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch residual add + RMSNorm with the kernels' semantics.

    Args:
        x: ``(..., N)`` activations (e.g. a sublayer's output).
        residual: ``(..., N)`` residual stream, same shape as ``x``.
        weight: ``(N,)`` scale.
        eps: added to ``mean(s²)`` before the square root.

    Returns:
        ``(y, s)``: ``s = x + residual`` and ``y = s · rsqrt(mean(s², -1) + eps) · weight``, both
        ``(..., N)`` in the promoted dtype of ``x`` and ``residual``; ``y`` is computed from the
        unrounded fp32 sum.
    """
    out_dtype = torch.promote_types(x.dtype, residual.dtype)
    compute = torch.promote_types(out_dtype, torch.float32)
    s = x.to(compute) + residual.to(compute)  # (..., N)
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight.to(compute)
    return y.to(out_dtype), s.to(out_dtype)


def _check_eps(eps: float) -> float:
    """``eps`` as a float; ValueError unless it is a finite real number ≥ 0 (not a bool).

    Comparisons, not ``math.isfinite``: once dynamo has seen two values it traces ``eps`` as a
    symbolic float, and ``math.isfinite`` of one is an error under ``fullgraph=True``."""
    if isinstance(eps, bool) or not isinstance(eps, (numbers.Real, torch.SymFloat)) or not 0.0 <= eps < math.inf:
        raise ValueError(f"eps={eps!r} must be a finite real number ≥ 0")
    return float(eps)


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> float:
    """Raise ValueError for inputs outside the ops' envelope (both backends check the same); return eps as a float."""
    check_one_device(x=x, residual=residual, weight=weight)
    if x.ndim < 1 or x.shape[-1] < 1 or not x.is_floating_point():
        raise ValueError(
            f"x must be a floating tensor with a hidden size ≥ 1; got {x.dtype} of shape {tuple(x.shape)}"
        )
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight shape {tuple(weight.shape)} must be ({x.shape[-1]},), the hidden size of x")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating tensor; got {weight.dtype}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
    return _check_eps(eps)


def _check_kernel(**tensors: torch.Tensor) -> None:
    """Raise ValueError for what the Triton kernels do not cover."""
    check_kernel_dtypes("RMSNorm", **tensors)
    if tensors["x"].shape[-1] > MAX_HIDDEN:
        raise ValueError(f"hidden size {tensors['x'].shape[-1]} exceeds the Triton RMSNorm limit of {MAX_HIDDEN}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension, differentiable in ``x`` and ``weight``.

    Args:
        x: ``(..., N)`` activations, any layout.
        weight: ``(N,)`` scale, any floating dtype.
        eps: added to ``mean(x²)`` before the square root, a finite real ≥ 0.

    Returns:
        ``(..., N)`` contiguous tensor in ``x.dtype`` (see the module docstring for the dtype rule).

    Raises:
        ValueError: x and weight on two devices, weight not a floating tensor of shape ``(N,)``,
            eps not a finite real ≥ 0, or (Triton) a dtype other than fp32/bf16/fp16 or ``N``
            above 16384.
    """
    eps = _check(x, weight, eps)
    if backend(x.device) == "torch":
        return rms_norm_reference(x, weight, eps)
    _check_kernel(x=x, weight=weight)
    return call_op(kernels.rms_norm_op, kernels.RMSNormFunction.call, x, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``s = x + residual; y = rms_norm(s)``, returning both, differentiable in all inputs.

    Args:
        x: ``(..., N)`` activations, any layout.
        residual: ``(..., N)`` residual stream, same shape as ``x``.
        weight: ``(N,)`` scale.
        eps: added to ``mean(s²)`` before the square root, a finite real ≥ 0.

    Returns:
        ``(y, s)``, both ``(..., N)`` contiguous in the promoted dtype of ``x`` and ``residual``.

    Raises:
        ValueError: inputs on two devices, shapes that disagree, a weight that is not floating,
            eps not a finite real ≥ 0, or (Triton) an unsupported dtype or size.
    """
    eps = _check(x, weight, eps, residual)
    if backend(x.device) == "torch":
        return add_rms_norm_reference(x, residual, weight, eps)
    _check_kernel(x=x, residual=residual, weight=weight)
    y, s, _ = call_op(kernels.add_rms_norm_op, kernels.AddRMSNormFunction.call, x, residual, weight, eps)
    return y, s


class RMSNorm(nn.Module):
    """Drop-in RMSNorm: ``x · rsqrt(mean(x², -1) + eps) · weight`` with weight initialised to ones.

    Its state dict is exactly ``{"weight"}``, as in the original implementation's module.

    Args:
        dim: hidden size ``N``, an int ≥ 1.
        eps: added to ``mean(x²)`` before the square root, a finite real ≥ 0.

    Raises:
        ValueError: ``dim`` or ``eps`` outside those ranges.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(f"dim={dim!r} must be an int ≥ 1")
        self.eps = _check_eps(eps)
        self.weight = nn.Parameter(torch.ones(int(dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` → ``(..., dim)`` in ``x.dtype``."""
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
