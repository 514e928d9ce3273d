"""The early-exit rule as one value: the layer tokens may leave at and how sure they must be.

A token exits when its confidence at ``exit_layer`` (the shared head's max softmax probability
there) is ``>= threshold``: a threshold of 0 sends every token out, 1 only fully confident
ones. ``None`` in place of a rule means routing is off, everywhere. The original API spells
"off" as ``routing_threshold=0`` in :class:`lash.TrainingConfig` and the model's constructor;
:func:`routing_rule` is the one place that reads that spelling (README, "Compatibility").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lash.validation import check_exit_layer, check_layer_index, check_threshold


@dataclass(frozen=True)
class ExitRule:
    """Exit at ``exit_layer`` (1-based) when the confidence there is ``>= threshold`` (in [0, 1])."""

    threshold: float
    exit_layer: int

    def __post_init__(self) -> None:
        if check_threshold(self.threshold) is None:
            raise ValueError("an ExitRule needs a threshold in [0, 1]; use None for no rule (routing off)")
        check_layer_index("exit_layer", self.exit_layer)
        object.__setattr__(self, "threshold", float(self.threshold))

    def exits(self, confidence: torch.Tensor) -> torch.Tensor:
        """Which tokens exit: ``confidence >= threshold``, elementwise."""
        return confidence >= self.threshold

    def check_for(self, num_layers: int) -> ExitRule:
        """This rule, after checking that its exit layer is shallower than layer ``num_layers``."""
        check_exit_layer(self.exit_layer, num_layers)
        return self


def routing_rule(routing_threshold: float | None, exit_layer: int) -> ExitRule | None:
    """The rule of the original API's pair: ``None`` or 0 is "routing off" (``None``)."""
    threshold = check_threshold(routing_threshold)
    return ExitRule(threshold, exit_layer) if threshold else None


def as_rule(rule: ExitRule | float | None, exit_layer: int, num_layers: int) -> ExitRule | None:
    """A rule from what the routing functions accept, checked against a ``num_layers`` model: an
    :class:`ExitRule`, ``None`` (off), or a bare threshold (0: every token exits) at ``exit_layer``."""
    if rule is None:
        return None
    if isinstance(rule, ExitRule):
        return rule.check_for(num_layers)
    return ExitRule(check_threshold(rule), check_exit_layer(exit_layer, num_layers))
