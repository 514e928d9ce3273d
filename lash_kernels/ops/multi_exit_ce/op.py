"""The public multi-exit cross-entropy: the exits stacked, then the torch path or the Triton op.

:func:`multi_exit_cross_entropy` stacks the exits and sends them, with the exit and token
weights, to the torch path (:mod:`.torch_path`) or to the ``lash::multi_exit_ce`` op
(:mod:`.kernels`) in the regime :func:`~lash_kernels.ops.multi_exit_ce.regime.fused_regime`
picks.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import torch

from lash_kernels.dispatch import HAS_TRITON, backend, tensor_core_dots
from lash_kernels.ops.multi_exit_ce.reference import IGNORE_INDEX, MultiExitCEOutput, exit_weight_floats, validate_inputs
from lash_kernels.ops.multi_exit_ce.regime import fused_regime
from lash_kernels.ops.multi_exit_ce.torch_path import TorchMultiExitCE

if HAS_TRITON:  # optional off Linux: the torch path still works there
    from lash_kernels.ops.multi_exit_ce import kernels


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
    chunked = not fused_regime(hidden, dtype, tensor_core_dots(device))
    return functools.partial(kernels.multi_exit_ce_call, chunked=chunked)


def multi_exit_cross_entropy(
    hiddens: Sequence[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    exit_weights: Sequence[float],
    ignore_index: int = IGNORE_INDEX,
    return_stats: bool = False,
    validate: bool = True,
    token_weights: torch.Tensor | None = None,
) -> MultiExitCEOutput:
    """Weighted cross-entropy of K exits through one shared head, without ``[N, V]`` logits.

    Args:
        hiddens: K tensors ``[N, D]`` or one ``[K, N, D]`` tensor: the exits' hidden states,
            flattened over batch × time.
        weight: ``[V, D]`` shared output head (an ``nn.Linear`` weight without bias).
        targets: ``[N]`` targets of any integer dtype, in ``[0, V)`` or equal to ``ignore_index``.
        exit_weights: K static floats ≥ 0. Exits weighing 0 are evaluated (``per_exit``,
            statistics) but get no gradient and cost no gradient work.
        ignore_index: target value of tokens that carry no loss, an int.
        return_stats: also return per-token confidence, argmax and loss of every exit.
        validate: check shapes, weights and target values, without a host sync: target and
            token-weight values raise ValueError on the CPU and are checked with
            ``torch._assert_async`` on a GPU or under ``torch.compile`` (a RuntimeError at the
            next sync). Pass False when the caller already checked.
        token_weights: optional ``[N]`` floating-point weights ``t_n ≥ 0`` of the tokens' losses:
            each exit's CE becomes the weighted mean ``Σ_n t_n·CE_kn / Σ_valid t_n`` (0 when the
            labelled tokens weigh 0 in all); only their ratios count, whatever their scale (they
            are divided by the labelled tokens' largest weight first). ``None`` is the plain
            mean, as all-ones weights.

    Returns:
        ``MultiExitCEOutput(loss, per_exit, confidence, predictions, token_loss)``: ``loss`` ()
        fp32 ``Σ_k w_k · mean CE_k`` over non-ignored tokens (0 when all are ignored), each mean
        weighted by ``token_weights`` when given; ``per_exit`` (K,) fp32 detached, the unweighted
        mean CE of each exit whatever ``token_weights``; with ``return_stats``, ``confidence`` (K, N) fp32 max
        softmax probability, ``predictions`` (K, N) int64 argmax and ``token_loss`` (K, N) fp32
        detached per-token CE (0 at ignored tokens, never weighted), else None.

    Raises:
        ValueError: with ``validate``, a shape mismatch, tensors on two devices, no exits (K < 1)
            or K ≠ len(exit_weights), a negative or non-finite weight, an ``ignore_index`` that
            is not an int, ``token_weights`` not a floating-point ``[N]`` tensor, or (CPU
            tensors) a target outside ``[0, V)`` other than ``ignore_index`` or a token weight
            that is negative or not finite.
    """
    weights = exit_weight_floats(exit_weights)
    if validate:
        validate_inputs(hiddens, weight, targets, weights, ignore_index, token_weights)
    ignore_index = operator.index(ignore_index)  # a Python int for the op (NumPy integers too)
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
