"""RoPE's Triton kernel, its launcher and the ``lash::rotary`` ``torch.library`` op.

Layers: ``_rotary_kernel`` (Triton) → ``_rotary`` launcher → ``lash::rotary`` registered with
``torch.library.triton_op``, whose autograd rotates back (``inverse`` flipped), and its twin
``autograd.Function`` for eager calls (:func:`rotary_call` picks one). The maths and the envelope
are in :mod:`lash_kernels.ops.rotary`, whose :func:`apply_rotary` calls :func:`rotary_call`.
Imported only where Triton is installed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lash_kernels._launch import call_op, cdiv, launch, next_power_of_2, sm_count, twin_function
from lash_kernels.aot_types import ARCHS, KernelVariant, pointer

@triton.jit
def _rotate_heads(
    X,  # pointer to the input [B, H, T, D] of this tensor (q or k)
    O,  # pointer to the output, same shape
    stride_xb,  # input strides over batch, head, position (the head dim is unit-stride)
    stride_xh,
    stride_xt,
    stride_ob,  # output strides over batch, head, position
    stride_oh,
    stride_ot,
    n_heads,  # H of this tensor
    first_head,  # this program's first head; it takes HEADS in a row
    pid_b,  # batch index of this program
    t,  # (BLOCK_T,) positions of this program
    d,  # (BLOCK_H,) offsets inside one half of the head dimension
    mask,  # (BLOCK_T, BLOCK_H) valid positions × valid offsets
    cos_lo,  # (BLOCK_T, BLOCK_H) fp32 table halves, loaded once for all heads
    cos_hi,
    sin_lo,
    sin_hi,
    HALF: tl.constexpr,  # D / 2
    HEADS: tl.constexpr,  # heads per program
    STAGES: tl.constexpr,  # heads in flight: the loop's loads run STAGES - 1 heads ahead
    EAGER_ROUNDING: tl.constexpr,  # round tables, each product and the sum to the output dtype
):
    t64 = t.to(tl.int64)[:, None]
    x_rows = X + pid_b.to(tl.int64) * stride_xb + t64 * stride_xt + d[None, :]  # (BLOCK_T, BLOCK_H) of head 0
    o_rows = O + pid_b.to(tl.int64) * stride_ob + t64 * stride_ot + d[None, :]
    out_ty = O.dtype.element_ty
    if EAGER_ROUNDING:  # eager torch's `x * cos` in the output dtype multiplies rounded tables
        cos_lo, cos_hi = cos_lo.to(out_ty).to(tl.float32), cos_hi.to(out_ty).to(tl.float32)
        sin_lo, sin_hi = sin_lo.to(out_ty).to(tl.float32), sin_hi.to(out_ty).to(tl.float32)
    # Software-pipelined over the heads: the next STAGES - 1 heads' tiles load into shared
    # memory (cp.async on sm >= 80) while this one is rotated and stored.
    for j in tl.range(0, HEADS, num_stages=STAGES):
        h = (first_head + j).to(tl.int64)
        m = tl.where(h < n_heads, mask, False)  # not `mask & (h < n_heads)`: Triton 3.9's interpreter makes that int32
        x_lo = tl.load(x_rows + h * stride_xh, mask=m, other=0.0).to(tl.float32)
        x_hi = tl.load(x_rows + h * stride_xh + HALF, mask=m, other=0.0).to(tl.float32)
        if EAGER_ROUNDING:  # products of two 16-bit floats are exact in fp32: one rounding each
            o_lo = (x_lo * cos_lo).to(out_ty).to(tl.float32) - (x_hi * sin_lo).to(out_ty).to(tl.float32)
            o_hi = (x_hi * cos_hi).to(out_ty).to(tl.float32) + (x_lo * sin_hi).to(out_ty).to(tl.float32)
        else:
            o_lo = x_lo * cos_lo - x_hi * sin_lo
            o_hi = x_hi * cos_hi + x_lo * sin_hi
        tl.store(o_rows + h * stride_oh, o_lo.to(out_ty), mask=m)
        tl.store(o_rows + h * stride_oh + HALF, o_hi.to(out_ty), mask=m)


@triton.jit
def _rotary_kernel(
    Q,  # pointer to q [B, Hq, T, D]
    K,  # pointer to k [B, Hk, T, D]
    QO,  # pointer to the rotated q
    KO,  # pointer to the rotated k
    COS,  # pointer to the cos table [T, D] (or [T, D/2] with HALF_TABLES) of each batch row (batch stride 0: shared)
    SIN,  # pointer to the sin table, laid out like COS
    stride_qb,  # q strides over batch, head, position
    stride_qh,
    stride_qt,
    stride_kb,  # k strides over batch, head, position
    stride_kh,
    stride_kt,
    stride_qob,  # rotated-q strides
    stride_qoh,
    stride_qot,
    stride_kob,  # rotated-k strides
    stride_koh,
    stride_kot,
    stride_cos_b,  # COS strides over batch and position
    stride_cos_t,
    stride_sin_b,  # SIN strides over batch and position
    stride_sin_t,
    POS,  # pointer to int64 positions [B, T] (read only when HAS_POSITIONS): the table row of each token
    stride_pos_b,  # elements between rows of POS (0: one set of positions for every row)
    T,  # sequence length
    HQ,  # heads of q
    HK,  # heads of k
    HALF: tl.constexpr,  # D / 2
    INVERSE: tl.constexpr,  # apply the transpose (backward) instead of the rotation
    HAS_POSITIONS: tl.constexpr,  # the tables are indexed by POS, not by the token's own index t
    HALF_TABLES: tl.constexpr,  # the tables hold one half, c, of cat(c, c): both halves read it
    EAGER_ROUNDING: tl.constexpr,  # round as eager torch in the output dtype does (see apply_rotary)
    BLOCK_T: tl.constexpr,  # positions per program
    BLOCK_H: tl.constexpr,  # next power of two ≥ D / 2
    HEADS: tl.constexpr,  # heads per program: programs cover ceil(HQ / HEADS) q chunks, then the k chunks
    STAGES: tl.constexpr,  # heads whose loads are in flight at once
):
    """One program: BLOCK_T positions of one batch row, HEADS heads of q or of k.

    The grid is (position blocks × batch rows, head chunks): many small programs, so an SM holds
    several and their pipelined loads. The rows share the first axis with the position blocks
    (the row is the slower index): CUDA caps the second axis at 65535 programs. The tables are
    the same for every head: one load per program, reused by its HEADS heads (and served from L2
    to the other chunks).
    """
    t_blocks = tl.cdiv(T, BLOCK_T)
    pid_b = tl.program_id(0) // t_blocks
    pid_t = tl.program_id(0) % t_blocks
    pid_h = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_H)
    mask = (t < T)[:, None] & (d < HALF)[None, :]
    if HAS_POSITIONS:
        row = tl.load(POS + pid_b.to(tl.int64) * stride_pos_b + t, mask=t < T, other=0)  # (BLOCK_T,)
    else:
        row = t
    cos_ptr = COS + pid_b.to(tl.int64) * stride_cos_b + row[:, None] * stride_cos_t + d[None, :]
    sin_ptr = SIN + pid_b.to(tl.int64) * stride_sin_b + row[:, None] * stride_sin_t + d[None, :]
    cos_lo = tl.load(cos_ptr, mask=mask, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_ptr, mask=mask, other=0.0).to(tl.float32)
    if HALF_TABLES:
        cos_hi, sin_hi = cos_lo, sin_lo
    else:
        cos_hi = tl.load(cos_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        sin_hi = tl.load(sin_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        sin_lo, sin_hi = -sin_hi, -sin_lo
    q_chunks = tl.cdiv(HQ, HEADS)
    if pid_h < q_chunks:
        _rotate_heads(
            Q, QO, stride_qb, stride_qh, stride_qt, stride_qob, stride_qoh, stride_qot, HQ, pid_h * HEADS, pid_b,
            t, d, mask, cos_lo, cos_hi, sin_lo, sin_hi, HALF, HEADS, STAGES, EAGER_ROUNDING,
        )  # fmt: skip
    else:
        _rotate_heads(
            K, KO, stride_kb, stride_kh, stride_kt, stride_kob, stride_koh, stride_kot, HK, (pid_h - q_chunks) * HEADS,
            pid_b, t, d, mask, cos_lo, cos_hi, sin_lo, sin_hi, HALF, HEADS, STAGES, EAGER_ROUNDING,
        )  # fmt: skip


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is unit-stride (any other strides are fine), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _Plan(NamedTuple):
    block_t: int
    block_h: int
    heads: int
    num_warps: int
    stages: int
    grid: tuple[int, int]


NUM_WARPS = 4
MIN_PROGRAMS_PER_SM = 8  # the grid the plan aims for: enough programs that every SM holds several


def _plan(t: int, b: int, hq: int, hk: int, half: int, sms: int) -> _Plan:
    """Tile, heads per program and grid for ``b × (hq + hk)`` heads of ``t`` positions.

    A head's tile is ``BLOCK_T × 2·BLOCK_H`` = 2048 elements (16 per thread at 4 warps); 4
    stages keep 3 tiles loading per program. A program takes 4 heads where that still gives
    ``MIN_PROGRAMS_PER_SM`` programs per SM, else 2 or 1. The tile depends on D only, so a
    dynamic sequence length under torch.compile does not specialise the graph.
    """
    block_h = next_power_of_2(half)
    block_t = max(1, 1024 // block_h)
    blocks = cdiv(t, block_t) * b
    heads = next((h for h in (4, 2) if blocks * (cdiv(hq, h) + cdiv(hk, h)) >= MIN_PROGRAMS_PER_SM * sms), 1)
    grid = (blocks, cdiv(hq, heads) + cdiv(hk, heads))
    return _Plan(block_t, block_h, heads, NUM_WARPS, min(4, heads + 1), grid)


def static_variants(shape, dtype: torch.dtype, arch: int) -> list:
    """The launches :mod:`lash_kernels.tools.aot_check` compiles: the rotation and its transpose on
    contiguous ``[batch, heads, seq, head_dim]`` q and k, fp32 half tables (LASH's own)."""
    b, h, t, dim = shape.batch, shape.heads, shape.seq, shape.head_dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = _plan(t, b, h, h, dim // 2, ARCHS[arch].sms)
    act, f32 = pointer(dtype), pointer(torch.float32)
    strides = [f"stride_{x}{y}" for x in ("q", "k", "qo", "ko") for y in ("b", "h", "t")]
    tables = ["stride_cos_b", "stride_cos_t", "stride_sin_b", "stride_sin_t"]  # one shared table
    signature = dict(Q=act, K=act, QO=act, KO=act, COS=f32, SIN=f32, **dict.fromkeys(strides, "i32"),
                     **dict.fromkeys(tables, "i32"), POS=pointer(torch.int64), stride_pos_b="i32", T="i32",
                     HQ="i32", HK="i32", HALF="constexpr", INVERSE="constexpr", HAS_POSITIONS="constexpr",
                     HALF_TABLES="constexpr", EAGER_ROUNDING="constexpr", BLOCK_T="constexpr", BLOCK_H="constexpr",
                     HEADS="constexpr", STAGES="constexpr")  # fmt: skip
    ints = dict(zip(strides, [h * t * dim, t * dim, dim] * 4), **dict(zip(tables, [0, dim // 2] * 2)), T=t, HQ=h, HK=h)
    tile = plan.block_t * dim * itemsize  # one head's q or k tile
    return [
        KernelVariant(
            f"rotary.{'backward' if inverse else 'forward'}", _rotary_kernel, signature,
            dict(HALF=dim // 2, INVERSE=inverse, HAS_POSITIONS=False, HALF_TABLES=True, EAGER_ROUNDING=False,
                 BLOCK_T=plan.block_t, BLOCK_H=plan.block_h, HEADS=plan.heads, STAGES=plan.stages),
            plan.num_warps, plan.stages, math.prod(plan.grid), dict(ints, stride_pos_b=0),
            bytes_in_flight=tile * max(1, plan.stages - 1), bytes_moved=4 * b * h * t * dim * itemsize,
        )
        for inverse in (False, True)
    ]  # fmt: skip


def _table_strides(table: torch.Tensor) -> tuple[int, int]:
    """(batch, position) strides of a ``[T, D]`` or ``[1 or B, T, D]`` table; 0 over batch when shared."""
    if table.ndim == 2 or table.shape[0] == 1:
        return 0, table.stride(-2)
    return table.stride(0), table.stride(1)


def _rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    inverse: bool,
    eager_rounding: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel over (position blocks, batch); returns the rotated ``(q, k)``."""
    q, k, cos, sin = _unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin)
    if positions is not None:
        positions = positions.contiguous()  # (T,) or (B, T)
    b, hq, t, dim = q.shape
    hk = k.shape[1]
    # empty_like keeps a dense input's layout (e.g. a transposed [B, T, H, D] view).
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if q.numel() + k.numel() == 0:
        return q_out, k_out
    half = dim // 2
    plan = _plan(t, b, hq, hk, half, sm_count(q.device))
    launch(_rotary_kernel)[plan.grid](
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        *q.stride()[:3],
        *k.stride()[:3],
        *q_out.stride()[:3],
        *k_out.stride()[:3],
        *_table_strides(cos),
        *_table_strides(sin),
        positions if positions is not None else cos,  # any pointer when unused
        0 if positions is None or positions.dim() == 1 else positions.stride(0),
        t,
        hq,
        hk,
        HALF=half,
        INVERSE=inverse,
        HAS_POSITIONS=positions is not None,
        HALF_TABLES=cos.shape[-1] == half,
        EAGER_ROUNDING=eager_rounding,
        BLOCK_T=plan.block_t,
        BLOCK_H=plan.block_h,
        HEADS=plan.heads,
        STAGES=plan.stages,
        num_warps=plan.num_warps,
        num_stages=plan.stages,
        # Fused multiply-adds would absorb a product's rounding (fma.rn.bf16 in place of two
        # rounded products and their rounded sum): eager rounding compiles without them.
        enable_fp_fusion=not eager_rounding,
    )
    return q_out, k_out


def _setup_rotary(ctx, inputs, output) -> None:
    _, _, cos, sin, positions, inverse, eager_rounding = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.inverse, ctx.eager_rounding = inverse, eager_rounding


def _rotary_grad(ctx, dq_out, dk_out):
    # Eager autograd of `x * cos + rotate_half(x) * sin` rounds the same way: each product of
    # the incoming gradient with a (rounded) table, then their sum.
    cos, sin, positions = ctx.saved_tensors
    dq, dk = rotary_call(dq_out, dk_out, cos, sin, positions, not ctx.inverse, ctx.eager_rounding)
    return dq, dk, None, None, None, None, None


# The op and its twin function (lash_kernels._launch.call_op picks one per call).
rotary_op = triton_op("lash::rotary", mutates_args=())(_rotary)
rotary_op.register_autograd(_rotary_grad, setup_context=_setup_rotary)
RotaryFunction = twin_function(_rotary, _setup_rotary, _rotary_grad)


def rotary_call(q, k, cos, sin, positions, inverse: bool, eager_rounding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation, differentiable, through :data:`rotary_op` or its twin (``call_op``)."""
    return call_op(rotary_op, RotaryFunction.call, q, k, cos, sin, positions, inverse, eager_rounding)
