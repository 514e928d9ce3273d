"""SwiGLU's Triton kernel, its launcher and the ``lash::swiglu`` ``torch.library`` op.

Layers: ``_swiglu_kernel`` (Triton; the forward and, behind a constexpr, the backward) →
``_swiglu`` / ``_swiglu_backward`` launchers → ``lash::swiglu`` and ``lash::swiglu_backward``
registered with ``torch.library.triton_op``, and the forward's twin ``autograd.Function`` for eager
calls (:func:`swiglu_call` picks one). The maths is in :mod:`lash_kernels.ops.swiglu`. Imported
only where Triton is installed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from lash_kernels._launch import call_op, cdiv, launch, next_power_of_2, sm_count, twin_function
from lash_kernels.aot_types import ARCHS, KernelVariant, pointer


@triton.jit
def _swiglu_kernel(
    H,  # pointer to h [M, 2F]: gate in columns [0, F), value in [F, 2F)
    DOUT,  # pointer to the gradient of the output [M, F] (read only when BACKWARD)
    O,  # pointer to the output [M, F] contiguous, or (BACKWARD) the gradient of h [M, 2F] contiguous
    stride_h,  # elements between rows of H
    stride_dout,  # elements between rows of DOUT
    M,  # rows
    F,  # columns of the gate (and of the value)
    BACKWARD: tl.constexpr,  # write (dgate | dvalue) instead of silu(gate) · value
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_F: tl.constexpr,  # columns per program
):
    """One program: a BLOCK_M × BLOCK_F tile of gate and value, all maths in fp32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    gate_ptr = H + rows64 * stride_h + cols[None, :]
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    value = tl.load(gate_ptr + F, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    out_ty = O.dtype.element_ty
    if BACKWARD:
        dout = tl.load(DOUT + rows64 * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dgate = dout * value * sig * (1.0 + gate * (1.0 - sig))
        out_ptr = O + rows64 * (2 * F) + cols[None, :]
        tl.store(out_ptr, dgate.to(out_ty), mask=mask)
        tl.store(out_ptr + F, (dout * silu).to(out_ty), mask=mask)
    else:
        tl.store(O + rows64 * F + cols[None, :], (silu * value).to(out_ty), mask=mask)


class _Plan(NamedTuple):
    block_m: int
    block_f: int
    num_warps: int
    grid: tuple[int, int]


MAX_TILE, MIN_TILE = 2048, 256  # elements of gate (and of value) per program
PROGRAMS_PER_SM = 4  # what a launch aims to give every SM, so enough loads are in flight


def _plan(m: int, f: int, sms: int) -> _Plan:
    """The largest tile up to ``MAX_TILE`` elements that still gives every SM ``PROGRAMS_PER_SM``
    programs (down to ``MIN_TILE``), as wide as the row allows up to 1024 columns; up to 4 warps,
    each thread with at least 8 elements, so 16-bit loads still come 128 bits at a time."""
    tile = MAX_TILE
    while tile > MIN_TILE and cdiv(m * f, tile) < PROGRAMS_PER_SM * sms:
        tile //= 2
    block_f = min(next_power_of_2(f), 1024, tile)
    block_m = tile // block_f
    return _Plan(block_m, block_f, max(1, min(4, tile // 256)), (cdiv(m, block_m), cdiv(f, block_f)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[M, C]`` rows, copied only when its last dimension is not unit-stride."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _run(h2: torch.Tensor, dout2: torch.Tensor | None, out: torch.Tensor) -> None:
    m, f = h2.shape[0], h2.shape[1] // 2
    if m * f == 0:
        return
    plan = _plan(m, f, sm_count(h2.device))
    dout_arg = dout2 if dout2 is not None else h2  # any pointer when unused
    launch(_swiglu_kernel)[plan.grid](
        h2, dout_arg, out, h2.stride(0), dout_arg.stride(0), m, f, BACKWARD=dout2 is not None,
        BLOCK_M=plan.block_m, BLOCK_F=plan.block_f, num_warps=plan.num_warps,
    )  # fmt: skip


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    """Launch the forward; returns ``silu(gate) · value`` shaped ``(..., F)``."""
    out = torch.empty((*h.shape[:-1], h.shape[-1] // 2), dtype=h.dtype, device=h.device)
    _run(_rows(h), None, out)
    return out


def _swiglu_backward(h: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """Launch the backward; returns ``(dgate | dvalue)`` shaped and typed like ``h``, contiguous."""
    dh = torch.empty_like(h, memory_format=torch.contiguous_format)
    _run(_rows(h), _rows(dout), dh)
    return dh


def _setup_swiglu(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _swiglu_grad(ctx, dout):
    (h,) = ctx.saved_tensors
    return call_op(swiglu_backward_op, _swiglu_backward, h, dout)


# The ops and the forward's twin function (lash_kernels._launch.call_op picks one per call).
swiglu_backward_op = triton_op("lash::swiglu_backward", mutates_args=())(_swiglu_backward)
swiglu_op = triton_op("lash::swiglu", mutates_args=())(_swiglu)
swiglu_op.register_autograd(_swiglu_grad, setup_context=_setup_swiglu)
SwigluFunction = twin_function(_swiglu, _setup_swiglu, _swiglu_grad)


def swiglu_call(h: torch.Tensor) -> torch.Tensor:
    """The product, differentiable, through :data:`swiglu_op` or its twin (``call_op``)."""
    return call_op(swiglu_op, SwigluFunction.call, h)


def static_variants(shape, dtype: torch.dtype, arch: int) -> list:
    """The launches :mod:`lash_kernels.tools.aot_check` compiles: forward and backward over
    ``shape.tokens`` rows of a ``4 · shape.hidden`` wide gate (LASH's default FFN width)."""
    m, f = shape.tokens, 4 * shape.hidden
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = _plan(m, f, ARCHS[arch].sms)
    act = pointer(dtype)
    signature = dict(H=act, DOUT=act, O=act, stride_h="i32", stride_dout="i32", M="i32", F="i32",
                     BACKWARD="constexpr", BLOCK_M="constexpr", BLOCK_F="constexpr")  # fmt: skip
    tile = plan.block_m * plan.block_f * itemsize
    return [
        KernelVariant(
            f"swiglu.{'backward' if backward else 'forward'}", _swiglu_kernel, signature,
            dict(BACKWARD=backward, BLOCK_M=plan.block_m, BLOCK_F=plan.block_f), plan.num_warps, 1,
            plan.grid[0] * plan.grid[1], dict(stride_h=2 * f, stride_dout=f, M=m, F=f),
            bytes_in_flight=(3 if backward else 2) * tile, bytes_moved=(5 if backward else 3) * m * f * itemsize,
        )
        for backward in (False, True)
    ]  # fmt: skip
