"""The fused regime's token weights: the labelled tokens' weights over their maximum, in one launch.

The fused kernels sum ``t_n`` and ``w_k·t_n·CE_kn`` in fp32, and those sums overflow for weights
near fp32's largest value and fall below the divisor's clamp for subnormal ones, although the
weighted mean does not depend on the weights' scale. ``_token_weights_kernel`` first writes
``t_n = token_weights[n] / max_labelled token_weights`` (0 at ignored tokens; all 0 when every
labelled token weighs 0) as a contiguous fp32 ``[N]`` tensor, what
:func:`~lash_kernels.ops.multi_exit_ce.reference.labelled_token_weights` returns in torch; the
merge and grad kernels read it. One program (a pass for the maximum, one to divide): ``N``
reads are nothing beside the head matmuls of the same call. Imported only where Triton is
installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lash_kernels._launch import launch
from lash_kernels.aot_types import config_variant, pointer
from lash_kernels.dispatch import interpreting


@triton.jit
def _labelled_weights(
    tw_ptr,  # [N] token weights, any floating dtype, element stride ``stride``
    y_ptr,  # [N] int64 targets
    n,  # [BLOCK] token indices
    N,  # tokens
    stride,  # element stride of tw
    ignore_index,  # target value of tokens without a label
    WIDE: tl.constexpr,  # fp64 weights: kept in fp64 (fp32 cannot hold them all)
):
    """The weights of tokens ``n`` in fp32 (fp64 when ``WIDE``), 0 at ignored tokens and past ``N``."""
    mask = n < N
    y = tl.load(y_ptr + n, mask=mask, other=ignore_index)
    w = tl.load(tw_ptr + n.to(tl.int64) * stride, mask=mask, other=0.0)
    if WIDE:
        w = w.to(tl.float64)
    else:
        w = w.to(tl.float32)
    return tl.where(y != ignore_index, w, 0.0)


@triton.jit
def _token_weights_kernel(
    tw_ptr,  # [N] token weights (finite, ≥ 0), any floating dtype, element stride ``stride``
    y_ptr,  # [N] int64 targets
    t_ptr,  # [N] fp32 out: t_n, the labelled tokens' weights over their maximum, 0 at ignored ones
    N,  # tokens
    stride,  # element stride of tw
    ignore_index,  # target value of tokens without a label
    WIDE: tl.constexpr,  # fp64 weights: the maximum and the division in fp64
    BLOCK: tl.constexpr,  # tokens per loop step
):
    """One program: the maximum over the labelled tokens, then every weight divided by it (by 1 when it is 0)."""
    offs = tl.arange(0, BLOCK)
    peak = _labelled_weights(tw_ptr, y_ptr, offs, N, stride, ignore_index, WIDE)  # per lane
    for n0 in range(BLOCK, N, BLOCK):
        peak = tl.maximum(peak, _labelled_weights(tw_ptr, y_ptr, n0 + offs, N, stride, ignore_index, WIDE))
    top = tl.max(peak, axis=0)
    divisor = tl.where(top > 0, top, 1.0)
    for n0 in range(0, N, BLOCK):
        w = _labelled_weights(tw_ptr, y_ptr, n0 + offs, N, stride, ignore_index, WIDE)
        if WIDE:
            t = (w / divisor).to(tl.float32)  # fp64 division rounds to nearest
        else:
            t = tl.math.div_rn(w, divisor)  # IEEE division; ``/`` would be the approximate div.full.f32
        tl.store(t_ptr + n0 + offs, t, mask=n0 + offs < N)


def _config() -> dict:
    """Tokens per step and warps: 8 lanes per thread; a small block under the interpreter, so
    that the tests' few tokens take several steps."""
    return dict(BLOCK=16 if interpreting() else 1024, num_warps=1 if interpreting() else 4, num_stages=1)


def scaled_token_weights(token_weights: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``t_n`` of the fused kernels, ``(N,)`` fp32 contiguous, from one launch of ``_token_weights_kernel``."""
    t = torch.empty(targets.shape[0], dtype=torch.float32, device=targets.device)
    launch(_token_weights_kernel)[(1,)](
        token_weights, targets, t, targets.shape[0], token_weights.stride(0), ignore_index,
        WIDE=token_weights.dtype == torch.float64, **_config(),
    )  # fmt: skip
    return t


def token_weight_variants(shape) -> list:
    """The launch at ``shape`` for :mod:`lash_kernels.tools.aot_check` (fp32 weights)."""
    f32, i64 = pointer(torch.float32), pointer(torch.int64)
    signature = dict(tw_ptr=f32, y_ptr=i64, t_ptr=f32, N="i32", stride="i32", ignore_index="i32")
    return [
        config_variant(
            "multi_exit_ce.token_weights", _token_weights_kernel, signature, _config(), dict(WIDE=False), 1,
            dict(N=shape.tokens, stride=1),
        )
    ]  # fmt: skip
