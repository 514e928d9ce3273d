"""Rotary position embedding (RoPE) on q and k in one Triton launch, forward and backward.

Maths, rotate-half convention, per position ``t`` and head vector ``x = [x_lo, x_hi]`` (halves of
length ``D/2``), with ``cos = [c_lo, c_hi]`` and ``sin = [s_lo, s_hi]`` the rows of ``[T, D]``
tables::

    out = x · cos + rotate_half(x) · sin,    rotate_half(x) = [-x_hi, x_lo]
    out_lo = x_lo · c_lo - x_hi · s_lo
    out_hi = x_hi · c_hi + x_lo · s_hi

The map is linear in ``x``, so the backward applies its transpose::

    dx_lo = d_lo · c_lo + d_hi · s_hi
    dx_hi = d_hi · c_hi - d_lo · s_lo

which is the forward formula with ``(s_lo, s_hi)`` replaced by ``(-s_hi, -s_lo)``: the same kernel
with a constexpr ``INVERSE`` flag. With the usual tables (``cos = cat(cos θ, cos θ)``, likewise
sin) that is the rotation by ``-θ``; the kernel reads both halves of the tables and so stays exact
for any tables. ``cos`` and ``sin`` are constants: the ops give no gradient for them and refuse
tables that require one (both backends), since position tables are buffers, not parameters.

Supported envelope: q ``[B, Hq, T, D]`` and k ``[B, Hk, T, D]`` (Hq ≠ Hk allowed, e.g. grouped
queries) in any strides with a unit stride on ``D`` (views from a transpose run without a copy),
even ``D``, fp32/bf16/fp16 (q and k may differ); tables ``[T, D]``, or ``[B, T, D]`` / ``[1, T, D]``
(one per batch row, as Hugging Face models build them from position ids), in any floating dtype.
All maths in fp32; outputs in the dtype and, for dense inputs, the strides of q and k. With
``eager_rounding`` the kernel rounds where eager torch in the activations' dtype does (tables,
each product, the sum), so a model's own RoPE can be replaced without changing its numbers.

Layers: ``_rotary_kernel`` (Triton) → ``_rotary`` launcher → ``lash::rotary`` registered with
``torch.library.triton_op`` whose autograd calls the same op with ``inverse`` flipped → public
:func:`apply_rotary`; :func:`apply_rotary_reference` in pure torch.
"""

from __future__ import annotations

import torch

from lash_kernels._launch import check_kernel_dtypes, sm_count
from lash_kernels.aot_types import ARCHS, LAUNCH_STAGES, KernelVariant, pointer
from lash_kernels.dispatch import HAS_TRITON, backend

PROGRAMS_PER_SM = 2  # grid size the launcher aims for, per streaming multiprocessor
NUM_WARPS = 4  # per program (see _blocks)


if HAS_TRITON:  # optional off Linux: the torch references still work there
    import triton
    import triton.language as tl
    from torch.library import triton_op

    from lash_kernels._launch import launch

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
        first_head,  # this program's first head; it takes every head_groups-th after it
        head_groups,  # programs sharing the heads of one (position block, batch)
        pid_b,  # batch index of this program
        t,  # (BLOCK_T,) positions of this program
        d,  # (BLOCK_H,) offsets inside one half of the head dimension
        mask,  # (BLOCK_T, BLOCK_H) valid positions × valid offsets
        cos_lo,  # (BLOCK_T, BLOCK_H) fp32 table halves, loaded once for all heads
        cos_hi,
        sin_lo,
        sin_hi,
        HALF: tl.constexpr,  # D / 2
        EAGER_ROUNDING: tl.constexpr,  # round tables, each product and the sum to the output dtype
    ):
        t64 = t.to(tl.int64)[:, None]
        out_ty = O.dtype.element_ty
        if EAGER_ROUNDING:  # eager torch's `x * cos` in the output dtype multiplies rounded tables
            cos_lo, cos_hi = cos_lo.to(out_ty).to(tl.float32), cos_hi.to(out_ty).to(tl.float32)
            sin_lo, sin_hi = sin_lo.to(out_ty).to(tl.float32), sin_hi.to(out_ty).to(tl.float32)
        for h in range(first_head, n_heads, head_groups):
            x_ptr = X + pid_b.to(tl.int64) * stride_xb + h * stride_xh + t64 * stride_xt + d[None, :]
            o_ptr = O + pid_b.to(tl.int64) * stride_ob + h * stride_oh + t64 * stride_ot + d[None, :]
            x_lo = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
            x_hi = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
            if EAGER_ROUNDING:  # products of two 16-bit floats are exact in fp32: one rounding each
                o_lo = (x_lo * cos_lo).to(out_ty).to(tl.float32) - (x_hi * sin_lo).to(out_ty).to(tl.float32)
                o_hi = (x_hi * cos_hi).to(out_ty).to(tl.float32) + (x_lo * sin_hi).to(out_ty).to(tl.float32)
            else:
                o_lo = x_lo * cos_lo - x_hi * sin_lo
                o_hi = x_hi * cos_hi + x_lo * sin_hi
            tl.store(o_ptr, o_lo.to(out_ty), mask=mask)
            tl.store(o_ptr + HALF, o_hi.to(out_ty), mask=mask)


    @triton.jit
    def _rotary_kernel(
        Q,  # pointer to q [B, Hq, T, D]
        K,  # pointer to k [B, Hk, T, D]
        QO,  # pointer to the rotated q
        KO,  # pointer to the rotated k
        COS,  # pointer to the cos table [T, D] of each batch row (batch stride 0: one shared table)
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
        T,  # sequence length
        HQ,  # heads of q
        HK,  # heads of k
        head_groups,  # programs per (position block, batch), each taking every head_groups-th head
        HALF: tl.constexpr,  # D / 2
        INVERSE: tl.constexpr,  # apply the transpose (backward) instead of the rotation
        EAGER_ROUNDING: tl.constexpr,  # round as eager torch in the output dtype does (see apply_rotary)
        BLOCK_T: tl.constexpr,  # positions per program
        BLOCK_H: tl.constexpr,  # next power of two ≥ D / 2
    ):
        pid_t = tl.program_id(0)
        pid_b = tl.program_id(1)
        pid_h = tl.program_id(2)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_H)
        mask = (t < T)[:, None] & (d < HALF)[None, :]
        # The tables are the same for every head: one load per program, reused by its share of the
        # Hq + Hk heads (and served from L2 to the other head groups).
        cos_ptr = COS + pid_b.to(tl.int64) * stride_cos_b + t[:, None] * stride_cos_t + d[None, :]
        sin_ptr = SIN + pid_b.to(tl.int64) * stride_sin_b + t[:, None] * stride_sin_t + d[None, :]
        cos_lo = tl.load(cos_ptr, mask=mask, other=0.0).to(tl.float32)
        cos_hi = tl.load(cos_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        sin_lo = tl.load(sin_ptr, mask=mask, other=0.0).to(tl.float32)
        sin_hi = tl.load(sin_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        if INVERSE:
            sin_lo, sin_hi = -sin_hi, -sin_lo
        _rotate_heads(
            Q, QO, stride_qb, stride_qh, stride_qt, stride_qob, stride_qoh, stride_qot,
            HQ, pid_h, head_groups, pid_b, t, d, mask, cos_lo, cos_hi, sin_lo, sin_hi, HALF, EAGER_ROUNDING,
        )  # fmt: skip
        _rotate_heads(
            K, KO, stride_kb, stride_kh, stride_kt, stride_kob, stride_koh, stride_kot,
            HK, pid_h, head_groups, pid_b, t, d, mask, cos_lo, cos_hi, sin_lo, sin_hi, HALF, EAGER_ROUNDING,
        )  # fmt: skip


    def _unit_last(t: torch.Tensor) -> torch.Tensor:
        """``t`` itself when its last dim is unit-stride (any other strides are fine), else a copy."""
        return t if t.stride(-1) == 1 else t.contiguous()


    def _blocks(half: int) -> tuple[int, int]:
        """(BLOCK_T, BLOCK_H) for head dim ``2 · half``: 2048-element tiles, 16 per thread at 4 warps
        for each of the six live tiles. The block depends on D only, so a dynamic sequence length
        under torch.compile does not specialise the graph; short sequences mask one block's tail."""
        block_h = triton.next_power_of_2(half)
        return max(1, 2048 // block_h), block_h


    def _head_groups(t: int, b: int, heads: int, block_t: int, sms: int) -> int:
        """Programs sharing one (position block, batch): enough for ≥ 2 programs per SM (the
        seed's 64 × 32 tokens are one position block per batch row, 64 programs on 132 SMs)."""
        return max(1, min(heads, triton.cdiv(PROGRAMS_PER_SM * sms, triton.cdiv(t, block_t) * b)))


    def static_variants(shape, dtype: torch.dtype, arch: int) -> list:
        """The launches :mod:`lash_kernels.aot_check` compiles: the rotation and its transpose on
        contiguous ``[batch, heads, seq, head_dim]`` q and k, fp32 tables."""
        b, h, t, dim = shape.batch, shape.heads, shape.seq, shape.head_dim
        block_t, block_h = _blocks(dim // 2)
        groups = _head_groups(t, b, h, block_t, ARCHS[arch].sms)
        act, f32 = pointer(dtype), pointer(torch.float32)
        strides = [f"stride_{x}{y}" for x in ("q", "k", "qo", "ko") for y in ("b", "h", "t")]
        tables = ["stride_cos_b", "stride_cos_t", "stride_sin_b", "stride_sin_t"]  # one shared table
        signature = dict(Q=act, K=act, QO=act, KO=act, COS=f32, SIN=f32, **dict.fromkeys(strides, "i32"),
                         **dict.fromkeys(tables, "i32"), T="i32", HQ="i32", HK="i32", head_groups="i32",
                         HALF="constexpr", INVERSE="constexpr", EAGER_ROUNDING="constexpr", BLOCK_T="constexpr",
                         BLOCK_H="constexpr")  # fmt: skip
        ints = dict(zip(strides, [h * t * dim, t * dim, dim] * 4), **dict(zip(tables, [0, dim] * 2)), T=t, HQ=h, HK=h)
        return [
            KernelVariant(
                f"rotary.{'backward' if inverse else 'forward'}", _rotary_kernel, signature,
                dict(HALF=dim // 2, INVERSE=inverse, EAGER_ROUNDING=False, BLOCK_T=block_t, BLOCK_H=block_h), NUM_WARPS, LAUNCH_STAGES,
                triton.cdiv(t, block_t) * b * groups, dict(ints, head_groups=groups),
            )
            for inverse in (False, True)
        ]  # fmt: skip


    def _table_strides(table: torch.Tensor) -> tuple[int, int]:
        """(batch, position) strides of a ``[T, D]`` or ``[1 or B, T, D]`` table; 0 over batch when shared."""
        if table.ndim == 2 or table.shape[0] == 1:
            return 0, table.stride(-2)
        return table.stride(0), table.stride(1)


    def _rotary(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, eager_rounding: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Launch the kernel over (position blocks, batch); returns the rotated ``(q, k)``."""
        q, k, cos, sin = _unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin)
        b, hq, t, dim = q.shape
        hk = k.shape[1]
        # empty_like keeps a dense input's layout (e.g. a transposed [B, T, H, D] view).
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        if q.numel() + k.numel() == 0:
            return q_out, k_out
        half = dim // 2
        block_t, block_h = _blocks(half)
        head_groups = _head_groups(t, b, max(hq, hk), block_t, sm_count(q.device))
        launch(_rotary_kernel)[(triton.cdiv(t, block_t), b, head_groups)](
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
            t,
            hq,
            hk,
            head_groups,
            HALF=half,
            INVERSE=inverse,
            EAGER_ROUNDING=eager_rounding,
            BLOCK_T=block_t,
            BLOCK_H=block_h,
            num_warps=NUM_WARPS,
            # Fused multiply-adds would absorb a product's rounding (fma.rn.bf16 in place of two
            # rounded products and their rounded sum): eager rounding compiles without them.
            enable_fp_fusion=not eager_rounding,
        )
        return q_out, k_out


    @triton_op("lash::rotary", mutates_args=())
    def _rotary_op(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, eager_rounding: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _rotary(q, k, cos, sin, inverse, eager_rounding)


    def _setup_rotary(ctx, inputs, output) -> None:
        _, _, cos, sin, inverse, eager_rounding = inputs
        ctx.save_for_backward(cos, sin)
        ctx.inverse, ctx.eager_rounding = inverse, eager_rounding


    def _rotary_grad(ctx, dq_out, dk_out):
        # Eager autograd of `x * cos + rotate_half(x) * sin` rounds the same way: each product of
        # the incoming gradient with a (rounded) table, then their sum.
        cos, sin = ctx.saved_tensors
        dq, dk = _rotary_op(dq_out, dk_out, cos, sin, not ctx.inverse, ctx.eager_rounding)
        return dq, dk, None, None, None, None


    _rotary_op.register_autograd(_rotary_grad, setup_context=_setup_rotary)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x_lo, x_hi = x.chunk(2, dim=-1)
    return torch.cat((-x_hi, x_lo), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, eager_rounding: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch RoPE with the kernel's semantics, outputs in q/k dtypes.

    Args:
        q: ``(B, Hq, T, D)`` queries.
        k: ``(B, Hk, T, D)`` keys.
        cos: ``(T, D)`` cosine table, or ``(B, T, D)`` / ``(1, T, D)`` per batch row.
        sin: sine table, shaped like ``cos``.
        eager_rounding: evaluate ``x * cos + rotate_half(x) * sin`` in x's dtype, operation by
            operation (tables first cast to it), instead of in fp32 with one rounding.

    Returns:
        ``(q · cos + rotate_half(q) · sin, k · cos + rotate_half(k) · sin)``.
    """
    if cos.ndim == 3:  # (B, T, D) → (B, 1, T, D): one table per batch row, shared by its heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated = []
    for x in (q, k):
        compute = x.dtype if eager_rounding else torch.promote_types(x.dtype, torch.float32)
        xf, c, s = x.to(compute), cos.to(compute), sin.to(compute)  # (B, H, T, D), tables broadcast over H
        rotated.append((xf * c + _rotate_half(xf) * s).to(x.dtype))
    return rotated[0], rotated[1]


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Raise ValueError for inputs outside the op's envelope (both backends check the same)."""
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be [B, H, T, D]; got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, length and head_dim"
        )
    b, t, dim = q.shape[0], q.shape[2], q.shape[3]
    if dim % 2 != 0:
        raise ValueError(f"head_dim={dim} must be even for rotate-half RoPE")
    allowed = {(t, dim), (1, t, dim), (b, t, dim)}
    if tuple(cos.shape) not in allowed or sin.shape != cos.shape:
        raise ValueError(
            f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape of (T, head_dim) = ({t}, {dim}), "
            f"(1, T, head_dim) or (B, T, head_dim) = ({b}, {t}, {dim})"
        )
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos and sin are constants here and must not require grad; pass them detached")
    for name, x in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor; got {x.dtype}")


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, eager_rounding: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotate-half RoPE to queries and keys (one kernel launch for both), differentiable in q, k.

    Args:
        q: ``(B, Hq, T, D)`` queries, any strides.
        k: ``(B, Hk, T, D)`` keys, any strides; ``Hk`` may differ from ``Hq``.
        cos: ``(T, D)`` cosine table, e.g. ``cat(cos(t·f), cos(t·f))``, or ``(B, T, D)`` (one per
            batch row, e.g. from per-row position ids) or ``(1, T, D)``; no gradient flows to it.
        sin: sine table, shaped and laid out like ``cos``.
        eager_rounding: round as eager torch does when it evaluates ``x * cos + rotate_half(x) *
            sin`` in x's dtype: tables cast to that dtype, each product rounded, then their sum
            (and likewise in the backward), with the kernel compiled without fused multiply-adds.
            The result is then bitwise eager torch's (Hugging Face models compute RoPE this way).
            Under ``torch.compile`` the launch's compile options are not carried through, so a
            multiply-add may absorb one product's rounding: within one rounding step, as the
            compiled model's own RoPE would be. Off, all maths is fp32 with one rounding at the
            end, which is more accurate.

    Returns:
        ``(q_rot, k_rot)`` shaped, typed and (for dense inputs) laid out like ``q`` and ``k``.

    Raises:
        ValueError: shapes that disagree, an odd head_dim, tables that require grad, or (Triton)
            a dtype of q/k other than fp32/bf16/fp16.
    """
    _check(q, k, cos, sin)
    if backend(q.device) == "torch":
        return apply_rotary_reference(q, k, cos, sin, eager_rounding=eager_rounding)
    check_kernel_dtypes("RoPE", q=q, k=k)
    return _rotary_op(q, k, cos, sin, False, eager_rounding)
