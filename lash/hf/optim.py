"""Per-layer learning rates for a Hugging Face causal LM: LASH's ``layer_lr_scales`` as param groups."""

from __future__ import annotations

from torch import nn

from lash.config import TrainingConfig
from lash.hf.structure import decoder_parts
from lash.optim import groups_by_layer
from lash.validation import check_real


def layer_param_groups(model: nn.Module, config: TrainingConfig, base_lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Param groups ``layer_1`` … ``layer_L`` at ``base_lr · lr_scale(l)`` and ``rest`` at ``base_lr``.

    Layer l is the model's decoder layer ``l - 1`` (LASH's numbering). Every parameter lands in
    exactly one group; tied embeddings and head are one parameter, in ``rest``. The groups go
    straight to ``torch.optim.AdamW`` (or any optimizer taking ``lr`` and ``weight_decay`` per group).

    Raises:
        ValueError: a model :func:`~lash.hf.structure.decoder_parts` refuses, a config that does
            not fit its depth, ``base_lr <= 0`` or ``weight_decay < 0``.
    """
    check_real("base_lr", base_lr, 0.0, low_open=True)
    check_real("weight_decay", weight_decay, 0.0)
    layers = decoder_parts(model).layers
    config.validate_for(len(layers))
    groups = groups_by_layer(model, layers, config, base_lr, "rest")
    for group in groups:
        group["weight_decay"] = weight_decay
    return groups
