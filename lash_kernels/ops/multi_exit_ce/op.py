"""The public multi-exit cross-entropy: dispatch, the ``lash::multi_exit_ce`` op and its autograd.

:func:`multi_exit_cross_entropy` stacks the exits and sends them, with the exit and token
weights, to the torch path (:mod:`.torch_path`) or to the Triton op in the regime
:func:`~lash_kernels.ops.multi_exit_ce.fused.fused_regime` picks. The op is registered as
``torch.ops.lash.multi_exit_ce`` with ``torch.library.triton_op`` so ``torch.compile`` sees the
kernels, with a twin ``autograd.Function`` for eager calls (:func:`lash_kernels._launch.call_op`);
the backward only scales the gradients the forward formed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from lash_kernels._launch import call_op, twin_function
from lash_kernels.dispatch import HAS_TRITON, arch_has_tensor_core_dots, backend, tensor_core_dots
from lash_kernels.ops.multi_exit_ce.fused import fused_regime
from lash_kernels.ops.multi_exit_ce.reference import MultiExitCEOutput, validate_inputs
from lash_kernels.ops.multi_exit_ce.torch_path import TorchMultiExitCE

if HAS_TRITON:  # optional off Linux: the torch path still works there
    from torch.library import register_autograd, triton_op

    from lash_kernels.ops.multi_exit_ce.chunked import row_variants, run_chunked
    from lash_kernels.ops.multi_exit_ce.fused import fused_variants, run_fused

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, per_exit, token_loss, confidence, predictions, grad_h, grad_w)``; see the two regimes."""
        run = run_chunked if chunked or hiddens.numel() == 0 else run_fused  # no tokens: no kernel to launch
        loss, per_exit, token_loss, conf, pred, grad_h, grad_w = run(
            hiddens, weight, targets, token_weights, exit_weights, ignore_index, with_stats, need_grad_hiddens,
            need_grad_weight,
        )  # fmt: skip
        # Gradients in the input dtypes, formed now; the backward only scales them.
        return loss, per_exit, token_loss, conf, pred, grad_h.to(hiddens.dtype), grad_w.to(weight.dtype)

    def _setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output[5], output[6])
        # Only the loss is differentiable: no zero-filled gradients for the other six outputs.
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_loss, *_):
        grads = [g if need else None for g, need in zip(ctx.saved_tensors, ctx.needs_input_grad[:2])]
        wanted = [g for g in grads if g is not None]
        if len({g.dtype for g in wanted}) == 1:  # one launch scales both
            scaled = iter(torch._foreach_mul(wanted, grad_loss.to(wanted[0].dtype)))
        else:
            scaled = iter(g * grad_loss.to(g.dtype) for g in wanted)
        return tuple(next(scaled) if g is not None else None for g in grads) + (None,) * 8

    # The op and its twin function (lash_kernels._launch.call_op picks one per call).
    _triton_op = triton_op("lash::multi_exit_ce", mutates_args=())(_multi_exit_ce)
    register_autograd(_triton_op, _backward, setup_context=_setup_context)
    _TwinFunction = twin_function(_multi_exit_ce, _setup_context, _backward)

    def static_variants(shape, dtype: torch.dtype, arch: int) -> list:
        """The launches :mod:`lash_kernels.aot_check` compiles on ``arch`` at ``shape``: the fused
        pair where :func:`fused_regime` sends the shape, else the row kernel of the chunked path."""
        if fused_regime(shape.hidden, dtype, arch_has_tensor_core_dots(arch)):
            return fused_variants(shape, dtype, arch)
        return row_variants(shape, dtype)


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


def _call_triton_op(hiddens, weight, targets, token_weights, exit_weights, ignore_index, with_stats, need_h, need_w,
                    chunked):  # fmt: skip
    return call_op(_triton_op, _TwinFunction.apply, hiddens, weight, targets, token_weights, exit_weights, ignore_index,
                   with_stats, need_h, need_w, chunked)[:5]  # fmt: skip


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
        dtype = weight.dtype if hiddens[0].dtype == weight.dtype else torch.promote_types(hiddens[0].dtype, weight.dtype)
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
    need_h, need_w = grad_on and stacked.requires_grad, grad_on and head.requires_grad
    loss, *outputs = per_token(stacked, head, targets, token_weights, [weights[k] for k in trained], ignore_index,
                               return_stats, need_h, need_w)  # fmt: skip
    if frozen:
        # Weight-0 exits go through the op without gradients: no gradient work is done for them.
        with torch.no_grad():
            _, *frozen_outputs = per_token(
                _stack(hiddens, frozen, dtype), head, targets, token_weights, [0.0] * len(frozen), ignore_index,
                return_stats, False, False,
            )  # fmt: skip
        order = trained + frozen  # rows of the two calls' outputs, back to exit order below
        outputs = [
            torch.stack([(*a, *b)[order.index(k)] for k in range(K)]) if a.shape[0] == len(trained) else a
            for a, b in zip(outputs, frozen_outputs)
        ]
    per_exit, token_loss, confidence, predictions = outputs  # (K,), then (K, N) each
    stats = (confidence, predictions, token_loss.detach()) if return_stats else (None,) * 3
    return MultiExitCEOutput(loss, per_exit.detach(), *stats)
