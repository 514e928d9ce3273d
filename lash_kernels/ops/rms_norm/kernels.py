"""RMSNorm's Triton kernels, their launchers and the ``lash::rms_norm`` family of ``torch.library`` ops.

Layers: ``_*_kernel`` (Triton) → ``_forward`` / ``_backward`` launchers → ``lash::rms_norm``,
``lash::add_rms_norm`` and ``lash::rms_norm_backward`` registered with :mod:`torch.library`
(``triton_op``, so ``torch.compile`` sees the kernels) with ``register_autograd``. The maths and
the envelope are in :mod:`lash_kernels.ops.rms_norm`, whose public functions call
:func:`rms_norm_op` and :func:`add_rms_norm_op`. Imported only where Triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lash_kernels._launch import launch, sm_count
from lash_kernels.aot_types import ARCHS, LAUNCH_STAGES, KernelVariant, pointer

BACKWARD_MAX_ROW = 8192  # widest row the backward keeps whole in registers; wider rows go in slices

@triton.jit
def _rms_norm_forward_kernel(
    X,  # pointer to the input, rows of length N with row stride stride_x
    R,  # pointer to the residual (read only when HAS_RESIDUAL)
    W,  # pointer to the weight [N]
    Y,  # pointer to the normalised output [M, N], contiguous
    S,  # pointer to the output sum x + residual [M, N] (written only when HAS_RESIDUAL)
    RSTD,  # pointer to the fp32 1/rms per row [M], kept for the backward
    stride_x,  # elements between rows of X
    stride_r,  # elements between rows of R
    M,  # number of rows
    N,  # hidden size
    eps,  # added to mean(s²) before the square root
    HAS_RESIDUAL: tl.constexpr,  # add_rms_norm (True) or rms_norm (False)
    BLOCK_M: tl.constexpr,  # rows per program: several when N is small, so a warp holds 16 per thread
    BLOCK_N: tl.constexpr,  # next power of two ≥ N: a whole row per block
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols[None, :] < N)
    # int64 row offsets: M · N passes 2³¹ at LLM sizes (64K rows × 32K hidden).
    rows64 = rows.to(tl.int64)[:, None]
    # Masked lanes load 0, which leaves the sum of squares untouched.
    s = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(S + rows64 * N + cols[None, :], s.to(S.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / N + eps)  # (BLOCK_M,)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)  # (BLOCK_N,)
    y = s * rstd[:, None] * w[None, :]
    tl.store(Y + rows64 * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_backward_kernel(
    DY,  # pointer to the gradient of y, row stride stride_dy
    DS_OUT,  # pointer to the gradient of the output sum s (read only when HAS_DS_OUT)
    S,  # pointer to the normalised rows s (x for rms_norm, the saved sum for add_rms_norm)
    W,  # pointer to the weight [N]
    RSTD,  # pointer to the fp32 1/rms per row [M] from the forward
    DS,  # pointer to the gradient of s [M, N], contiguous: dx (and dresidual)
    DW_PARTIAL,  # pointer to fp32 [num_programs, N]: this program's share of dw (zeroed when COL_BLOCKS > 1)
    stride_dy,  # elements between rows of DY
    stride_ds_out,  # elements between rows of DS_OUT
    stride_s,  # elements between rows of S
    M,  # number of rows
    N,  # hidden size
    rows_per_program,  # contiguous rows each program walks through, a multiple of BLOCK_M
    HAS_DS_OUT: tl.constexpr,  # add the incoming gradient of s (add_rms_norm)
    BLOCK_M: tl.constexpr,  # rows per loop step
    BLOCK_N: tl.constexpr,  # columns per step: the whole row (COL_BLOCKS = 1) or a slice of it
    COL_BLOCKS: tl.constexpr,  # slices per row: > 1 for rows too wide to keep in registers
    STAGES: tl.constexpr,  # row blocks in flight: the loop's loads run STAGES - 1 steps ahead
):
    """A persistent band of rows per program.

    The grid is a few programs per SM, each walking ``rows_per_program`` contiguous rows.
    Narrow rows (``COL_BLOCKS = 1``) go through a software-pipelined loop: Triton issues the
    loads of the next ``STAGES - 1`` row blocks into shared memory (``cp.async`` on sm ≥ 80)
    while this block is reduced, so each SM keeps tens of KB of reads in flight with few
    registers. dw is summed privately in fp32 registers across the band (no atomics); the
    ``[num_programs, N]`` partials are summed by :func:`_sum_rows_kernel`.

    Wide rows (16K features) would need dy, s, w and dw live at once and spill; they go in
    ``COL_BLOCKS`` slices instead: a first pass sums ``g · ŝ`` over the slices, a second
    reloads each slice (just read, so served from L2), writes ds and adds to this program's
    dw partial row in memory (64 KiB, L2-resident).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if COL_BLOCKS == 1:
        mask_n = cols < N
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in tl.range(row_start, row_end, BLOCK_M, num_stages=STAGES):
            rows = start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            mask = row_mask[:, None] & mask_n[None, :]
            rows64 = rows.to(tl.int64)[:, None]
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s_hat = tl.load(S + rows64 * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32) * rstd[:, None]
            g = dy * tl.load(W + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            mean_g_s = tl.sum(g * s_hat, axis=1) / N
            _write_ds(DS, DS_OUT, rows64, cols, mask, g, s_hat, mean_g_s, rstd, stride_ds_out, N, HAS_DS_OUT)
            dw += tl.sum(dy * s_hat, axis=0)
        tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask_n)
    else:
        for start in range(row_start, row_end, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows64 = rows.to(tl.int64)[:, None]
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            sum_g_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for c0 in range(0, N, BLOCK_N):
                c = c0 + cols
                mask = row_mask[:, None] & (c[None, :] < N)
                dy = tl.load(DY + rows64 * stride_dy + c[None, :], mask=mask, other=0.0).to(tl.float32)
                s = tl.load(S + rows64 * stride_s + c[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)
                sum_g_s += tl.sum(dy * w[None, :] * s, axis=1)
            mean_g_s = sum_g_s * rstd / N
            for c0 in range(0, N, BLOCK_N):
                c = c0 + cols
                mask = row_mask[:, None] & (c[None, :] < N)
                dy = tl.load(DY + rows64 * stride_dy + c[None, :], mask=mask, other=0.0).to(tl.float32)
                s_hat = tl.load(S + rows64 * stride_s + c[None, :], mask=mask, other=0.0).to(tl.float32) * rstd[:, None]
                g = dy * tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)[None, :]
                _write_ds(DS, DS_OUT, rows64, c, mask, g, s_hat, mean_g_s, rstd, stride_ds_out, N, HAS_DS_OUT)
                # Same layout for the load and the store: each thread re-reads what it wrote.
                dw_ptr = DW_PARTIAL + pid * N + c
                tl.store(dw_ptr, tl.load(dw_ptr, mask=c < N) + tl.sum(dy * s_hat, axis=0), mask=c < N)


@triton.jit
def _write_ds(
    DS,  # pointer to the gradient of s [M, N], contiguous
    DS_OUT,  # pointer to the incoming gradient of s (HAS_DS_OUT)
    rows64,  # (BLOCK_M, 1) int64 row indices
    cols,  # (BLOCK_N,) column indices
    mask,  # (BLOCK_M, BLOCK_N) valid elements
    g,  # (BLOCK_M, BLOCK_N) fp32 dy · w
    s_hat,  # (BLOCK_M, BLOCK_N) fp32 s · rstd
    mean_g_s,  # (BLOCK_M,) fp32 mean over the whole row of g · ŝ
    rstd,  # (BLOCK_M,) fp32 1/rms
    stride_ds_out,  # elements between rows of DS_OUT
    N,  # hidden size
    HAS_DS_OUT: tl.constexpr,  # add the incoming gradient of s (add_rms_norm)
):
    """``ds = r · (g − ŝ · mean(g · ŝ))`` (+ the incoming ds for add_rms_norm), stored in DS's dtype."""
    ds = (g - s_hat * mean_g_s[:, None]) * rstd[:, None]
    if HAS_DS_OUT:
        ds += tl.load(DS_OUT + rows64 * stride_ds_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DS + rows64 * N + cols[None, :], ds.to(DS.dtype.element_ty), mask=mask)


@triton.jit
def _sum_rows_kernel(
    PARTIAL,  # pointer to fp32 [P, N] partial sums, contiguous
    OUT,  # pointer to the [N] result, in its own dtype
    P,  # rows to sum
    N,  # columns
    BLOCK_P: tl.constexpr,  # rows per step
    BLOCK_N: tl.constexpr,  # columns per program
):
    """``OUT = PARTIAL.sum(0)`` in fp32, cast on store: the backward's dw in one small launch.

    Narrow column strips give many programs (64 for 1024 columns), and each step reads a
    ``[BLOCK_P, BLOCK_N]`` tile, so the few hundred partial rows (just written, in L2) take a
    handful of dependent steps, not one per row.
    """
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & (cols < N)[None, :]
        acc += tl.load(PARTIAL + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=cols < N)


SUM_TILE = (64, 16)  # (BLOCK_P, BLOCK_N) of _sum_rows_kernel

def _forward_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward for hidden size ``n``.

    16 elements per thread per tensor (two or four 128-bit loads): one warp per row up to 512
    features, so the row's sum of squares is a warp shuffle, several rows per warp below
    that, and a few warps for LLM widths (4 at 2048). Small programs let an SM keep many of
    them, and their loads, in flight; 32 elements per thread spill on some Triton releases.
    """
    block_n = triton.next_power_of_2(n)
    per_warp = 32 * 16  # elements one warp holds
    num_warps = max(1, min(32, block_n // per_warp))
    return max(1, per_warp // block_n), block_n, num_warps

# The backward's (num_warps, stages, programs per SM) by padded row bytes: a row block of
# ≥ 1024 elements per step, 8-16 per thread, and as many stages and programs as the registers
# and the L4's 100 KB of shared memory per SM leave room for (python -m lash_kernels.aot_check).
_BACKWARD_TILES = {2048: (4, 3, 6), 4096: (4, 3, 4), 8192: (8, 3, 2), 16384: (16, 2, 1), 32768: (16, 2, 1)}

def _backward_config(n: int, itemsize: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, COL_BLOCKS, num_warps, STAGES) of the backward for hidden size ``n``:
    rows wider than ``BACKWARD_MAX_ROW`` go in slices of half that (kernel docstring)."""
    block_n = triton.next_power_of_2(n)
    if block_n > BACKWARD_MAX_ROW:
        block_n = BACKWARD_MAX_ROW // 2
        return 1, block_n, triton.cdiv(n, block_n), max(1, min(16, block_n // 256)), 1
    block_m = max(1, 1024 // block_n)
    num_warps, stages, _ = _BACKWARD_TILES[max(2048, block_n * itemsize)]
    return block_m, block_n, 1, num_warps, stages


def _backward_programs(m: int, n: int, itemsize: int, block_m: int, sms: int) -> tuple[int, int]:
    """(programs, rows per program): a persistent grid of a few programs per SM (the tile
    table's), never more than there are row blocks."""
    block_n = triton.next_power_of_2(n)
    per_sm = _BACKWARD_TILES[max(2048, block_n * itemsize)][2] if block_n <= BACKWARD_MAX_ROW else 1
    programs = min(triton.cdiv(m, block_m), sms * per_sm)
    rows_per_program = triton.cdiv(triton.cdiv(m, programs), block_m) * block_m
    return triton.cdiv(m, rows_per_program), rows_per_program


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as ``[M, N]`` rows; copy only when a row is not contiguous in memory."""
    t2 = t.reshape(-1, t.shape[-1])  # (M, N)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _forward(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward kernel; returns ``(y, s or None, rstd)`` with y and s shaped like ``x``."""
    n = x.shape[-1]
    weight = weight.contiguous()  # (N,)
    x2 = _rows(x)  # (M, N)
    r2 = _rows(residual) if residual is not None else x2  # (M, N)
    m = x2.shape[0]
    out_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else None
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)  # (M,)
    if m == 0:
        return y, s, rstd
    block_m, block_n, num_warps = _forward_config(n)
    launch(_rms_norm_forward_kernel)[(triton.cdiv(m, block_m),)](
        x2, r2, weight, y, s if s is not None else y, rstd, x2.stride(0), r2.stride(0), m, n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return y, s, rstd


def _backward(
    dy: torch.Tensor,
    ds_out: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel and the dw sum; returns ``(ds, dweight)`` with ds shaped like ``s``."""
    n = s.shape[-1]
    weight = weight.contiguous()  # (N,)
    dy2, s2 = _rows(dy), _rows(s)  # (M, N)
    ds_out2 = _rows(ds_out) if ds_out is not None else dy2  # (M, N)
    m = s2.shape[0]
    ds = torch.empty(s.shape, dtype=torch.promote_types(dy.dtype, s.dtype), device=s.device)
    if m == 0:
        return ds, torch.zeros_like(weight)
    block_m, block_n, col_blocks, num_warps, stages = _backward_config(n, s.element_size())
    programs, rows_per_program = _backward_programs(m, n, s.element_size(), block_m, sm_count(s.device))
    alloc = torch.zeros if col_blocks > 1 else torch.empty  # sliced rows add into their partial row
    dw_partial = alloc(programs, n, dtype=torch.float32, device=s.device)  # (P, N)
    launch(_rms_norm_backward_kernel)[(programs,)](
        dy2, ds_out2, s2, weight, rstd, ds, dw_partial, dy2.stride(0), ds_out2.stride(0), s2.stride(0), m, n,
        rows_per_program, HAS_DS_OUT=ds_out is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        COL_BLOCKS=col_blocks, STAGES=stages, num_warps=num_warps, num_stages=stages,
    )  # fmt: skip
    dweight = torch.empty_like(weight)
    block_p, sum_n = SUM_TILE
    launch(_sum_rows_kernel)[(triton.cdiv(n, sum_n),)](dw_partial, dweight, programs, n, BLOCK_P=block_p, BLOCK_N=sum_n)
    return ds, dweight


def static_variants(shape, dtype: torch.dtype, arch: int) -> list:
    """The launches :mod:`lash_kernels.aot_check` compiles: forward and backward, with and
    without the residual, at ``shape.tokens`` rows of ``shape.hidden``, fp32 weight."""
    m, n, itemsize = shape.tokens, shape.hidden, torch.empty((), dtype=dtype).element_size()
    act, f32 = pointer(dtype), pointer(torch.float32)
    ints = dict(M=m, N=n)
    block_m, block_n, num_warps = _forward_config(n)
    forward = dict(X=act, R=act, W=f32, Y=act, S=act, RSTD=f32, stride_x="i32", stride_r="i32", M="i32",
                   N="i32", eps="fp32", HAS_RESIDUAL="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr")  # fmt: skip
    back_m, back_n, col_blocks, back_warps, stages = _backward_config(n, itemsize)
    programs, rows_per_program = _backward_programs(m, n, itemsize, back_m, ARCHS[arch].sms)
    backward = dict(DY=act, DS_OUT=act, S=act, W=f32, RSTD=f32, DS=act, DW_PARTIAL=f32, stride_dy="i32",
                    stride_ds_out="i32", stride_s="i32", M="i32", N="i32", rows_per_program="i32",
                    HAS_DS_OUT="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr",
                    COL_BLOCKS="constexpr", STAGES="constexpr")  # fmt: skip
    variants = []
    for residual in (False, True):
        name = "add_rms_norm" if residual else "rms_norm"
        inputs = 2 if residual else 1  # x (and the residual) in, y (and s) out
        variants.append(KernelVariant(
            f"{name}.forward", _rms_norm_forward_kernel, forward,
            dict(HAS_RESIDUAL=residual, BLOCK_M=block_m, BLOCK_N=block_n), num_warps, LAUNCH_STAGES,
            triton.cdiv(m, block_m), dict(ints, stride_x=n, stride_r=n),
            bytes_in_flight=block_m * n * itemsize * inputs, bytes_moved=2 * inputs * m * n * itemsize,
        ))  # fmt: skip
        # dy and s (and the incoming ds) in; the pipelined loop keeps STAGES - 1 row blocks loading ahead.
        loaded = (3 if residual else 2) * back_m * back_n * itemsize
        variants.append(KernelVariant(
            f"{name}.backward", _rms_norm_backward_kernel, backward,
            dict(HAS_DS_OUT=residual, BLOCK_M=back_m, BLOCK_N=back_n, COL_BLOCKS=col_blocks, STAGES=stages),
            back_warps, stages, programs,
            dict(ints, stride_dy=n, stride_ds_out=n, stride_s=n, rows_per_program=rows_per_program),
            bytes_in_flight=loaded * max(1, stages - 1), bytes_moved=(4 if residual else 3) * m * n * itemsize,
        ))  # fmt: skip
    block_p, sum_n = SUM_TILE
    variants.append(KernelVariant(
        "rms_norm.dw_sum", _sum_rows_kernel,
        dict(PARTIAL=f32, OUT=f32, P="i32", N="i32", BLOCK_P="constexpr", BLOCK_N="constexpr"),
        dict(BLOCK_P=block_p, BLOCK_N=sum_n), 4, LAUNCH_STAGES, triton.cdiv(n, sum_n), dict(N=n, P=programs),
    ))  # fmt: skip
    return variants


@triton_op("lash::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _forward(x, None, weight, eps)
    return y, rstd


@triton_op("lash::add_rms_norm", mutates_args=())
def add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, rstd = _forward(x, residual, weight, eps)
    return y, s, rstd


@triton_op("lash::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor, ds_out: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, ds_out, s, weight, rstd)


def _setup_rms_norm(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = _rms_norm_backward_op(dy, None, x, weight, rstd)
    return dx.to(x.dtype), dweight, None


def _setup_add_rms_norm(ctx, inputs, output) -> None:
    x, residual, weight, _ = inputs
    _, s, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(s, weight, rstd)
    ctx.dtypes = (x.dtype, residual.dtype)


def _add_rms_norm_grad(ctx, dy, ds_out, _drstd):
    s, weight, rstd = ctx.saved_tensors
    ds, dweight = _rms_norm_backward_op(dy, ds_out, s, weight, rstd)
    x_dtype, residual_dtype = ctx.dtypes
    # The add passes its gradient through unchanged: dx and dresidual are the same tensor,
    # exactly as torch's own add backward hands one gradient to both inputs.
    return ds.to(x_dtype), ds.to(residual_dtype), dweight, None


rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_setup_rms_norm)
add_rms_norm_op.register_autograd(_add_rms_norm_grad, setup_context=_setup_add_rms_norm)
