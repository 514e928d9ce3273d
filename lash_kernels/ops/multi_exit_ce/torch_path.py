"""The CPU implementation of the op: the chunked driver of :mod:`.chunked` with a torch row pass."""

from __future__ import annotations

import torch

from lash_kernels.ops.multi_exit_ce.chunked import chunk_rows, chunked_multi_exit_ce, per_exit_means, token_scales


def torch_row_pass(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    g: torch.Tensor | None,
    with_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """CE, confidence and argmax of each row of fp32 ``logits`` (C, V); with ``g``, logits ← G.

    Args:
        logits: (C, V) fp32, overwritten (softmax numerators, then G).
        targets: (C,) int64, already 0 at ignored rows (gatherable).
        valid: (C,) bool, False at ignored rows.
        g: (C,) fp32 ``∂loss/∂CE`` per row, or None when no gradient is needed.
        with_stats: also return confidence and argmax.
    """
    row_max = logits.amax(dim=1)  # (C,)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)  # (C,)
    pred = logits.argmax(dim=1) if with_stats else None  # (C,) lowest index on ties, as torch.argmax
    total = logits.sub_(row_max[:, None]).exp_().sum(dim=1)  # (C,) Σ exp(z − max) ∈ [1, V]
    ce = torch.where(valid, row_max + total.log() - target_logit, 0.0)  # (C,) lse − z_y
    conf = total.reciprocal() if with_stats else None  # exp(max − lse) = 1 / Σ exp(z − max)
    if g is not None:
        logits.mul_((g / total)[:, None]).scatter_add_(1, targets[:, None], -g[:, None])  # G, in place
    return ce, conf, pred


class TorchMultiExitCE(torch.autograd.Function):
    """The chunked path with torch's row pass, in fp32: the CPU implementation of the op.

    Returns ``(loss, per_exit, token_loss, confidence, predictions)`` as the Triton op does; only ``loss``
    is differentiable, and its backward scales the gradients the forward formed.
    """

    @staticmethod
    def forward(ctx, hiddens, weight, targets, token_weights, exit_weights, ignore_index, with_stats, need_h, need_w):
        # Statistics and reductions in fp32, whatever autocast would pick for the matmuls.
        with torch.autocast(hiddens.device.type, enabled=False):
            g = token_scales(targets, exit_weights, ignore_index, token_weights)  # (K, N)
            loss, token_loss, conf, pred, grad_h, grad_w, _ = chunked_multi_exit_ce(  # fp32: dH at its size
                hiddens, weight, targets, g, ignore_index, with_stats, need_h, need_w,
                torch_row_pass, chunk_rows(weight.shape[0]), torch.float32,
            )  # fmt: skip
        per_exit = per_exit_means(token_loss, targets, ignore_index)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hiddens.dtype, weight.dtype
        ctx.mark_non_differentiable(per_exit, token_loss, conf, pred)
        return loss, per_exit, token_loss, conf, pred

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_exit, _grad_token_loss, _grad_conf, _grad_pred):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h_dtype, w_dtype = ctx.dtypes
        return (
            (grad_h * grad_loss).to(h_dtype) if need_h else None,
            (grad_w * grad_loss).to(w_dtype) if need_w else None,
        ) + (None,) * 7
