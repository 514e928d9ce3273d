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
and an fp32 copy would double the memory traffic; in LASH's blocks the residual stream is fp32
under autocast (embedding output), so ``add_rms_norm`` returns fp32 there just as torch does.

Layers: ``_*_kernel`` (Triton) → ``_forward`` / ``_backward`` launchers → ``lash::rms_norm``,
``lash::add_rms_norm`` and ``lash::rms_norm_backward`` registered with :mod:`torch.library`
(``triton_op``, so ``torch.compile`` sees the kernels) with ``register_autograd`` → public
:func:`rms_norm`, :func:`add_rms_norm`, :class:`RMSNorm`; :func:`rms_norm_reference` and
:func:`add_rms_norm_reference` in pure torch.
"""

from __future__ import annotations

import torch
from torch import nn

from lash_kernels._launch import check_kernel_dtypes, sm_count
from lash_kernels.aot_types import ARCHS, LAUNCH_STAGES, KernelVariant, pointer
from lash_kernels.dispatch import HAS_TRITON, backend

MAX_HIDDEN = 16384
BACKWARD_MAX_ROW = 8192  # widest row the backward keeps whole in registers (at 32 warps, no spills)


if HAS_TRITON:  # optional off Linux: the torch references still work there
    import triton
    import triton.language as tl
    from torch.library import triton_op

    from lash_kernels._launch import launch

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
        BLOCK_M: tl.constexpr,  # rows per program: several when N is small, so programs stay busy
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
    ):
        """One band of rows per program.

        Narrow rows (``COL_BLOCKS = 1``) stay in registers: one read of dy and s, one write of ds,
        and dw summed privately in fp32 registers (no atomics; the ``[num_programs, N]``
        partials are summed once by the launcher). Wide rows (16K features) would need dy, s,
        w and dw live at once, 64 fp32 registers per thread at 32 warps, and spill; they go
        in ``COL_BLOCKS`` slices instead: a first pass sums ``g · ŝ`` over the slices, a second
        reloads each slice (just read, so served from L2), writes ds and adds to this program's
        dw partial row in memory (64 KiB, L2-resident).
        """
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        if COL_BLOCKS == 1:
            w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
            dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, M)
        for start in range(row_start, row_end, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows64 = rows.to(tl.int64)[:, None]
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            if COL_BLOCKS == 1:
                mask = row_mask[:, None] & (cols[None, :] < N)
                dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                s_hat = tl.load(S + rows64 * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32) * rstd[:, None]
                g = dy * w[None, :]
                mean_g_s = tl.sum(g * s_hat, axis=1) / N
                _write_ds(DS, DS_OUT, rows64, cols, mask, g, s_hat, mean_g_s, rstd, stride_ds_out, N, HAS_DS_OUT)
                dw += tl.sum(dy * s_hat, axis=0)
            else:
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
        if COL_BLOCKS == 1:
            tl.store(DW_PARTIAL + pid * N + cols, dw, mask=cols < N)

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

    def _block_config(n: int) -> tuple[int, int, int]:
        """(BLOCK_M, BLOCK_N, num_warps) for hidden size ``n``: ≥ 4096 elements per block, 8-16 per thread."""
        block_n = triton.next_power_of_2(n)
        block_m = max(1, 4096 // block_n)
        num_warps = min(32, max(1, block_m * block_n // 256))
        return block_m, block_n, num_warps

    def _backward_config(n: int) -> tuple[int, int, int, int]:
        """(BLOCK_M, BLOCK_N, COL_BLOCKS, num_warps) of the backward: rows wider than
        ``BACKWARD_MAX_ROW`` go in slices of half that (4096 columns, 8 per thread; kernel docstring)."""
        if triton.next_power_of_2(n) <= BACKWARD_MAX_ROW:
            block_m, block_n, num_warps = _block_config(n)
            return block_m, block_n, 1, num_warps
        block_n = BACKWARD_MAX_ROW // 2
        return 1, block_n, triton.cdiv(n, block_n), max(1, min(16, block_n // 256))

    def _backward_programs(m: int, block_m: int, num_warps: int, sms: int) -> tuple[int, int]:
        """(programs, rows per program): enough to fill the device (32 warps per SM), never more
        than there are row blocks."""
        programs = min(triton.cdiv(m, block_m), sms * max(1, 32 // num_warps))
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
        block_m, block_n, num_warps = _block_config(n)
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
        """Launch the backward kernel; returns ``(ds, dweight)`` with ds shaped like ``s``."""
        n = s.shape[-1]
        weight = weight.contiguous()  # (N,)
        dy2, s2 = _rows(dy), _rows(s)  # (M, N)
        ds_out2 = _rows(ds_out) if ds_out is not None else dy2  # (M, N)
        m = s2.shape[0]
        ds = torch.empty(s.shape, dtype=torch.promote_types(dy.dtype, s.dtype), device=s.device)
        if m == 0:
            return ds, torch.zeros_like(weight)
        block_m, block_n, col_blocks, num_warps = _backward_config(n)
        programs, rows_per_program = _backward_programs(m, block_m, num_warps, sm_count(s.device))
        alloc = torch.zeros if col_blocks > 1 else torch.empty  # sliced rows add into their partial row
        dw_partial = alloc(programs, n, dtype=torch.float32, device=s.device)  # (P, N)
        launch(_rms_norm_backward_kernel)[(programs,)](
            dy2, ds_out2, s2, weight, rstd, ds, dw_partial, dy2.stride(0), ds_out2.stride(0), s2.stride(0), m, n,
            rows_per_program, HAS_DS_OUT=ds_out is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            COL_BLOCKS=col_blocks, num_warps=num_warps,
        )  # fmt: skip
        return ds, dw_partial.sum(0).to(weight.dtype)

    def static_variants(shape, dtype: torch.dtype, arch: int) -> list:
        """The launches :mod:`lash_kernels.aot_check` compiles: forward and backward, with and
        without the residual, at ``shape.tokens`` rows of ``shape.hidden``, fp32 weight."""
        m, n = shape.tokens, shape.hidden
        act, f32 = pointer(dtype), pointer(torch.float32)
        ints = dict(M=m, N=n)
        block_m, block_n, num_warps = _block_config(n)
        forward = dict(X=act, R=act, W=f32, Y=act, S=act, RSTD=f32, stride_x="i32", stride_r="i32", M="i32",
                       N="i32", eps="fp32", HAS_RESIDUAL="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr")  # fmt: skip
        back_m, back_n, col_blocks, back_warps = _backward_config(n)
        programs, rows_per_program = _backward_programs(m, back_m, back_warps, ARCHS[arch].sms)
        backward = dict(DY=act, DS_OUT=act, S=act, W=f32, RSTD=f32, DS=act, DW_PARTIAL=f32, stride_dy="i32",
                        stride_ds_out="i32", stride_s="i32", M="i32", N="i32", rows_per_program="i32",
                        HAS_DS_OUT="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr",
                        COL_BLOCKS="constexpr")  # fmt: skip
        variants = []
        for residual in (False, True):
            name = "add_rms_norm" if residual else "rms_norm"
            variants.append(KernelVariant(
                f"{name}.forward", _rms_norm_forward_kernel, forward,
                dict(HAS_RESIDUAL=residual, BLOCK_M=block_m, BLOCK_N=block_n), num_warps, LAUNCH_STAGES,
                triton.cdiv(m, block_m), dict(ints, stride_x=n, stride_r=n),
            ))  # fmt: skip
            variants.append(KernelVariant(
                f"{name}.backward", _rms_norm_backward_kernel, backward,
                dict(HAS_DS_OUT=residual, BLOCK_M=back_m, BLOCK_N=back_n, COL_BLOCKS=col_blocks), back_warps,
                LAUNCH_STAGES, programs,
                dict(ints, stride_dy=n, stride_ds_out=n, stride_s=n, rows_per_program=rows_per_program),
            ))  # fmt: skip
        return variants

    @triton_op("lash::rms_norm", mutates_args=())
    def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        y, _, rstd = _forward(x, None, weight, eps)
        return y, rstd

    @triton_op("lash::add_rms_norm", mutates_args=())
    def _add_rms_norm_op(
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


    _rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_setup_rms_norm)
    _add_rms_norm_op.register_autograd(_add_rms_norm_grad, setup_context=_setup_add_rms_norm)


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


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> None:
    """Raise ValueError for inputs outside the ops' envelope (both backends check the same)."""
    if x.ndim < 1 or x.shape[-1] < 1 or not x.is_floating_point():
        raise ValueError(
            f"x must be a floating tensor with a hidden size ≥ 1; got {x.dtype} of shape {tuple(x.shape)}"
        )
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight shape {tuple(weight.shape)} must be ({x.shape[-1]},), the hidden size of x")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps={eps} must be ≥ 0")


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
        eps: added to ``mean(x²)`` before the square root, ≥ 0.

    Returns:
        ``(..., N)`` contiguous tensor in ``x.dtype`` (see the module docstring for the dtype rule).

    Raises:
        ValueError: weight not of shape ``(N,)``, negative eps, or (Triton) a dtype other than
            fp32/bf16/fp16 or ``N`` above 16384.
    """
    _check(x, weight, eps)
    if backend(x.device) == "torch":
        return rms_norm_reference(x, weight, eps)
    _check_kernel(x=x, weight=weight)
    return _rms_norm_op(x, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``s = x + residual; y = rms_norm(s)``, returning both, differentiable in all inputs.

    Args:
        x: ``(..., N)`` activations, any layout.
        residual: ``(..., N)`` residual stream, same shape as ``x``.
        weight: ``(N,)`` scale.
        eps: added to ``mean(s²)`` before the square root, ≥ 0.

    Returns:
        ``(y, s)``, both ``(..., N)`` contiguous in the promoted dtype of ``x`` and ``residual``.

    Raises:
        ValueError: shapes that disagree, negative eps, or (Triton) an unsupported dtype or size.
    """
    _check(x, weight, eps, residual)
    if backend(x.device) == "torch":
        return add_rms_norm_reference(x, residual, weight, eps)
    _check_kernel(x=x, residual=residual, weight=weight)
    y, s, _ = _add_rms_norm_op(x, residual, weight, eps)
    return y, s


class RMSNorm(nn.Module):
    """Drop-in RMSNorm: ``x · rsqrt(mean(x², -1) + eps) · weight`` with weight initialised to ones.

    Its state dict is exactly ``{"weight"}``, as in the seed's reference module.

    Args:
        dim: hidden size ``N``.
        eps: added to ``mean(x²)`` before the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim={dim} must be ≥ 1")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` → ``(..., dim)`` in ``x.dtype``."""
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
