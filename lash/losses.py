"""The one loss of LASH: weighted cross-entropy of several exits through the shared head.

Every training path (the last-layer fast path is the case of one exit) and every evaluation goes
through these two functions, so the loss is defined in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lash.models import check_token_ids

# Tokens per chunk in evaluation: bounds the [chunk, vocab] logits that exist at once.
_EVAL_CHUNK = 4096


def _flatten(hiddens: Sequence[torch.Tensor], targets: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    flat = [h.reshape(-1, h.shape[-1]) for h in hiddens]  # K × (N, D)
    targets = targets.reshape(-1)  # (N,)
    for h in flat:
        if h.shape[0] != targets.shape[0]:
            raise ValueError(f"hidden states hold {h.shape[0]} tokens but targets hold {targets.shape[0]}")
    return flat, targets


def multi_exit_loss(
    hiddens: Sequence[torch.Tensor],
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    weights: Sequence[float],
    ignore_index: int = -100,
) -> torch.Tensor:
    """Σ_k w_k · CE(h_k · Wᵀ, y), each CE a mean over the non-ignored tokens.

    Args:
        hiddens: K hidden states, each ``(B, T, D)`` or ``(N, D)``.
        head_weight: the shared head's weight ``(V, D)``.
        targets: next-token ids ``(B, T)`` or ``(N,)``; ``ignore_index`` marks tokens without loss.
        weights: K non-negative loss weights; an exit of weight 0 contributes nothing.
        ignore_index: target value excluded from the loss.

    Returns:
        The scalar weighted loss (0 if every token is ignored).
    """
    if len(hiddens) != len(weights):
        raise ValueError(f"{len(hiddens)} hidden states but {len(weights)} weights")
    flat, targets = _flatten(hiddens, targets)
    check_token_ids(targets, head_weight.shape[0], "target", ignore_index)
    total = head_weight.new_zeros((), dtype=torch.float32)
    for h, weight in zip(flat, weights):
        if weight > 0:
            ce = F.cross_entropy(F.linear(h, head_weight).float(), targets, ignore_index=ignore_index, reduction="sum")
            total = total + weight * ce
    return total / (targets != ignore_index).sum().clamp(min=1)


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
    ignore_index: int = -100,
) -> ExitStatistics:
    """Loss, confidence and prediction of every token at every exit, for evaluation and routing.

    Args:
        hiddens: K hidden states, each ``(B, T, D)`` or ``(N, D)``.
        head_weight: the shared head's weight ``(V, D)``.
        targets: next-token ids ``(B, T)`` or ``(N,)``.
        ignore_index: target value of tokens without a label.
    """
    flat, targets = _flatten(hiddens, targets)
    check_token_ids(targets, head_weight.shape[0], "target", ignore_index)
    K, N = len(flat), targets.shape[0]
    token_loss = torch.zeros(K, N, device=targets.device)
    confidence = torch.zeros(K, N, device=targets.device)
    predictions = torch.zeros(K, N, dtype=torch.long, device=targets.device)
    for k, h in enumerate(flat):
        for start in range(0, N, _EVAL_CHUNK):
            rows = slice(start, start + _EVAL_CHUNK)
            logits = F.linear(h[rows], head_weight).float()  # (chunk, V)
            token_loss[k, rows] = F.cross_entropy(logits, targets[rows], ignore_index=ignore_index, reduction="none")
            probs_max, predictions[k, rows] = F.softmax(logits, dim=-1).max(dim=-1)
            confidence[k, rows] = probs_max
    return ExitStatistics(token_loss, confidence, predictions, targets != ignore_index)
