"""Configuration: LASH's three options (layer weights, per-layer learning rates, routing) and ASHEM.

Layers are numbered from 1 (the first transformer block) to ``num_layers`` (the last), as in
``layer_weights={1: 0.5, 3: 0.5}``. Each config validates its own fields on construction and
names the field, the value and the allowed range when one is wrong; what depends on the model's
depth is checked by :meth:`TrainingConfig.validate_for` when training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lash.exit_rule import ExitRule, routing_rule
from lash.validation import check_bool, check_exit_layer, check_int, check_layer_index, check_real


@dataclass
class TrainingConfig:
    """LASH's three options.

    Args:
        layer_weights: loss weight per layer; loss = Σ_l w_l · CE(head(h_l), y). Missing layers
            weigh 0; weights are used as given (not renormalised).
        layer_lr_scales: learning-rate multiplier per layer (missing layers: 1.0); ``None`` means
            one learning rate for everything.
        routing_threshold: early exit at evaluation and inference: a token whose confidence at
            ``exit_layer`` is >= this takes that layer's prediction (:mod:`lash.routing`'s rule).
            ``None`` turns routing off; so does 0, the original implementation's spelling of "off", which is
            stored as ``None`` (everywhere else 0 sends every token out early).
        exit_layer: the layer tokens may exit at; must be shallower than the output layer.
    """

    layer_weights: dict[int, float]
    layer_lr_scales: dict[int, float] | None = None
    routing_threshold: float | None = None
    exit_layer: int = 1
    _checked_depth: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.layer_weights, dict) or not self.layer_weights:
            raise ValueError(f"layer_weights={self.layer_weights!r} must be a non-empty dict {{layer: weight}}")
        for layer, weight in self.layer_weights.items():
            check_layer_index("layer_weights", layer)
            check_real(f"layer_weights[{layer}]", weight, 0.0)
        if not any(weight > 0 for weight in self.layer_weights.values()):
            raise ValueError(f"layer_weights={self.layer_weights}: at least one weight must be > 0")
        if self.layer_lr_scales is not None:
            if not isinstance(self.layer_lr_scales, dict):
                raise ValueError(f"layer_lr_scales={self.layer_lr_scales!r} must be a dict {{layer: scale}} or None")
            for layer, scale in self.layer_lr_scales.items():
                check_layer_index("layer_lr_scales", layer)
                check_real(f"layer_lr_scales[{layer}]", scale, 0.0, low_open=True)
        check_layer_index("exit_layer", self.exit_layer)
        rule = routing_rule(self.routing_threshold, self.exit_layer)  # 0 = off (README, "Compatibility")
        self.routing_threshold = None if rule is None else rule.threshold
        if rule is not None:
            check_exit_layer(self.exit_layer, self.output_layer)

    @property
    def exit_rule(self) -> ExitRule | None:
        """The early-exit rule evaluation applies (``None``: routing off)."""
        return routing_rule(self.routing_threshold, self.exit_layer)

    @property
    def has_routing(self) -> bool:
        """Whether evaluation routes confident tokens out at ``exit_layer``."""
        return self.exit_rule is not None

    @property
    def has_layer_lr(self) -> bool:
        """Whether layers train at different learning rates."""
        return self.layer_lr_scales is not None

    @property
    def active_layers(self) -> list[int]:
        """The layers with a positive loss weight, shallow to deep."""
        return sorted(layer for layer, weight in self.layer_weights.items() if weight > 0)

    @property
    def output_layer(self) -> int:
        """The deepest supervised layer: training never runs past it, inference answers from it."""
        return self.active_layers[-1]

    def as_dict(self) -> dict:
        """The four options as plain values (how checkpoints store the config)."""
        return {
            "layer_weights": dict(self.layer_weights),
            "layer_lr_scales": None if self.layer_lr_scales is None else dict(self.layer_lr_scales),
            "routing_threshold": self.routing_threshold or 0.0,  # files keep 0 = off, for compatibility (README)
            "exit_layer": self.exit_layer,
        }

    def weight(self, layer: int) -> float:
        return float(self.layer_weights.get(layer, 0.0))

    def lr_scale(self, layer: int) -> float:
        return 1.0 if self.layer_lr_scales is None else float(self.layer_lr_scales.get(layer, 1.0))

    def is_final_layer_only(self, num_layers: int) -> bool:
        """The fast path: only the model's last layer carries loss, so no intermediate head runs."""
        return self.active_layers == [num_layers]

    def validate_for(self, num_layers: int) -> None:
        """Check the layer indices against a model with ``num_layers`` layers.

        Raises:
            ValueError: a layer index outside [1, num_layers], or routing on with an
                ``exit_layer`` that is not shallower than the output layer.
        """
        if self._checked_depth == num_layers:
            return
        for layer in self.layer_weights:
            check_layer_index("layer_weights", layer, num_layers)
        for layer in self.layer_lr_scales or {}:
            check_layer_index("layer_lr_scales", layer, num_layers)
        if self.has_routing:
            check_exit_layer(self.exit_layer, self.output_layer)
        else:
            check_layer_index("exit_layer", self.exit_layer, num_layers)
        self._checked_depth = num_layers

    def describe(self) -> str:
        """A short human-readable summary of the three options."""
        weights = ", ".join(f"L{layer}={self.layer_weights[layer]:g}" for layer in sorted(self.layer_weights))
        lines = [f"layer_weights: {weights}"]
        if self.has_layer_lr:
            scales = ", ".join(f"L{layer}={self.layer_lr_scales[layer]:g}" for layer in sorted(self.layer_lr_scales))
            lines.append(f"layer_lr_scales: {scales}")
        else:
            lines.append("layer_lr_scales: off (one learning rate)")
        if self.has_routing:
            lines.append(f"routing: exit at layer {self.exit_layer} when confidence >= {self.routing_threshold:g}")
        else:
            lines.append("routing: off")
        return "\n".join(lines)


def create_standard_config(num_layers: int, **options) -> TrainingConfig:
    """A conventional LM: loss on the last layer only, e.g. ``{1: 0, 2: 0, 3: 1}``.

    ``options`` are passed on to :class:`TrainingConfig` (``layer_lr_scales``, routing, ...).
    """
    check_int("num_layers", num_layers, 1)
    weights = {layer: 0.0 for layer in range(1, num_layers)} | {num_layers: 1.0}
    return TrainingConfig(layer_weights=weights, **options)


def create_deep_supervision_config(num_layers: int, **options) -> TrainingConfig:
    """Deep supervision: every layer weighs ``1 / num_layers`` (0.33 each for 3 layers, as the original implementation does)."""
    check_int("num_layers", num_layers, 1)
    weights = {layer: 1.0 / num_layers for layer in range(1, num_layers + 1)}
    return TrainingConfig(layer_weights=weights, **options)


PROTOCOLS = ("held-out", "original")


@dataclass
class ASHEMConfig:
    """Adaptive Supervision via Hard Example Mining: a shallow model, then deeper layers on hard tokens.

    Args:
        phase1_layers: depth of the phase-1 model trained on all training data but the dev slice.
        phase1_lr: phase-1 learning rate.
        phase1_patience: early-stopping patience of phase 1 (epochs without improvement).
        hard_example_ratio: fraction of training tokens called hard (the confidence quantile).
        phase2_layers: depth of the phase-2 model (the phase-1 layers plus new ones).
        phase2_lr: phase-2 learning rate.
        phase2_patience: early-stopping patience of phase 2.
        phase1_max_epochs: epoch limit of phase 1.
        phase2_max_epochs: epoch limit of phase 2.
        freeze_embedding: keep the phase-1 embedding fixed in phase 2.
        freeze_lower_layers: keep the phase-1 layers fixed in phase 2.
        freeze_head: keep the shared head fixed in phase 2, so the exit layer answers exactly as
            the phase-1 model did. Off by default: training the head (it is shared, so the exit
            layer's answers move too) measured better hard-token and routing PPL (README).
        protocol: ``"held-out"`` mines hard tokens from the training data and reports validation
            numbers only; ``"original"`` repeats the original implementation's protocol (hard tokens mined from the
            validation set, phase 2 trained and measured on them as single-token sequences).
        dev_fraction: share of the training sequences held out as the dev slice that early
            stopping and model selection use in both phases (the validation split is only reported).
        phase2_easy_weight: loss weight of the easy tokens in phase 2, the hard ones weighing 1:
            0 trains on the hard tokens alone (ASHEM); 0.25 trains on every token with the hard
            ones up-weighted 4×.
        lower_lr_scale: learning-rate scale of the phase-1 layers in phase 2 when
            ``freeze_lower_layers`` is off (``layer_lr_scales``), e.g. 0.1 to let them move slowly.
    """

    phase1_layers: int = 2
    phase1_lr: float = 1e-3
    phase1_patience: int = 1
    hard_example_ratio: float = 0.5
    phase2_layers: int = 4
    phase2_lr: float = 1e-4
    phase2_patience: int = 3
    phase1_max_epochs: int = 50
    phase2_max_epochs: int = 50
    freeze_embedding: bool = True
    freeze_lower_layers: bool = True
    freeze_head: bool = False
    protocol: str = "held-out"
    dev_fraction: float = 0.1
    phase2_easy_weight: float = 0.0
    lower_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        check_int("phase1_layers", self.phase1_layers, 1)
        check_int("phase2_layers", self.phase2_layers, 1)
        if self.phase2_layers <= self.phase1_layers:
            raise ValueError(
                f"phase2_layers={self.phase2_layers} must be greater than phase1_layers={self.phase1_layers}"
            )
        check_real("phase1_lr", self.phase1_lr, 0.0, low_open=True)
        check_real("phase2_lr", self.phase2_lr, 0.0, low_open=True)
        check_int("phase1_patience", self.phase1_patience, 1)
        check_int("phase2_patience", self.phase2_patience, 1)
        check_int("phase1_max_epochs", self.phase1_max_epochs, 1)
        check_int("phase2_max_epochs", self.phase2_max_epochs, 1)
        for name in ("freeze_embedding", "freeze_lower_layers", "freeze_head"):
            check_bool(name, getattr(self, name))
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol={self.protocol!r} must be one of {', '.join(PROTOCOLS)}")
        check_real("hard_example_ratio", self.hard_example_ratio, 0.0, 1.0, low_open=True, high_open=True)
        check_real("dev_fraction", self.dev_fraction, 0.0, 0.5, low_open=True)
        check_real("phase2_easy_weight", self.phase2_easy_weight, 0.0, 1.0)
        check_real("lower_lr_scale", self.lower_lr_scale, 0.0, 1.0, low_open=True)
        if self.lower_lr_scale != 1.0 and self.freeze_lower_layers:
            raise ValueError(f"lower_lr_scale={self.lower_lr_scale} needs freeze_lower_layers=False (frozen layers do not learn)")
