"""The chunked regime on Triton: the row kernel, its launcher and :func:`run_chunked`.

``_row_kernel`` is the row pass of the driver in :mod:`.chunked`: one program per row of a
``[C, V]`` chunk of logits turns it in place into CE, lse, confidence, argmax and (with
gradients) ``G = g · (softmax − onehot)``. :func:`run_chunked` runs the driver with cuBLAS
matmuls in the input dtype and this kernel. Imported only where Triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lash_kernels._launch import launch, next_power_of_2
from lash_kernels.aot_types import config_variant, pointer
from lash_kernels.dispatch import interpreting
from lash_kernels.ops.multi_exit_ce.chunked import chunked_multi_exit_ce, gpu_chunk_rows, per_exit_means, token_scales


@triton.jit
def _row_kernel(
    z_ptr,  # [C, V] logits of one chunk (input dtype or fp32), overwritten with G (HAS_GRAD)
    y_ptr,  # [C] int64 targets, 0 at ignored rows
    valid_ptr,  # [C] bool: False at ignored rows
    g_ptr,  # [C] fp32 ∂loss/∂CE per row (HAS_GRAD)
    loss_ptr,  # [C] fp32 out: CE, 0 at ignored rows
    conf_ptr,  # [C] fp32 out: max softmax probability (WITH_STATS)
    pred_ptr,  # [C] int64 out: argmax (WITH_STATS)
    V,  # vocabulary size (row stride of z)
    HAS_GRAD: tl.constexpr,  # overwrite the logits with G = g · (softmax − onehot)
    WITH_STATS: tl.constexpr,  # write confidence and argmax
    BLOCK_V: tl.constexpr,  # vocab entries per loop step
):
    """One row: online max / Σexp / argmax / target logit in fp32, then (HAS_GRAD) G in place.

    Two reads and one write of the row: the least a softmax gradient needs without keeping
    the row on chip.
    """
    row = tl.program_id(0).to(tl.int64)
    z_ptr += row * V
    y = tl.load(y_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    run_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)  # per lane, reduced at the end
    run_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        z = tl.load(z_ptr + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, z)
        # Lanes still at -inf have no value yet: keep their sum at 0 instead of exp(nan).
        scale = tl.where(new_max == float("-inf"), 0.0, tl.exp(run_max - new_max))
        run_sum = run_sum * scale + tl.where(new_max == float("-inf"), 0.0, tl.exp(z - new_max))
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    total = tl.sum(run_sum * tl.exp(run_max - row_max), axis=0)  # Σ exp(z − max) ≥ 1
    lse = row_max + tl.log(total)
    target_logit = tl.load(z_ptr + y).to(tl.float32)
    valid = tl.load(valid_ptr + row)
    tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))
    if WITH_STATS:
        tl.store(conf_ptr + row, 1.0 / total)
        best = tl.full((), V, dtype=tl.int32)  # lowest index holding the row maximum
        for v0 in range(0, V, BLOCK_V):
            z = tl.load(z_ptr + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
            best = tl.minimum(best, tl.min(tl.where(z == row_max, v0 + offs, V), axis=0))
        tl.store(pred_ptr + row, best.to(tl.int64))
    if HAS_GRAD:
        g = tl.load(g_ptr + row)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            z = tl.load(z_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            grad = g * (tl.exp(z - lse) - (cols == y).to(tl.float32))
            tl.store(z_ptr + cols, grad.to(z_ptr.dtype.element_ty), mask=cols < V)


def _row_config(V: int) -> dict:
    """Vocab entries per step and warps of the row kernel: 8 fp32 lanes per thread."""
    if interpreting():
        return dict(BLOCK_V=64, num_warps=1, num_stages=1)
    block_v = min(4096, next_power_of_2(V))  # a number even for a SymInt V (compile)
    return dict(BLOCK_V=block_v, num_warps=max(1, min(16, block_v // 256)), num_stages=1)


def _triton_row_pass(logits, targets, valid, g, with_stats):
    """The chunked driver's row pass as one launch of ``_row_kernel`` over the chunk's rows."""
    C, V = logits.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    conf = torch.empty(C if with_stats else 0, dtype=torch.float32, device=logits.device)
    pred = torch.empty(C if with_stats else 0, dtype=torch.int64, device=logits.device)
    launch(_row_kernel)[(C,)](
        logits, targets, valid, g if g is not None else loss, loss, conf, pred, V,
        HAS_GRAD=g is not None, WITH_STATS=with_stats, **_row_config(V),
    )  # fmt: skip
    return loss, conf if with_stats else None, pred if with_stats else None


def run_chunked(hiddens, weight, targets, token_weights, exit_weights, ignore_index, with_stats, need_h, need_w):
    """The chunked regime: cuBLAS matmuls in the input dtype and ``_row_kernel``.

    Returns ``(loss, per_exit, token_loss, confidence, predictions, grad_h, grad_w, h_scale)``
    (``h_scale``: see :func:`chunked_multi_exit_ce`)."""
    chunk = gpu_chunk_rows(weight.shape[1])
    chunk = chunk if not interpreting() else 32  # several chunks on the tests' small shapes
    g = token_scales(targets, exit_weights, ignore_index, token_weights)  # (K, N)
    loss, token_loss, *rest = chunked_multi_exit_ce(
        hiddens, weight, targets, g, ignore_index, with_stats, need_h, need_w, _triton_row_pass, chunk, hiddens.dtype
    )
    return loss, per_exit_means(token_loss, targets, ignore_index), token_loss, *rest


def row_variants(shape, dtype: torch.dtype) -> list:
    """The row kernel's launch at ``shape`` for :mod:`lash_kernels.tools.aot_check`: one chunk of rows."""
    V, rows = shape.vocab, shape.exits * shape.tokens
    act, f32, i64 = pointer(dtype), pointer(torch.float32), pointer(torch.int64)
    chunk = min(rows, gpu_chunk_rows(shape.hidden))
    signature = dict(z_ptr=act, y_ptr=i64, valid_ptr="*i1", g_ptr=f32, loss_ptr=f32, conf_ptr=f32, pred_ptr=i64)
    flags = dict(HAS_GRAD=True, WITH_STATS=True)
    return [
        config_variant(
            "multi_exit_ce.row", _row_kernel, signature | dict(V="i32"), _row_config(V), flags, chunk, dict(V=V)
        )
    ]
