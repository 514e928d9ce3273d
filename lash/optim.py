"""Optimiser pieces: one AdamW param group per layer, the warm-up + cosine schedule, and both together."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lash.config import TrainingConfig
from lash.models import StandardTransformer
from lash.validation import check_real


def layer_param_groups(model: StandardTransformer, config: TrainingConfig, base_lr: float) -> list[dict]:
    """Param groups ``layer_1`` … ``layer_L`` at ``base_lr * layer_lr_scales[l]`` and ``embedding_head``.

    Every parameter of the model lands in exactly one group; the embedding, the shared head and
    anything else outside the layers train at ``base_lr``.
    """
    return groups_by_layer(model, model.layers, config, base_lr, "embedding_head")


def groups_by_layer(model: nn.Module, layers: Iterable[nn.Module], config: TrainingConfig, base_lr: float, rest: str) -> list[dict]:
    """One param group per block of ``layers`` (``layer_1`` …) at its scaled rate, then ``rest`` at ``base_lr``."""
    groups, in_layers = [], set()
    for layer, block in enumerate(layers, start=1):
        params = list(block.parameters())
        in_layers.update(id(p) for p in params)
        scale = config.lr_scale(layer)
        groups.append({"params": params, "lr": base_lr * scale, "lr_scale": scale, "name": f"layer_{layer}"})
    others = [p for p in model.parameters() if id(p) not in in_layers]
    groups.append({"params": others, "lr": base_lr, "lr_scale": 1.0, "name": rest})
    return groups


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int | None, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``total_steps``.

    Each group keeps its own base rate (so per-layer scales survive); without ``total_steps``
    the rate stays at its peak after the warm-up.
    """
    if warmup_steps < 0 or (total_steps is not None and total_steps < 1) or not 0 <= min_lr_ratio <= 1:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be >= 0, total_steps={total_steps} None or >= 1, "
            f"min_lr_ratio={min_lr_ratio} in [0, 1]"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if total_steps is None or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def create_optimizer(
    model: StandardTransformer,
    config: TrainingConfig,
    base_lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.1,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR | None]:
    """AdamW over :func:`layer_param_groups`, and its :func:`warmup_cosine` schedule. On CUDA the
    step is the fused AdamW: a few kernels for every parameter, not a dozen per parameter group.

    Returns:
        The optimizer, and the schedule (``None`` when neither ``warmup_steps`` nor
        ``total_steps`` is set: every group keeps its rate).
    """
    check_real("base_lr", base_lr, 0.0, low_open=True)
    check_real("weight_decay", weight_decay, 0.0)
    fused = all(p.is_cuda for p in model.parameters()) or None
    optimizer = torch.optim.AdamW(layer_param_groups(model, config, base_lr), lr=base_lr, weight_decay=weight_decay, fused=fused)
    schedule = warmup_cosine(optimizer, warmup_steps, total_steps, min_lr_ratio) if warmup_steps or total_steps else None
    return optimizer, schedule
