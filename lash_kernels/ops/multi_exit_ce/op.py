"""The public multi-exit cross-entropy: dispatch, the ``lash::multi_exit_ce`` op and its autograd.

:func:`multi_exit_cross_entropy` stacks the exits, forms ``g`` (:func:`token_scales`) and sends
them to the torch path (:mod:`.torch_path`) or to the Triton op in the regime
:func:`~lash_kernels.ops.multi_exit_ce.fused.fused_regime` picks. The op is registered as
``torch.ops.lash.multi_exit_ce`` with ``torch.library.triton_op`` so ``torch.compile`` sees the
kernels; its backward only scales the gradients its forward formed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from lash_kernels.dispatch import HAS_TRITON, arch_has_tensor_core_dots, backend, tensor_core_dots
from lash_kernels.ops.multi_exit_ce.fused import fused_regime
from lash_kernels.ops.multi_exit_ce.reference import MultiExitCEOutput, validate_inputs
from lash_kernels.ops.multi_exit_ce.torch_path import TorchMultiExitCE

if HAS_TRITON:  # optional off Linux: the torch path still works there
    from torch.library import register_autograd, triton_op

    from lash_kernels.ops.multi_exit_ce.chunked import row_variants, run_chunked
    from lash_kernels.ops.multi_exit_ce.fused import fused_variants, run_fused

    @triton_op("lash::multi_exit_ce", mutates_args=())
    def _triton_op(
        hiddens: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        g: torch.Tensor,
        ignore_index: int,
        with_stats: bool,
        need_grad_hiddens: bool,
        need_grad_weight: bool,
        chunked: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, token_loss, confidence, predictions, grad_h, grad_w)``; see the two regimes."""
        run = run_chunked if chunked or hiddens.numel() == 0 else run_fused  # no tokens: no kernel to launch
        loss, token_loss, conf, pred, grad_h, grad_w = run(
            hiddens, weight, targets, g, ignore_index, with_stats, need_grad_hiddens, need_grad_weight
        )
        # Gradients in the input dtypes, formed now; the backward only scales them.
        return loss, token_loss, conf, pred, grad_h.to(hiddens.dtype), grad_w.to(weight.dtype)

    def _setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output[4], output[5])

    def _backward(ctx, grad_loss, *_):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (
            grad_h * grad_loss.to(grad_h.dtype) if need_h else None,
            grad_w * grad_loss.to(grad_w.dtype) if need_w else None,
        ) + (None,) * 7

    register_autograd(_triton_op, _backward, setup_context=_setup_context)

    def static_variants(shape, dtype: torch.dtype, arch: int) -> list:
        """The launches :mod:`lash_kernels.aot_check` compiles on ``arch`` at ``shape``: the fused
        pair where :func:`fused_regime` sends the shape, else the row kernel of the chunked path."""
        if fused_regime(shape.hidden, dtype, arch_has_tensor_core_dots(arch)):
            return fused_variants(shape, dtype, arch)
        return row_variants(shape, dtype)


def token_scales(
    targets: torch.Tensor,
    exit_weights: Sequence[float],
    ignore_index: int,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``g[k, n] = w_k · t_n / Σ_valid t`` at labelled tokens, 0 at ignored ones: ``∂loss/∂CE_kn``, fp32 (K, N).

    Without ``token_weights`` every ``t_n`` is 1, so ``g = w_k / |valid|``. Built on the device
    from Python floats and device tensors (no host-to-device copy, so no sync); the divisor is
    clamped (to 1 for the count, to fp32's smallest normal for weights) so that a batch with
    nothing to learn gives loss 0 rather than NaN.
    """
    valid = targets != ignore_index  # (N,)
    if token_weights is None:
        per_token = 1.0 / valid.sum().clamp(min=1).float()  # () on the device
    else:
        t = torch.where(valid, token_weights.float(), 0.0)  # (N,) weights of labelled tokens
        per_token = t / t.sum().clamp(min=torch.finfo(torch.float32).tiny)  # (N,)
    return torch.stack([torch.where(valid, w, 0.0) for w in exit_weights]) * per_token  # (K, N)


def _stack(hiddens: Sequence[torch.Tensor] | torch.Tensor, exits: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The ``[len(exits), N, D]`` contiguous hidden states of ``exits`` in ``dtype``."""
    if isinstance(hiddens, torch.Tensor) and exits == list(range(hiddens.shape[0])):
        picked = hiddens
    else:
        picked = torch.stack([hiddens[k] for k in exits])  # integer indexing: views, no index tensor
    return picked.to(dtype).contiguous()


def _per_token(device: torch.device, hidden: int, dtype: torch.dtype):
    """The implementation for inputs on ``device``: the torch path, or the Triton op in one regime."""
    if backend(device) == "torch":
        return TorchMultiExitCE.apply
    return functools.partial(_call_triton_op, chunked=not fused_regime(hidden, dtype, tensor_core_dots(device)))


def _call_triton_op(hiddens, weight, targets, g, ignore_index, with_stats, need_h, need_w, chunked):
    return _triton_op(hiddens, weight, targets, g, ignore_index, with_stats, need_h, need_w, chunked)[:4]


def multi_exit_cross_entropy(
    hiddens: Sequence[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    exit_weights: Sequence[float],
    ignore_index: int = -100,
    return_stats: bool = False,
    validate: bool = True,
    token_weights: torch.Tensor | None = None,
) -> MultiExitCEOutput:
    """Weighted cross-entropy of K exits through one shared head, without ``[N, V]`` logits.

    Args:
        hiddens: K tensors ``[N, D]`` or one ``[K, N, D]`` tensor: the exits' hidden states,
            flattened over batch × time.
        weight: ``[V, D]`` shared output head (an ``nn.Linear`` weight without bias).
        targets: ``[N]`` integer targets in ``[0, V)`` or equal to ``ignore_index``.
        exit_weights: K static floats ≥ 0. Exits weighing 0 are evaluated (``per_exit``,
            statistics) but get no gradient and cost no gradient work.
        ignore_index: target value of tokens that carry no loss.
        return_stats: also return per-token confidence, argmax and loss of every exit.
        validate: check shapes, weights and target values, without a host sync: target and
            token-weight values raise ValueError on the CPU and are checked with
            ``torch._assert_async`` on a GPU or under ``torch.compile`` (a RuntimeError at the
            next sync). Pass False when the caller already checked.
        token_weights: optional ``[N]`` floating-point weights ``t_n ≥ 0`` of the tokens' losses:
            each exit's CE becomes the weighted mean ``Σ_n t_n·CE_kn / Σ_valid t_n`` (0 when the
            labelled tokens weigh 0 in all). ``None`` is the plain mean, as all-ones weights.

    Returns:
        ``MultiExitCEOutput(loss, per_exit, confidence, predictions, token_loss)``: ``loss`` ()
        fp32 ``Σ_k w_k · mean CE_k`` over non-ignored tokens (0 when all are ignored), each mean
        weighted by ``token_weights`` when given; ``per_exit`` (K,) fp32 detached, the unweighted
        mean CE of each exit whatever ``token_weights``; with ``return_stats``, ``confidence`` (K, N) fp32 max
        softmax probability, ``predictions`` (K, N) int64 argmax and ``token_loss`` (K, N) fp32
        detached per-token CE (0 at ignored tokens, never weighted), else None.

    Raises:
        ValueError: with ``validate``, a shape mismatch, K ≠ len(exit_weights), a negative or
            non-finite weight, ``token_weights`` not a floating-point ``[N]`` tensor, or (CPU
            tensors) a target outside ``[0, V)`` other than ``ignore_index`` or a token weight
            that is negative or not finite.
    """
    weights = [float(w) for w in exit_weights]
    if validate:
        validate_inputs(hiddens, weight, targets, weights, ignore_index, token_weights)
    device = weight.device
    # Like nn.Linear: the autocast dtype when autocast is on, else the common input dtype.
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = torch.promote_types(hiddens[0].dtype, weight.dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.float32
    head = weight.to(dtype).contiguous()
    targets = targets.long().contiguous()
    per_token = _per_token(device, head.shape[1], dtype)

    K = len(weights)
    grad_on = torch.is_grad_enabled()
    needs_grad = grad_on and (weight.requires_grad or any(h.requires_grad for h in hiddens))
    trained = [k for k in range(K) if weights[k] > 0] if needs_grad else list(range(K))
    trained = trained or list(range(K))  # all weights 0: keep the loss differentiable
    frozen = [k for k in range(K) if k not in trained]
    stacked = _stack(hiddens, trained, dtype)
    g = token_scales(targets, [weights[k] for k in trained], ignore_index, token_weights)  # (K', N) on the device
    need_h, need_w = grad_on and stacked.requires_grad, grad_on and head.requires_grad
    loss, *outputs = per_token(stacked, head, targets, g, ignore_index, return_stats, need_h, need_w)
    if frozen:
        # Weight-0 exits go through the op without gradients: no gradient work is done for them.
        with torch.no_grad():
            _, *frozen_outputs = per_token(
                _stack(hiddens, frozen, dtype), head, targets, token_scales(targets, [0.0] * len(frozen), ignore_index),
                ignore_index, return_stats, False, False,
            )  # fmt: skip
        order = trained + frozen  # rows of the two calls' outputs, back to exit order below
        outputs = [
            torch.stack([(*a, *b)[order.index(k)] for k in range(K)]) if a.dim() == 2 else a
            for a, b in zip(outputs, frozen_outputs)
        ]
    token_loss, confidence, predictions = outputs  # (K, N) each
    per_exit = token_loss.sum(dim=1) / (targets != ignore_index).sum().clamp(min=1)  # (K,)
    stats = (confidence, predictions, token_loss.detach()) if return_stats else (None,) * 3
    return MultiExitCEOutput(loss, per_exit.detach(), *stats)
