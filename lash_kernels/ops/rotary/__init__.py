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
(one per batch row, as Hugging Face models build them from position ids), in any floating dtype;
tables of width ``D/2`` are half tables: ``c`` stands for ``cat(c, c)``, the form every
rotate-half RoPE builds, and the kernel then reads one half for both.
With ``positions`` (``[T]`` for every row, or ``[B, T]``), the tables are ``[S, D]`` for ``S``
positions and token ``t`` of row ``b`` takes row ``positions[b, t]``: the kernel reads the table
rows it needs, so decoding and early exit pass their positions without gathering tables.
All maths in fp32; outputs in the dtype and, for dense inputs, the strides of q and k. With
``eager_rounding`` the kernel rounds where eager torch in the activations' dtype does (tables,
each product, the sum), so a model's own RoPE can be replaced without changing its numbers.

Layers: the kernel, its launcher and the ``lash::rotary`` op in :mod:`~lash_kernels.ops.rotary.kernels`
→ the public :func:`apply_rotary` here, which checks its inputs and picks the backend;
:func:`apply_rotary_reference` in pure torch.
"""

from __future__ import annotations

import torch

from lash_kernels._launch import check_kernel_dtypes, check_one_device
from lash_kernels.dispatch import HAS_TRITON, backend
from lash_kernels.ops.multi_exit_ce.reference import values_need_checking

if HAS_TRITON:  # optional off Linux: the torch reference still works there
    from lash_kernels.ops.rotary import kernels


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x_lo, x_hi = x.chunk(2, dim=-1)
    return torch.cat((-x_hi, x_lo), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    eager_rounding: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch RoPE with the kernel's semantics, outputs in q/k dtypes.

    Args:
        q: ``(B, Hq, T, D)`` queries.
        k: ``(B, Hk, T, D)`` keys.
        cos: ``(T, D)`` cosine table, or ``(B, T, D)`` / ``(1, T, D)`` per batch row; with
            ``positions``, ``(S, D)`` indexed by them; width ``D/2`` for a half table ``c`` that
            stands for ``cat(c, c)``.
        sin: sine table, shaped like ``cos``.
        positions: optional ``(T,)`` or ``(B, T)`` table rows of the tokens.
        eager_rounding: evaluate ``x * cos + rotate_half(x) * sin`` in x's dtype, operation by
            operation (tables first cast to it), instead of in fp32 with one rounding.

    Returns:
        ``(q · cos + rotate_half(q) · sin, k · cos + rotate_half(k) · sin)``.
    """
    if positions is not None:  # the tokens' rows first: a decoding step widens one row, not the table
        cos, sin = cos[positions], sin[positions]  # (T, D) or (B, T, D)
    if cos.shape[-1] * 2 == q.shape[-1]:  # half tables: c stands for cat(c, c)
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    if cos.ndim == 3:  # (B, T, D) → (B, 1, T, D): one table per batch row, shared by its heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated = []
    for x in (q, k):
        compute = x.dtype if eager_rounding else torch.promote_types(x.dtype, torch.float32)
        xf, c, s = x.to(compute), cos.to(compute), sin.to(compute)  # (B, H, T, D), tables broadcast over H
        rotated.append((xf * c + _rotate_half(xf) * s).to(x.dtype))
    return rotated[0], rotated[1]


def _check_positions(positions: torch.Tensor, b: int, t: int, cos: torch.Tensor, sin: torch.Tensor, width: int) -> None:
    """Raise ValueError unless ``positions`` index ``(S, width)`` tables for ``(T,)`` or ``(B, T)`` tokens."""
    if positions.dtype != torch.long or tuple(positions.shape) not in {(t,), (b, t)}:
        raise ValueError(
            f"positions must be an int64 tensor of shape (T,) = ({t},) or (B, T) = ({b}, {t}); "
            f"got {positions.dtype} of shape {tuple(positions.shape)}"
        )
    if cos.ndim != 2 or cos.shape[1] != width or sin.shape != cos.shape:
        raise ValueError(f"with positions, cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be (S, {width})")
    rows = cos.shape[0]
    if positions.numel() == 0 or not values_need_checking():
        return
    if positions.device.type != "cpu" or torch.compiler.is_compiling():  # reading them would sync: checked on the device
        torch._assert_async(((positions >= 0) & (positions < rows)).all(), f"a position is outside [0, {rows})")
        return
    lo, hi = torch.aminmax(positions)
    if lo < 0 or hi >= rows:
        raise ValueError(f"positions holds {int(lo) if lo < 0 else int(hi)}, outside [0, {rows}), the rows of the tables")


def _check(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None = None
) -> None:
    """Raise ValueError for inputs outside the op's envelope (both backends check the same)."""
    check_one_device(q=q, k=k, cos=cos, sin=sin, positions=positions)
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be [B, H, T, D]; got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, length and head_dim"
        )
    b, t, dim = q.shape[0], q.shape[2], q.shape[3]
    if dim % 2 != 0:
        raise ValueError(f"head_dim={dim} must be even for rotate-half RoPE")
    width = cos.shape[-1] if cos.ndim and cos.shape[-1] in (dim, dim // 2) else dim  # full or half tables
    allowed = {(t, width), (1, t, width), (b, t, width)}
    if positions is not None:
        _check_positions(positions, b, t, cos, sin, width)
    elif tuple(cos.shape) not in allowed or sin.shape != cos.shape:
        raise ValueError(
            f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape of (T, W) = ({t}, W), "
            f"(1, T, W) or (B, T, W) = ({b}, {t}, W), W the head_dim {dim} or its half {dim // 2}"
        )
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos and sin are constants here and must not require grad; pass them detached")
    for name, x in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor; got {x.dtype}")


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    eager_rounding: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotate-half RoPE to queries and keys (one kernel launch for both), differentiable in q, k.

    Args:
        q: ``(B, Hq, T, D)`` queries, any strides.
        k: ``(B, Hk, T, D)`` keys, any strides; ``Hk`` may differ from ``Hq``.
        cos: ``(T, D)`` cosine table, e.g. ``cat(cos(t·f), cos(t·f))``, or ``(B, T, D)`` (one per
            batch row, e.g. from per-row position ids) or ``(1, T, D)``; no gradient flows to it.
            A table of width ``D/2`` is a half table ``c`` standing for ``cat(c, c)``, the usual
            form, which the kernel reads once for both halves (half the table traffic).
        sin: sine table, shaped and laid out like ``cos``.
        positions: optional int64 ``(T,)`` (every row) or ``(B, T)``: token ``t`` of row ``b``
            takes table row ``positions[b, t]``, and the tables are ``(S, D)`` for any ``S``
            (decoding and early exit rotate tokens at positions other than ``0..T-1``).
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
        ValueError: inputs on two devices, shapes that disagree, an odd head_dim, tables that
            require grad, or (Triton) a dtype of q/k other than fp32/bf16/fp16.
    """
    _check(q, k, cos, sin, positions)
    if backend(q.device) == "torch":
        return apply_rotary_reference(q, k, cos, sin, positions=positions, eager_rounding=eager_rounding)
    check_kernel_dtypes("RoPE", q=q, k=k)
    return kernels.rotary_call(q, k, cos, sin, positions, False, eager_rounding)
