"""The fused regime: four Triton launches for narrow heads, no logits in memory.

Taken for heads up to ``FUSED_MAX_HIDDEN`` = 256 wide (LASH's small models) on GPUs where
``tl.dot`` has tensor cores, fp32 operands only up to D = 64 (the rule and the tile tables are
in :mod:`.regime`). One call is four launches and no torch op in between (kernel boundaries
order them); with token weights, a fifth before the merge scales them to a maximum of 1
(:mod:`.token_weights`), so that the kernels' fp32 sums of them stay in range:

1. ``_fused_forward_kernel`` on a (token tiles × vocab splits) grid: partial max and Σexp of each
   row over its split (the argmax only when statistics are asked for);
2. ``_fused_merge_kernel`` over rows: lse from the splits, the target logit as one indexed dot
   ``h · W[y]``, CE (confidence, prediction), zeroed ``dH`` rows and per-program sums;
3. ``_fused_grad_kernel`` on a (vocab tiles × token splits) grid: recomputes each logits tile once,
   forms ``G = w_k·t_n·(softmax − onehot)`` (not yet divided by Σt), keeps its split's fp32
   ``Gᵀ·h`` in registers and adds ``G·W`` to the fp32 ``dH`` with atomics (last-bit order varies);
4. ``_fused_finish_kernel``: sums the partial sums and the splits' ``dW`` in a fixed order,
   divides by Σt (an fp16 ``dH`` by its largest ``w_k`` only, the rest left to the backward),
   casts ``dW`` and ``dH`` to the inputs' dtypes, writes loss and per-exit means.

Without gradients step 3 and the gradient part of 4 are skipped. Head matmuls: 4 (one recompute).
Splits aim at ≥ 4 programs per SM. fp32 operands take ``tf32x3`` dots (three TF32 products:
near-fp32 accuracy on tensor cores); 16-bit operands feed ``tl.dot`` as they are.

The maths and the backward derivation are in :mod:`lash_kernels.ops.multi_exit_ce`. Imported only
where Triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lash_kernels._launch import cdiv, device_floats, launch, next_power_of_2, sm_count
from lash_kernels.aot_types import ARCHS, config_variant, pointer
from lash_kernels.dispatch import interpreting
from lash_kernels.ops.multi_exit_ce.regime import FORWARD_TILES, GRAD_TILES, tile_key
from lash_kernels.ops.multi_exit_ce.token_weights import scaled_token_weights, token_weight_variants

PROGRAMS_PER_SM = 4  # fused grids aim for this many programs per streaming multiprocessor
G_UNIT = 4096.0  # fp16: G over its largest exit weight, times this, keeps most classes' entries normal, none above 4096


@triton.jit
def _dot(
    a,  # [M, K] operand in the input dtype
    b,  # [K, P] operand in the input dtype
    acc,  # [M, P] fp32 accumulator
    DOT_PRECISION: tl.constexpr,  # "tf32x3" for fp32 operands (see module docstring)
    UPCAST_DOT: tl.constexpr,  # interpreter only: it multiplies bf16 bit patterns as integers
):
    """``acc + a · b`` on tensor cores in the operands' dtype, accumulated in fp32."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _fused_forward_kernel(
    h_ptr,  # [K·N, D] hidden states of all exits, stacked on the token axis, contiguous
    w_ptr,  # [V, D] shared head, contiguous
    max_ptr,  # [S, K·N] fp32 out: max logit of the split
    sum_ptr,  # [S, K·N] fp32 out: Σ exp(z − max) over the split
    arg_ptr,  # [S, K·N] int32 out: argmax within the split, lowest index on ties (WITH_STATS)
    rows_total,  # K·N
    V,  # vocabulary size
    D,  # hidden size
    split_cols,  # vocab entries per split, a multiple of BLOCK_V
    WITH_STATS: tl.constexpr,  # also find the argmax
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocab entries per loop step
    BLOCK_D: tl.constexpr,  # next power of two ≥ D: whole rows in registers
    DOT_PRECISION: tl.constexpr,  # dot precision for fp32 operands
    UPCAST_DOT: tl.constexpr,  # feed tl.dot fp32 (interpreter with bf16 inputs)
):
    """Online log-sum-exp (and argmax) of one (row tile, vocab split).

    Splitting the vocabulary gives the grid ≥ 4 programs per SM at the default model's N; the merge
    kernel combines the splits exactly (``lse = M + log Σ_s sum_s · exp(max_s − M)``).
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_mask = rows < rows_total
    dims = tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)  # K·N·D may pass 2³¹
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)  # Σ exp(z − run_max)
    best = tl.zeros((BLOCK_N,), dtype=tl.int32)
    # The whole [BLOCK_N, D] tile of hidden states stays in registers for the split.
    h = tl.load(h_ptr + rows64[:, None] * D + dims[None, :], mask=row_mask[:, None] & (dims[None, :] < D), other=0.0)
    v_start = split * split_cols
    for v0 in range(v_start, tl.minimum(v_start + split_cols, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * D + dims[None, :], mask=(cols[:, None] < V) & (dims[None, :] < D), other=0.0)
        zero = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        logits = _dot(h, tl.trans(w), zero, DOT_PRECISION, UPCAST_DOT)  # [BLOCK_N, BLOCK_V]
        # -inf keeps padded columns out of the max, the sum of exponentials and the argmax.
        logits = tl.where(cols[None, :] < V, logits, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        if WITH_STATS:
            # Strict ">" keeps the earlier tile on ties; tl.argmax breaks ties to the left
            # inside a tile: together the lowest index, as torch.argmax.
            best = tl.where(tile_max > run_max, v0 + tl.argmax(logits, axis=1), best)
        new_max = tl.maximum(run_max, tile_max)  # finite from the first tile on
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
    out = split * rows_total + rows
    tl.store(max_ptr + out, run_max, mask=row_mask)
    tl.store(sum_ptr + out, run_sum, mask=row_mask)
    if WITH_STATS:
        tl.store(arg_ptr + out, best, mask=row_mask)


@triton.jit
def _fused_merge_kernel(
    h_ptr,  # [K·N, D] hidden states, stacked, contiguous
    w_ptr,  # [V, D] shared head, contiguous
    y_ptr,  # [N] int64 targets (row r of h has target y[r mod N])
    tw_ptr,  # [N] fp32 token weights over their maximum (HAS_TOKEN_WEIGHTS)
    ew_ptr,  # [K] fp32 exit weights
    max_ptr,  # [S, K·N] fp32 split maxima from the forward kernel
    sum_ptr,  # [S, K·N] fp32 split sums
    arg_ptr,  # [S, K·N] int32 split argmax (WITH_STATS)
    lse_ptr,  # [K·N] fp32 out: log-sum-exp
    loss_ptr,  # [K·N] fp32 out: CE, 0 at ignored tokens
    conf_ptr,  # [K·N] fp32 out: max softmax probability (WITH_STATS)
    pred_ptr,  # [K·N] int64 out: argmax, lowest index on ties (WITH_STATS)
    part_ptr,  # [programs, 3 + K] fp32 out: Σ t over exit 0, Σ labelled over exit 0, Σ w·t·CE, Σ CE per exit
    gh_ptr,  # [K·N, D] fp32 out: zeroed for the grad kernel's atomics (NEED_H)
    rows_total,  # K·N
    N,  # tokens per exit
    V,  # vocabulary size
    D,  # hidden size
    K,  # exits
    splits,  # S
    ignore_index,  # target value of tokens without a label
    HAS_TOKEN_WEIGHTS: tl.constexpr,  # t_n from tw_ptr (else 1 at labelled tokens)
    WITH_STATS: tl.constexpr,  # write confidence and prediction
    NEED_H: tl.constexpr,  # zero ∂loss/∂h
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two ≥ D
):
    """Per row: the splits merged, the target logit ``h · W[y]``, CE and the statistics; per
    program, the sums the loss and the gradients' scale are made of (written, not added:
    the finish kernel adds them in a fixed order)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < rows_total
    row_max = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    for s in range(splits):
        row_max = tl.maximum(row_max, tl.load(max_ptr + s * rows_total + rows, mask=row_mask, other=0.0))
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)  # Σ exp(z − row_max) ∈ [1, V]
    best = tl.full((BLOCK_R,), V, dtype=tl.int32)
    for s in range(splits):
        split_max = tl.load(max_ptr + s * rows_total + rows, mask=row_mask, other=0.0)
        total += tl.load(sum_ptr + s * rows_total + rows, mask=row_mask, other=1.0) * tl.exp(split_max - row_max)
        if WITH_STATS:  # the lowest index over the splits that reach the maximum
            arg = tl.load(arg_ptr + s * rows_total + rows, mask=row_mask, other=0)
            best = tl.minimum(best, tl.where(split_max == row_max, arg, V))
    lse = row_max + tl.log(total)
    n = rows % N
    y = tl.load(y_ptr + n, mask=row_mask, other=ignore_index)
    labelled = row_mask & (y != ignore_index)
    rows64, y64 = rows.to(tl.int64), tl.where(labelled, y, 0).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    mask_rd = row_mask[:, None] & (dims[None, :] < D)
    h = tl.load(h_ptr + rows64[:, None] * D + dims[None, :], mask=mask_rd, other=0.0).to(tl.float32)
    w_y = tl.load(w_ptr + y64[:, None] * D + dims[None, :], mask=mask_rd, other=0.0).to(tl.float32)
    ce = tl.where(labelled, lse - tl.sum(h * w_y, axis=1), 0.0)  # lse − z_y, z_y an indexed dot
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(loss_ptr + rows, ce, mask=row_mask)
    if WITH_STATS:
        tl.store(conf_ptr + rows, 1.0 / total, mask=row_mask)
        tl.store(pred_ptr + rows, best.to(tl.int64), mask=row_mask)
    if HAS_TOKEN_WEIGHTS:
        t = tl.where(labelled, tl.load(tw_ptr + n, mask=row_mask, other=0.0).to(tl.float32), 0.0)
    else:
        t = labelled.to(tl.float32)
    k = rows // N
    first = k == 0  # the label weights and counts once, not once per exit
    part = part_ptr + pid * (3 + K)
    tl.store(part, tl.sum(tl.where(first, t, 0.0), axis=0))
    tl.store(part + 1, tl.sum(tl.where(first & labelled, 1.0, 0.0), axis=0))
    exit_w = tl.load(ew_ptr + k, mask=row_mask, other=0.0)
    tl.store(part + 2, tl.sum(exit_w * t * ce, axis=0))
    for j in range(K):
        tl.store(part + 3 + j, tl.sum(tl.where(k == j, ce, 0.0), axis=0))
    if NEED_H:
        tl.store(gh_ptr + rows64[:, None] * D + dims[None, :], tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32), mask=mask_rd)


@triton.jit
def _fused_grad_kernel(
    h_ptr,  # [K·N, D] hidden states of the exits, stacked, contiguous
    w_ptr,  # [V, D] shared head, contiguous
    y_ptr,  # [N] int64 targets
    tw_ptr,  # [N] fp32 token weights over their maximum (HAS_TOKEN_WEIGHTS)
    ew_ptr,  # [K] fp32 exit weights
    lse_ptr,  # [K·N] fp32 log-sum-exp from the merge kernel
    gh_ptr,  # [K·N, D] fp32 in/out, zeroed: Σt·∂loss/∂h, accumulated with atomics (NEED_H)
    gw_ptr,  # [T, V, D] fp32 out: this token split's part of Σt·∂loss/∂W (NEED_W)
    rows_total,  # K·N
    N,  # tokens per exit
    V,  # vocabulary size
    D,  # hidden size
    split_rows,  # rows per token split, a multiple of BLOCK_N
    ignore_index,  # target value of tokens without a label
    g_unit,  # G's factor before it is rounded to the dots' dtype (G_UNIT / max_k w_k in fp16, else 1)
    HAS_TOKEN_WEIGHTS: tl.constexpr,  # t_n from tw_ptr (else 1 at labelled tokens)
    NEED_H: tl.constexpr,  # form ∂loss/∂h
    NEED_W: tl.constexpr,  # form ∂loss/∂W
    BLOCK_N: tl.constexpr,  # rows per loop step
    BLOCK_V: tl.constexpr,  # vocab entries per program
    BLOCK_D: tl.constexpr,  # next power of two ≥ D: whole rows in registers
    DOT_PRECISION: tl.constexpr,  # dot precision for fp32 operands
    UPCAST_DOT: tl.constexpr,  # feed tl.dot fp32 (interpreter with bf16 inputs)
):
    """One recompute of each logits tile, then both products from it.

    The program owns vocab rows ``cols`` for one token split: the head tile stays in
    registers, the ``[BLOCK_V, D]`` head gradient accumulates there over the split's rows
    (each written once, so ``dW`` is deterministic), and each ``G · W_cols`` partial of the
    hidden-state gradient is added to ``dH`` with atomics (V / BLOCK_V adds per element).
    ``G`` is scaled by ``w_k · t_n`` and by ``g_unit`` (in fp16 ``w_k·t_n·p`` lies below fp16's
    normal range for most classes, and it is rounded to fp16 for the dots); the finish kernel
    divides by ``Σ t`` and by ``g_unit``.
    """
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    split = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    col_mask = cols < V
    d_mask = dims < D
    w = tl.load(w_ptr + cols[:, None].to(tl.int64) * D + dims[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
    acc_w = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    r_start = split * split_rows
    for r0 in range(r_start, tl.minimum(r_start + split_rows, rows_total), BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_mask = rows < rows_total
        rows64 = rows.to(tl.int64)
        n = rows % N
        y = tl.load(y_ptr + n, mask=row_mask, other=ignore_index)
        labelled = row_mask & (y != ignore_index)
        if HAS_TOKEN_WEIGHTS:
            t = tl.where(labelled, tl.load(tw_ptr + n, mask=row_mask, other=0.0).to(tl.float32), 0.0)
        else:
            t = labelled.to(tl.float32)
        g = t * tl.load(ew_ptr + rows // N, mask=row_mask, other=0.0) * g_unit  # 0 on padded rows: G = 0 there
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        h_mask = row_mask[:, None] & d_mask[None, :]
        h = tl.load(h_ptr + rows64[:, None] * D + dims[None, :], mask=h_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        logits = _dot(h, tl.trans(w), tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32), DOT_PRECISION, UPCAST_DOT)
        probs = tl.where(col_mask[None, :], tl.exp(logits - lse[:, None]), 0.0)  # ≤ 1: lse ≥ every logit
        grad = ((probs - (cols[None, :] == y[:, None]).to(tl.float32)) * g[:, None]).to(w.dtype)  # G
        if NEED_W:
            acc_w = _dot(tl.trans(grad), h, acc_w, DOT_PRECISION, UPCAST_DOT)
        if NEED_H:
            part = _dot(grad, w, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), DOT_PRECISION, UPCAST_DOT)
            tl.atomic_add(gh_ptr + rows64[:, None] * D + dims[None, :], part, mask=h_mask, sem="relaxed")
    if NEED_W:
        out = split.to(tl.int64) * V * D + cols[:, None].to(tl.int64) * D + dims[None, :]
        tl.store(gw_ptr + out, acc_w, mask=col_mask[:, None] & d_mask[None, :])


@triton.jit
def _sum_column(
    part_ptr,  # [programs, width] fp32
    programs,  # rows of part_ptr
    width,  # its row length
    column,  # which column to sum
    BLOCK_P: tl.constexpr,  # rows per step
):
    """``Σ part[:, column]``, always in the same order."""
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, programs, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + p * width + column, mask=p < programs, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _fused_finish_kernel(
    part_ptr,  # [P, 3 + K] fp32 per-program sums of the merge kernel
    gwp_ptr,  # [T, V·D] fp32 token splits' head gradients (NEED_W)
    gw_ptr,  # [V·D] out: ∂loss/∂W in the head's dtype, fp32 for an fp16 head (NEED_W)
    ghf_ptr,  # [K·N·D] fp32 Σt·∂loss/∂h (NEED_H)
    gh_ptr,  # [K·N·D] out: ∂loss/∂h in the hidden states' dtype (NEED_H)
    loss_ptr,  # [] fp32 out: the loss
    per_exit_ptr,  # [K] fp32 out: unweighted mean CE of every exit
    hs_ptr,  # [] fp32 out (DEFER_H): the factor left for the backward, max_k w_k / Σt
    h_unit,  # (DEFER_H) 1 / max_k w_k, or 1 when every weight is 0
    g_unit,  # the grad kernel's factor of G, divided out here
    programs,  # P
    K,  # exits
    splits,  # T
    w_size,  # V·D
    h_size,  # K·N·D
    NEED_W: tl.constexpr,  # finish ∂loss/∂W
    NEED_H: tl.constexpr,  # finish ∂loss/∂h
    DEFER_H: tl.constexpr,  # fp16 ∂loss/∂h: written over the factor hs, which the backward applies
    BLOCK: tl.constexpr,  # gradient elements per program
    BLOCK_P: tl.constexpr,  # per-program sums read per step
):
    """Programs ``[0, w)`` finish ``dW`` tiles, ``[w, w + h)`` ``dH`` tiles, the last one the loss.

    Each divides by ``Σ t`` (clamped to fp32's smallest normal: with no label every sum is 0,
    and so is the result), summed from the merge kernel's per-program sums. With ``DEFER_H``,
    ``dH`` is written at ``1 / hs`` of its size, where fp16 keeps all its bits (see
    :mod:`lash_kernels.ops.multi_exit_ce`), and the last program writes ``hs``.
    """
    pid = tl.program_id(0)
    width = 3 + K
    total = _sum_column(part_ptr, programs, width, 0, BLOCK_P)  # Σ t
    scale = 1.0 / tl.maximum(total, 1.1754943508222875e-38)
    unit = 1.0 / g_unit
    w_programs = tl.cdiv(w_size, BLOCK) if NEED_W else 0
    h_programs = tl.cdiv(h_size, BLOCK) if NEED_H else 0
    if pid < w_programs:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < w_size
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(splits):  # a fixed order: deterministic
            acc += tl.load(gwp_ptr + s * w_size + offs, mask=mask, other=0.0)
        tl.store(gw_ptr + offs, (acc * (scale * unit)).to(gw_ptr.dtype.element_ty), mask=mask)
    elif pid < w_programs + h_programs:
        offs = (pid - w_programs).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < h_size
        grad = tl.load(ghf_ptr + offs, mask=mask, other=0.0) * ((h_unit if DEFER_H else scale) * unit)
        tl.store(gh_ptr + offs, grad.to(gh_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(loss_ptr, _sum_column(part_ptr, programs, width, 2, BLOCK_P) * scale)
        if DEFER_H:  # 0 without a labelled token (dH is 0 then), never 1 / tiny
            tl.store(hs_ptr, tl.where(total > 0, scale / h_unit, 0.0))
        count = tl.maximum(_sum_column(part_ptr, programs, width, 1, BLOCK_P), 1.0)
        for j in range(K):
            tl.store(per_exit_ptr + j, _sum_column(part_ptr, programs, width, 3 + j, BLOCK_P) / count)


def _interpreter_tiles(rows: int) -> tuple[int, int]:
    """Interpreter tiles (rows, vocab columns): 16 × 32, so tests' small shapes span several, or 64 × 64 above
    1024 rows (K·N): its time goes by tiles (a seed-size step's loss, 8192 rows: 84 s → 12 s, 2-core CPU)."""
    return (16, 32) if rows <= 1024 else (64, 64)


def _fused_configs(D: int, dtype: torch.dtype, rows: int) -> tuple[dict, dict]:
    """Launch configs of ``_fused_forward_kernel`` and ``_fused_grad_kernel`` (the launcher and
    :func:`static_variants` read them): fixed tiles, no autotuning stall; :func:`_interpreter_tiles`
    when interpreting. ``next_power_of_2`` makes a SymInt D (dynamic shapes) a number."""
    block_d = max(16, next_power_of_2(D))
    if interpreting():
        block_n, block_v = _interpreter_tiles(rows)
        return (dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=1, num_stages=1),) * 2
    key = tile_key(D, dtype)
    return tuple(dict(BLOCK_N=n, BLOCK_V=v, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
                 for n, v, warps, stages in (FORWARD_TILES[key], GRAD_TILES[key]))  # fmt: skip


def _merge_config(D: int, rows: int) -> dict:
    """Rows per program of the merge kernel: 4096 elements of h (and of W[y]) per program."""
    block_d = max(16, next_power_of_2(D))
    block_r = _interpreter_tiles(rows)[0] if interpreting() else max(1, 4096 // block_d)
    return dict(BLOCK_R=block_r, BLOCK_D=block_d, num_warps=1 if interpreting() else 4)


FINISH_CONFIG = dict(BLOCK=1024, BLOCK_P=128, num_warps=4)  # gradient elements, sums per step


def _dot_args(dtype: torch.dtype) -> dict:
    """tf32x3 for fp32 operands (module docstring); fp32 operands for the interpreter's bf16."""
    return dict(
        DOT_PRECISION="tf32x3" if dtype == torch.float32 else "tf32",  # ignored for 16-bit operands
        UPCAST_DOT=interpreting() and dtype == torch.bfloat16,
    )


def _splits(tiles: int, other_tiles: int, programs: int) -> int:
    """How many ways to split ``tiles`` so that ``splits × other_tiles`` reaches ``programs``."""
    return max(1, min(tiles, cdiv(programs, max(other_tiles, 1))))


def _fused_launch_shape(rows: int, V: int, forward: dict, grad: dict, sms: int) -> tuple[int, int, int, int]:
    """(vocab splits S, columns per split) of the forward grid and (token splits T, rows per
    split) of the grad grid, each aiming at ``PROGRAMS_PER_SM`` programs per SM."""
    programs = PROGRAMS_PER_SM * sms
    row_tiles, vocab_tiles = cdiv(rows, forward["BLOCK_N"]), cdiv(V, forward["BLOCK_V"])
    per_split_v = cdiv(vocab_tiles, _splits(vocab_tiles, row_tiles, programs))
    row_tiles, vocab_tiles = cdiv(rows, grad["BLOCK_N"]), cdiv(V, grad["BLOCK_V"])
    per_split_n = cdiv(row_tiles, _splits(row_tiles, vocab_tiles, programs))
    return (
        cdiv(cdiv(V, forward["BLOCK_V"]), per_split_v), per_split_v * forward["BLOCK_V"],
        cdiv(row_tiles, per_split_n), per_split_n * grad["BLOCK_N"],
    )  # fmt: skip


def run_fused(hiddens, weight, targets, token_weights, exit_weights, ignore_index, with_stats, need_h, need_w):
    """The fused regime (module docstring): forward, merge, grad and finish kernels.

    Returns ``(loss, per_exit, token_loss, confidence, predictions, grad_h, grad_w, h_scale)``, the
    gradients in the inputs' dtypes (an fp16 head's in fp32; empty when not needed);
    ``h_scale``, () fp32, is the factor an fp16 ``grad_h`` still needs (empty when it needs none)."""
    K, N, D = hiddens.shape
    V, rows = weight.shape[0], K * N
    h, device = hiddens.view(rows, D), hiddens.device
    forward, grad = _fused_configs(D, hiddens.dtype, rows)
    merge = _merge_config(D, rows)
    splits_v, split_cols, splits_n, split_rows = _fused_launch_shape(rows, V, forward, grad, sm_count(device))
    f32 = dict(dtype=torch.float32, device=device)
    part_max, part_sum = torch.empty((splits_v, rows), **f32), torch.empty((splits_v, rows), **f32)
    part_arg = torch.empty((splits_v, rows) if with_stats else (0,), dtype=torch.int32, device=device)
    launch(_fused_forward_kernel)[(cdiv(rows, forward["BLOCK_N"]), splits_v)](
        h, weight, part_max, part_sum, part_arg, rows, V, D, split_cols, WITH_STATS=with_stats,
        **forward, **_dot_args(h.dtype),
    )  # fmt: skip
    lse, token_loss = torch.empty(rows, **f32), torch.empty(rows, **f32)
    conf = torch.empty(rows if with_stats else 0, **f32)
    pred = torch.empty(rows if with_stats else 0, dtype=torch.int64, device=device)
    merge_programs = cdiv(rows, merge["BLOCK_R"])
    sums = torch.empty((merge_programs, 3 + K), **f32)
    grad_h32 = torch.empty((rows, D) if need_h else (0,), **f32)
    weights = device_floats(exit_weights, h)
    tw = lse  # any pointer when unused
    if token_weights is not None:
        tw = scaled_token_weights(token_weights, targets, ignore_index)  # (N,) fp32, at most 1
    launch(_fused_merge_kernel)[(merge_programs,)](
        h, weight, targets, tw, weights, part_max, part_sum, part_arg if with_stats else part_max, lse,
        token_loss, conf, pred, sums, grad_h32, rows, N, V, D, K, splits_v, ignore_index,
        HAS_TOKEN_WEIGHTS=token_weights is not None, WITH_STATS=with_stats, NEED_H=need_h, **merge,
    )  # fmt: skip
    grad_w32 = torch.empty((splits_n, V, D) if need_w else (0,), **f32)
    w_max = max(exit_weights) or 1.0
    g_unit = G_UNIT / w_max if hiddens.dtype == torch.float16 else 1.0
    if need_h or need_w:
        launch(_fused_grad_kernel)[(cdiv(V, grad["BLOCK_V"]), splits_n)](
            h, weight, targets, tw, weights, lse, grad_h32, grad_w32, rows, N, V, D, split_rows, ignore_index, g_unit,
            HAS_TOKEN_WEIGHTS=token_weights is not None, NEED_H=need_h, NEED_W=need_w, **grad, **_dot_args(h.dtype),
        )  # fmt: skip
    loss, per_exit = torch.empty((), **f32), torch.empty(K, **f32)
    grad_h = torch.empty((K, N, D) if need_h else (0,), dtype=hiddens.dtype, device=device)
    defer_h = need_h and hiddens.dtype == torch.float16
    h_scale = torch.empty(() if defer_h else (0,), **f32)
    w_dtype = torch.float32 if weight.dtype == torch.float16 else weight.dtype  # see kernels._multi_exit_ce
    grad_w = torch.empty((V, D) if need_w else (0,), dtype=w_dtype, device=device)
    block = FINISH_CONFIG["BLOCK"]
    finish_programs = (cdiv(V * D, block) if need_w else 0) + (cdiv(rows * D, block) if need_h else 0) + 1
    launch(_fused_finish_kernel)[(finish_programs,)](
        sums, grad_w32, grad_w, grad_h32, grad_h, loss, per_exit, h_scale, 1.0 / w_max, g_unit, merge_programs, K,
        splits_n, V * D, rows * D, NEED_W=need_w, NEED_H=need_h, DEFER_H=defer_h, **FINISH_CONFIG,
    )  # fmt: skip
    stats_shape = (K, N) if with_stats else (0,)
    return (loss, per_exit, token_loss.view(K, N), conf.view(stats_shape), pred.view(stats_shape), grad_h, grad_w,
            h_scale)  # fmt: skip


def fused_variants(shape, dtype: torch.dtype, arch: int) -> list:
    """The fused launches at ``shape`` on ``arch`` for :mod:`lash_kernels.tools.aot_check`, in training:
    the four kernels and the token weights' launch."""
    D, V, K, N = shape.hidden, shape.vocab, shape.exits, shape.tokens
    rows = K * N
    act, f32, i64 = pointer(dtype), pointer(torch.float32), pointer(torch.int64)
    dots = dict(DOT_PRECISION=_dot_args(dtype)["DOT_PRECISION"], UPCAST_DOT=False)
    forward, grad = _fused_configs(D, dtype, rows)
    merge = _merge_config(D, rows)
    splits_v, split_cols, splits_n, split_rows = _fused_launch_shape(rows, V, forward, grad, ARCHS[arch].sms)
    merge_programs = cdiv(rows, merge["BLOCK_R"])
    finish_programs = cdiv(V * D, FINISH_CONFIG["BLOCK"]) + cdiv(rows * D, FINISH_CONFIG["BLOCK"]) + 1
    ints = dict(rows_total=rows, N=N, V=V, D=D)
    labels = dict(y_ptr=i64, tw_ptr=f32, ew_ptr=f32)
    return [
        config_variant(
            "multi_exit_ce.fused_forward", _fused_forward_kernel,
            dict(h_ptr=act, w_ptr=act, max_ptr=f32, sum_ptr=f32, arg_ptr=pointer(torch.int32), rows_total="i32",
                 V="i32", D="i32", split_cols="i32"),
            forward, dots | dict(WITH_STATS=True), cdiv(rows, forward["BLOCK_N"]) * splits_v,
            dict(rows_total=rows, V=V, D=D, split_cols=split_cols),
        ),
        config_variant(
            "multi_exit_ce.fused_merge", _fused_merge_kernel,
            dict(h_ptr=act, w_ptr=act, **labels, max_ptr=f32, sum_ptr=f32, arg_ptr=pointer(torch.int32),
                 lse_ptr=f32, loss_ptr=f32, conf_ptr=f32, pred_ptr=i64, part_ptr=f32, gh_ptr=f32, rows_total="i32",
                 N="i32", V="i32", D="i32", K="i32", splits="i32", ignore_index="i32"),
            merge | dict(num_stages=1), dict(HAS_TOKEN_WEIGHTS=False, WITH_STATS=True, NEED_H=True), merge_programs,
            ints | dict(K=K, splits=splits_v),
        ),
        config_variant(
            "multi_exit_ce.fused_grad", _fused_grad_kernel,
            dict(h_ptr=act, w_ptr=act, **labels, lse_ptr=f32, gh_ptr=f32, gw_ptr=f32, rows_total="i32", N="i32",
                 V="i32", D="i32", split_rows="i32", ignore_index="i32", g_unit="fp32"),
            grad, dots | dict(HAS_TOKEN_WEIGHTS=False, NEED_H=True, NEED_W=True),
            cdiv(V, grad["BLOCK_V"]) * splits_n, ints | dict(split_rows=split_rows),
        ),
        config_variant(
            "multi_exit_ce.fused_finish", _fused_finish_kernel,
            dict(part_ptr=f32, gwp_ptr=f32, gw_ptr=f32 if dtype == torch.float16 else act, ghf_ptr=f32, gh_ptr=act, loss_ptr=f32, per_exit_ptr=f32,
                 hs_ptr=f32, h_unit="fp32", g_unit="fp32", programs="i32", K="i32", splits="i32", w_size="i32", h_size="i32"),
            FINISH_CONFIG | dict(num_stages=1), dict(NEED_W=True, NEED_H=True, DEFER_H=dtype == torch.float16),
            finish_programs,
            dict(programs=merge_programs, K=K, splits=splits_n, w_size=V * D, h_size=rows * D),
        ),
        *token_weight_variants(shape),
    ]  # fmt: skip
