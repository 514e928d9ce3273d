"""The ``lash::multi_exit_ce`` ``torch.library`` op over the two Triton regimes, and its twin.

One op body runs the fused regime (:mod:`.fused`) or the chunked one (:mod:`.row_kernel`), as
the caller's ``chunked`` flag says, and returns the gradients it formed; the backward only scales
them by the incoming gradient of the loss. The op is registered with
``torch.library.triton_op`` so ``torch.compile`` sees the kernels, with a twin
``autograd.Function`` for eager calls (:func:`multi_exit_ce_call` picks one). Imported only where
Triton is installed.
"""

from __future__ import annotations

import torch
from torch.library import register_autograd, triton_op

from lash_kernels._launch import call_op, twin_function
from lash_kernels.dispatch import arch_has_tensor_core_dots
from lash_kernels.ops.multi_exit_ce.fused import fused_variants, run_fused
from lash_kernels.ops.multi_exit_ce.regime import fused_regime
from lash_kernels.ops.multi_exit_ce.row_kernel import row_variants, run_chunked


def _multi_exit_ce(
    hiddens: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None,
    exit_weights: list[float],
    ignore_index: int,
    with_stats: bool,
    need_grad_hiddens: bool,
    need_grad_weight: bool,
    chunked: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """``(loss, per_exit, token_loss, confidence, predictions, grad_h, grad_w, h_scale)``; see the
    two regimes (``h_scale``: the factor an fp16 ``grad_h`` still needs, or empty). An fp16 head's
    ``grad_w`` stays in fp32, where its small entries (rare classes' rows) keep their bits until
    the backward has multiplied it by the loss scale."""
    run = run_chunked if chunked or hiddens.numel() == 0 else run_fused  # no tokens: no kernel to launch
    loss, per_exit, token_loss, conf, pred, grad_h, grad_w, h_scale = run(
        hiddens, weight, targets, token_weights, exit_weights, ignore_index, with_stats, need_grad_hiddens,
        need_grad_weight,
    )  # fmt: skip
    # Gradients in the input dtypes (an fp16 head's in fp32), formed now; the backward only scales them.
    grad_w = grad_w if weight.dtype == torch.float16 else grad_w.to(weight.dtype)
    return loss, per_exit, token_loss, conf, pred, grad_h.to(hiddens.dtype), grad_w, h_scale


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*output[5:])
    ctx.dtypes = inputs[0].dtype, inputs[1].dtype  # of the hidden states and the head
    # Only the loss is differentiable: no zero-filled gradients for the other seven outputs.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_):
    grad_h, grad_w, h_scale = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[:2]
    grads = [g if need else None for g, need in zip((grad_h, grad_w), (need_h, need_w))]
    if torch.float16 in ctx.dtypes:
        # fp16: multiplied in fp32 (a GradScaler's first scale, 2¹⁶, is above fp16's largest
        # value) and rounded once, at its final size; dH also takes the factor it was kept
        # short of (package docstring, "Numerics")
        factors = grad_loss * h_scale if h_scale.numel() else grad_loss, grad_loss
        return (*(None if g is None else (g.float() * f).to(dtype) for g, f, dtype in zip(grads, factors, ctx.dtypes)),
                *(None,) * 8)  # fmt: skip
    wanted = [g for g in grads if g is not None]
    if len({g.dtype for g in wanted}) == 1:  # one launch scales both
        scaled = iter(torch._foreach_mul(wanted, grad_loss.to(wanted[0].dtype)))
    else:
        scaled = iter(g * grad_loss.to(g.dtype) for g in wanted)
    return tuple(next(scaled) if g is not None else None for g in grads) + (None,) * 8


# The op and its twin function (lash_kernels._launch.call_op picks one per call).
multi_exit_ce_op = triton_op("lash::multi_exit_ce", mutates_args=())(_multi_exit_ce)
register_autograd(multi_exit_ce_op, _backward, setup_context=_setup_context)
MultiExitCEFunction = twin_function(_multi_exit_ce, _setup_context, _backward)


def multi_exit_ce_call(hiddens, weight, targets, token_weights, exit_weights, ignore_index, with_stats, need_h, need_w,
                       chunked):  # fmt: skip
    """``(loss, per_exit, token_loss, confidence, predictions)`` through :data:`multi_exit_ce_op` or
    its twin (``call_op``); only the loss is differentiable."""
    return call_op(multi_exit_ce_op, MultiExitCEFunction.call, hiddens, weight, targets, token_weights, exit_weights,
                   ignore_index, with_stats, need_h, need_w, chunked)[:5]  # fmt: skip


def static_variants(shape, dtype: torch.dtype, arch: int) -> list:
    """The launches :mod:`lash_kernels.tools.aot_check` compiles on ``arch`` at ``shape``: the fused
    pair where :func:`fused_regime` sends the shape, else the row kernel of the chunked path."""
    if fused_regime(shape.hidden, dtype, arch_has_tensor_core_dots(arch)):
        return fused_variants(shape, dtype, arch)
    return row_variants(shape, dtype)
