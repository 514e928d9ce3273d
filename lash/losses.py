"""The one loss of LASH: weighted cross-entropy of several exits through the shared head.

Every training path (the last-layer fast path is the case of one exit) and every evaluation goes
through these two functions, which run :func:`lash_kernels.multi_exit_cross_entropy`: fused
Triton kernels on CUDA, a chunked torch path elsewhere, neither ever holding ``[tokens, vocab]``
logits for a whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lash_kernels import IGNORE_INDEX, multi_exit_cross_entropy


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """Max softmax probability of logits already computed: ``(..., V)`` → ``(...)`` fp32.

    Where no logits are needed, :func:`head_confidence` gives it fused.
    """
    return F.softmax(logits.float(), dim=-1).amax(dim=-1)


def _flatten(hiddens: Sequence[torch.Tensor], targets: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [h.reshape(-1, h.shape[-1]) for h in hiddens], targets.reshape(-1)  # K × (N, D), (N,)


def multi_exit_loss(
    hiddens: Sequence[torch.Tensor],
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    weights: Sequence[float],
    ignore_index: int = IGNORE_INDEX,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_k w_k · CE(h_k · Wᵀ, y), each CE a mean over the non-ignored tokens.

    Args:
        hiddens: K hidden states, each ``(B, T, D)`` or ``(N, D)``.
        head_weight: the shared head's weight ``(V, D)``.
        targets: next-token ids ``(B, T)`` or ``(N,)``; ``ignore_index`` marks tokens without loss.
        weights: K non-negative loss weights; an exit of weight 0 gets no gradient.
        ignore_index: target value excluded from the loss.
        token_weights: optional per-token loss weights ``≥ 0``, shaped like ``targets``: each CE
            becomes the mean over the non-ignored tokens weighted by them.

    Returns:
        The scalar weighted loss (0 if every token is ignored or weighs 0).

    Raises:
        ValueError: shapes that disagree, a bad weight, a target outside ``[0, V)``, or (CPU
            tensors) a negative or non-finite token weight.
    """
    flat, flat_targets = _flatten(hiddens, targets)
    if token_weights is not None:
        if token_weights.shape != targets.shape:
            raise ValueError(f"token_weights must have the targets' shape {tuple(targets.shape)}; got {tuple(token_weights.shape)}")
        token_weights = token_weights.reshape(-1)  # (N,)
    return multi_exit_cross_entropy(flat, head_weight, flat_targets, weights, ignore_index, token_weights=token_weights).loss


class ExitStatistics(NamedTuple):
    """Per-token results of K exits; ignored tokens carry loss 0."""

    token_loss: torch.Tensor  # (K, N) fp32 cross-entropy
    confidence: torch.Tensor  # (K, N) fp32 max softmax probability
    predictions: torch.Tensor  # (K, N) int64 argmax
    valid: torch.Tensor  # (N,) bool, targets != ignore_index


@torch.no_grad()
def exit_statistics(
    hiddens: Sequence[torch.Tensor],
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> ExitStatistics:
    """Loss, confidence and prediction of every token at every exit, for evaluation and routing.

    Args:
        hiddens: K hidden states, each ``(B, T, D)`` or ``(N, D)``.
        head_weight: the shared head's weight ``(V, D)``.
        targets: next-token ids ``(B, T)`` or ``(N,)``.
        ignore_index: target value of tokens without a label.
    """
    flat, targets = _flatten(hiddens, targets)
    out = multi_exit_cross_entropy(flat, head_weight, targets, [1.0] * len(flat), ignore_index, return_stats=True)
    return ExitStatistics(out.token_loss, out.confidence, out.predictions, targets != ignore_index)


@torch.no_grad()
def head_confidence(h: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """Max softmax probability of the shared head at hidden states ``(..., D)`` → ``(...)`` fp32,
    from the fused statistics: no ``[tokens, vocab]`` logits, the numbers evaluation uses."""
    unlabelled = torch.full(h.shape[:-1], IGNORE_INDEX, dtype=torch.long, device=h.device)
    return exit_statistics([h], head_weight, unlabelled).confidence[0].view(h.shape[:-1])
