"""RMSNorm's Triton kernels, their launchers and the ``lash::rms_norm`` family of ``torch.library`` ops.

Layers: ``_*_kernel`` (Triton) → ``_forward`` / ``_backward`` launchers → ``lash::rms_norm``,
``lash::add_rms_norm`` and ``lash::rms_norm_backward`` registered with :mod:`torch.library`
(``triton_op``, so ``torch.compile`` sees the kernels) with ``register_autograd``, and their twin
``autograd.Function`` s for eager calls (same body and backward, cheaper on the host; see
:func:`lash_kernels._launch.call_op`). The maths and the envelope are in
:mod:`lash_kernels.ops.rms_norm`, whose public functions call them. Imported only where Triton
is installed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lash_kernels._launch import (
    cached_plan,
    call_op,
    cdiv,
    device_arch,
    launch,
    next_power_of_2,
    resident_programs,
    twin_function,
)
from lash_kernels.aot_types import ARCHS, LAUNCH_STAGES, Arch, KernelVariant, pointer

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
    BLOCK_M: tl.constexpr,  # rows per loop step: several when N is small, so a warp holds 16 per thread
    BLOCK_N: tl.constexpr,  # next power of two ≥ N: a whole row per block
    STAGES: tl.constexpr,  # row blocks in flight: the loop's loads run STAGES - 1 steps ahead
):
    """A persistent grid striding over row blocks.

    The grid is as many programs as stay resident on the SMs (:func:`_forward_plan`); each
    takes every ``num_programs``-th block of ``BLOCK_M`` rows. The loop is software-pipelined:
    Triton issues the loads of the next ``STAGES - 1`` blocks into shared memory (``cp.async``
    on sm ≥ 80) while this one is reduced and stored, so an SM keeps tens of KB of reads in
    flight whatever its register budget. Rows are held by one warp (≤ 512 features) or a few,
    so the sum of squares is a warp shuffle or a short cross-warp step; the weight is loaded once.
    """
    cols = tl.arange(0, BLOCK_N)
    mask_n = cols < N
    w = tl.load(W + cols, mask=mask_n, other=0.0).to(tl.float32)  # (BLOCK_N,)
    step = tl.num_programs(0) * BLOCK_M
    for start in tl.range(tl.program_id(0) * BLOCK_M, M, step, num_stages=STAGES):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & mask_n[None, :]
        # int64 row offsets: M · N passes 2³¹ at LLM sizes (64K rows × 32K hidden).
        rows64 = rows.to(tl.int64)[:, None]
        # Masked lanes load 0, which leaves the sum of squares untouched.
        s = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            s += tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(S + rows64 * N + cols[None, :], s.to(S.dtype.element_ty), mask=mask)
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / N + eps)  # (BLOCK_M,)
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
        # Loaded once, outside the loop: inside it, the pipeline would buffer STAGES - 1 copies.
        w = tl.load(W + cols, mask=mask_n, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in tl.range(row_start, row_end, BLOCK_M, num_stages=STAGES):
            rows = start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            mask = row_mask[:, None] & mask_n[None, :]
            rows64 = rows.to(tl.int64)[:, None]
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s_hat = tl.load(S + rows64 * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32) * rstd[:, None]
            g = dy * w[None, :]
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
                # The load and the store may be laid out over the threads differently (they are
                # at N 16384), so a thread can re-read what another wrote for the previous rows:
                # the barrier orders that write before this read.
                dw_ptr = DW_PARTIAL + pid * N + c
                tl.debug_barrier()
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

class _ForwardPlan(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    stages: int
    programs: int


SCRATCH_SMEM = 256  # shared memory Triton adds to a pipelined kernel's buffers (reductions, alignment)
FORWARD_REGS = 64  # registers per thread the forward is planned for (python -m lash_kernels.aot_check reads them)


@cached_plan
def _forward_plan(m: int, n: int, itemsize: int, inputs: int, arch: Arch) -> _ForwardPlan:
    """Tile, pipeline depth and persistent grid of the forward for ``m`` rows of hidden size ``n``.

    16 elements per thread per tensor (two 128-bit loads in 16-bit types): one warp per row up
    to 512 features, several rows per warp below that, 2 warps at 1024 and 4 at 2048, so row
    sums stay in shuffles or one short cross-warp step. Triton's pipeline buffers ``stages - 1``
    blocks of every input in shared memory: 4 stages where 4 programs per SM still fit, else 3
    or 2; rows too wide for that (16K features) are not buffered. The grid
    is what stays resident on every SM (threads, registers, shared memory), never more than
    there are blocks: one wave, with no tail.
    """
    block_n = next_power_of_2(n)
    per_warp = 32 * 16  # elements one warp holds
    num_warps = max(1, min(32, block_n // per_warp))
    block_m = max(1, per_warp // block_n)
    block_bytes = block_m * block_n * itemsize * inputs
    stages = next((k for k in (4, 3, 2) if 4 * (k - 1) * block_bytes <= arch.smem_per_sm), 2)
    if block_bytes > arch.smem_per_block // 2:  # rows wider than 8K: no room to buffer; registers only
        stages = 1
    per_sm = resident_programs(arch, num_warps, max(stages - 1, 0) * block_bytes + SCRATCH_SMEM, FORWARD_REGS)
    return _ForwardPlan(block_m, block_n, num_warps, stages, min(cdiv(m, block_m), arch.sms * per_sm))


class _BackwardPlan(NamedTuple):
    block_m: int
    block_n: int
    col_blocks: int
    num_warps: int
    stages: int
    programs: int
    rows_per_program: int


def _backward_regs(per_thread: int) -> int:
    """Registers per thread the backward is planned for, holding ``per_thread`` elements of each
    row tensor: about 7 per element (dy, ŝ, g, the dw sum and temporaries) plus addressing, as
    ``python -m lash_kernels.aot_check --table`` reads them from the compiled kernels."""
    return 7 * per_thread + 8


@cached_plan
def _backward_plan(m: int, n: int, itemsize: int, inputs: int, arch: Arch) -> _BackwardPlan:
    """Tile, pipeline depth and persistent grid of the backward for ``m`` rows of hidden size ``n``,
    reading ``inputs`` row tensors (dy and s, and the incoming ds for add_rms_norm).

    Row blocks of ≥ 1024 elements, 8 per thread up to 1024 features and 16 above (fewer threads
    per element leave more registers per SM for other programs). The depth is what keeps the
    most bytes loading per SM with at least 2 programs resident there; the grid is the resident
    programs of every SM, each walking a contiguous band of rows. Rows wider than
    ``BACKWARD_MAX_ROW`` go in slices of half that, unpipelined (kernel docstring).
    """
    block_n = next_power_of_2(n)
    if block_n > BACKWARD_MAX_ROW:
        block_n = BACKWARD_MAX_ROW // 2
        block_m, col_blocks, num_warps, stages, per_sm = 1, cdiv(n, block_n), max(1, min(16, block_n // 256)), 1, 1
    else:
        block_m, col_blocks = max(1, 1024 // block_n), 1
        per_thread = 8 if block_n <= 1024 else 16
        num_warps = max(1, min(16, block_m * block_n // (32 * per_thread)))
        stage_bytes = block_m * block_n * itemsize * inputs
        regs = _backward_regs(block_m * block_n // (32 * num_warps))

        def resident(stages: int) -> int:
            return resident_programs(arch, num_warps, (stages - 1) * stage_bytes + SCRATCH_SMEM, regs)

        fitting = [k for k in (4, 3, 2) if (k - 1) * stage_bytes + SCRATCH_SMEM <= arch.smem_per_block]
        stages = max(fitting, key=lambda k: (resident(k) >= 2, resident(k) * (k - 1)), default=1)
        per_sm = resident(stages)
    programs = min(cdiv(m, block_m), arch.sms * per_sm)
    rows_per_program = cdiv(cdiv(m, programs), block_m) * block_m
    return _BackwardPlan(block_m, block_n, col_blocks, num_warps, stages, cdiv(m, rows_per_program), rows_per_program)


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
    # empty_like: a third of torch.empty's host time given x.shape (a torch.Size) and the device.
    y = torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)
    s = torch.empty_like(y) if residual is not None else None
    rstd = x.new_empty(m, dtype=torch.float32)  # (M,)
    if m == 0:
        return y, s, rstd
    inputs = 2 if residual is not None else 1
    plan = _forward_plan(m, n, x2.element_size(), inputs, device_arch(x.device))
    launch(_rms_norm_forward_kernel)[(plan.programs,)](
        x2, r2, weight, y, s if s is not None else y, rstd, x2.stride(0), r2.stride(0), m, n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, STAGES=plan.stages,
        num_warps=plan.num_warps, num_stages=plan.stages,
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
    ds = torch.empty_like(s, dtype=torch.promote_types(dy.dtype, s.dtype), memory_format=torch.contiguous_format)
    if m == 0:
        return ds, torch.zeros_like(weight)
    plan = _backward_plan(m, n, s2.element_size(), 3 if ds_out is not None else 2, device_arch(s.device))
    alloc = torch.zeros if plan.col_blocks > 1 else torch.empty  # sliced rows add into their partial row
    dw_partial = alloc(plan.programs, n, dtype=torch.float32, device=s.device)  # (P, N)
    launch(_rms_norm_backward_kernel)[(plan.programs,)](
        dy2, ds_out2, s2, weight, rstd, ds, dw_partial, dy2.stride(0), ds_out2.stride(0), s2.stride(0), m, n,
        plan.rows_per_program, HAS_DS_OUT=ds_out is not None, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        COL_BLOCKS=plan.col_blocks, STAGES=plan.stages, num_warps=plan.num_warps, num_stages=plan.stages,
    )  # fmt: skip
    dweight = torch.empty_like(weight)
    block_p, sum_n = SUM_TILE
    launch(_sum_rows_kernel)[(cdiv(n, sum_n),)](dw_partial, dweight, plan.programs, n, BLOCK_P=block_p, BLOCK_N=sum_n)
    return ds, dweight


def static_variants(shape, dtype: torch.dtype, arch: int) -> list:
    """The launches :mod:`lash_kernels.tools.aot_check` compiles: forward and backward, with and
    without the residual, at ``shape.tokens`` rows of ``shape.hidden``, fp32 weight."""
    m, n, itemsize = shape.tokens, shape.hidden, torch.empty((), dtype=dtype).element_size()
    act, f32 = pointer(dtype), pointer(torch.float32)
    ints = dict(M=m, N=n)
    forward = dict(X=act, R=act, W=f32, Y=act, S=act, RSTD=f32, stride_x="i32", stride_r="i32", M="i32", N="i32",
                   eps="fp32", HAS_RESIDUAL="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr", STAGES="constexpr")  # fmt: skip
    backward = dict(DY=act, DS_OUT=act, S=act, W=f32, RSTD=f32, DS=act, DW_PARTIAL=f32, stride_dy="i32",
                    stride_ds_out="i32", stride_s="i32", M="i32", N="i32", rows_per_program="i32",
                    HAS_DS_OUT="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr",
                    COL_BLOCKS="constexpr", STAGES="constexpr")  # fmt: skip
    variants = []
    for residual in (False, True):
        name = "add_rms_norm" if residual else "rms_norm"
        inputs = 2 if residual else 1  # x (and the residual) in, y (and s) out
        plan = _forward_plan(m, n, itemsize, inputs, ARCHS[arch])
        variants.append(KernelVariant(
            f"{name}.forward", _rms_norm_forward_kernel, forward,
            dict(HAS_RESIDUAL=residual, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, STAGES=plan.stages),
            plan.num_warps, plan.stages, plan.programs, dict(ints, stride_x=n, stride_r=n),
            bytes_in_flight=max(plan.stages - 1, 1) * plan.block_m * n * itemsize * inputs,
            bytes_moved=2 * inputs * m * n * itemsize,
        ))  # fmt: skip
        # dy and s (and the incoming ds) in; the pipelined loop keeps STAGES - 1 row blocks loading ahead.
        back = _backward_plan(m, n, itemsize, inputs + 1, ARCHS[arch])
        variants.append(KernelVariant(
            f"{name}.backward", _rms_norm_backward_kernel, backward,
            dict(HAS_DS_OUT=residual, BLOCK_M=back.block_m, BLOCK_N=back.block_n, COL_BLOCKS=back.col_blocks,
                 STAGES=back.stages),
            back.num_warps, back.stages, back.programs,
            dict(ints, stride_dy=n, stride_ds_out=n, stride_s=n, rows_per_program=back.rows_per_program),
            bytes_in_flight=(inputs + 1) * back.block_m * back.block_n * itemsize * max(1, back.stages - 1),
            bytes_moved=(4 if residual else 3) * m * n * itemsize,
        ))  # fmt: skip
    block_p, sum_n = SUM_TILE
    variants.append(KernelVariant(
        "rms_norm.dw_sum", _sum_rows_kernel,
        dict(PARTIAL=f32, OUT=f32, P="i32", N="i32", BLOCK_P="constexpr", BLOCK_N="constexpr"),
        dict(BLOCK_P=block_p, BLOCK_N=sum_n), 4, LAUNCH_STAGES, cdiv(n, sum_n), dict(N=n, P=back.programs),
    ))  # fmt: skip
    return variants


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _forward(x, None, weight, eps)
    return y, rstd


def _add_rms_norm(
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
    # An unused output's gradient arrives as None, not as a zero tensor autograd fills in a kernel.
    ctx.set_materialize_grads(False)


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dy = torch.zeros_like(x) if dy is None else dy
    dx, dweight = call_op(_rms_norm_backward_op, _backward, dy, None, x, weight, rstd)
    return dx.to(x.dtype), dweight, None


def _setup_add_rms_norm(ctx, inputs, output) -> None:
    x, residual, weight, _ = inputs
    _, s, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(s, weight, rstd)
    ctx.dtypes = (x.dtype, residual.dtype)
    # Post-norm blocks never use s: its gradient arrives as None rather than as zeros.
    ctx.set_materialize_grads(False)


def _add_rms_norm_grad(ctx, dy, ds_out, _drstd):
    s, weight, rstd = ctx.saved_tensors
    dy = torch.zeros_like(s) if dy is None else dy  # only s used: rare
    ds, dweight = call_op(_rms_norm_backward_op, _backward, dy, ds_out, s, weight, rstd)
    x_dtype, residual_dtype = ctx.dtypes
    # The add passes its gradient through unchanged: dx and dresidual are the same tensor,
    # exactly as torch's own add backward hands one gradient to both inputs.
    return ds.to(x_dtype), ds.to(residual_dtype), dweight, None


# Each op and its twin function (lash_kernels._launch.call_op picks one per call).
rms_norm_op = triton_op("lash::rms_norm", mutates_args=())(_rms_norm)
rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_setup_rms_norm)
RMSNormFunction = twin_function(_rms_norm, _setup_rms_norm, _rms_norm_grad)
add_rms_norm_op = triton_op("lash::add_rms_norm", mutates_args=())(_add_rms_norm)
add_rms_norm_op.register_autograd(_add_rms_norm_grad, setup_context=_setup_add_rms_norm)
AddRMSNormFunction = twin_function(_add_rms_norm, _setup_add_rms_norm, _add_rms_norm_grad)
