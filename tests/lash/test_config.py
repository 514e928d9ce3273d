import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lash import ASHEMConfig, TrainingConfig, create_deep_supervision_config, create_standard_config
from tests.lash.strategies import FAST, NUMBER, ODD


def test_presets_match_the_seed():
    assert create_standard_config(num_layers=3).layer_weights == {1: 0, 2: 0, 3: 1}
    deep = create_deep_supervision_config(num_layers=3)
    assert deep.layer_weights.keys() == {1, 2, 3}
    assert all(w == pytest.approx(0.33, abs=0.004) for w in deep.layer_weights.values())
    assert sum(deep.layer_weights.values()) == pytest.approx(1.0)
    routed = create_standard_config(6, routing_threshold=0.9, exit_layer=2)
    assert routed.has_routing and routed.exit_layer == 2


def test_properties_and_describe():
    config = TrainingConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3}, layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1}, routing_threshold=0.95)
    assert config.active_layers == [1, 3]
    assert config.output_layer == 3
    assert config.has_routing and config.has_layer_lr
    assert not config.is_final_layer_only(3)
    assert config.weight(2) == 0 and config.weight(5) == 0
    assert config.lr_scale(2) == 0.5
    text = config.describe()
    assert "L1=0.7" in text and "L3=0.1" in text and "0.95" in text
    plain = TrainingConfig(layer_weights={3: 1})
    assert not plain.has_routing and not plain.has_layer_lr
    assert plain.is_final_layer_only(3) and not plain.is_final_layer_only(4)
    assert plain.lr_scale(2) == 1.0
    assert "routing: off" in plain.describe()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layer_weights": {}}, "layer_weights"),
        ({"layer_weights": [1.0]}, "layer_weights"),
        ({"layer_weights": {0: 1.0}}, r"layer index 0 is outside \[1, num_layers\]"),
        ({"layer_weights": {-2: 1.0}}, "layer index -2"),
        ({"layer_weights": {1.5: 1.0}}, "layer index 1.5"),
        ({"layer_weights": {1: -0.1, 2: 1}}, r"layer_weights\[1\]=-0.1 is outside \[0.0, inf\)"),
        ({"layer_weights": {1: math.nan}}, r"layer_weights\[1\]=nan must be a finite number"),
        ({"layer_weights": {1: math.inf}}, "finite"),
        ({"layer_weights": {1: 0, 2: 0.0}}, "at least one weight must be > 0"),
        ({"layer_weights": {1: 1}, "layer_lr_scales": {1: 0.0}}, r"layer_lr_scales\[1\]=0.0 is outside \(0.0, inf\)"),
        ({"layer_weights": {1: 1}, "layer_lr_scales": {0: 1.0}}, "layer_lr_scales: layer index 0"),
        ({"layer_weights": {1: 1}, "routing_threshold": 1.5}, r"routing_threshold=1.5 is outside \[0.0, 1.0\]"),
        ({"layer_weights": {1: 1}, "routing_threshold": -0.1}, "routing_threshold=-0.1"),
        ({"layer_weights": {1: 1}, "exit_layer": 0}, "exit_layer: layer index 0"),
    ],
)
def test_invalid_fields_name_field_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**kwargs)


def test_depth_checks():
    with pytest.raises(ValueError, match=r"layer index 4 is outside \[1, 3\]"):
        TrainingConfig(layer_weights={4: 1}).validate_for(3)
    with pytest.raises(ValueError, match=r"layer_lr_scales: layer index 5 is outside \[1, 3\]"):
        TrainingConfig(layer_weights={3: 1}, layer_lr_scales={5: 1.0}).validate_for(3)
    with pytest.raises(ValueError, match=r"exit_layer=3 is outside \[1, 2\] \(a layer shallower than layer 3\)"):
        TrainingConfig(layer_weights={3: 1}, routing_threshold=0.5, exit_layer=3).validate_for(3)
    with pytest.raises(ValueError, match="exit_layer: layer index 5"):
        TrainingConfig(layer_weights={3: 1}, exit_layer=5).validate_for(3)
    TrainingConfig(layer_weights={3: 1}, routing_threshold=0.5, exit_layer=2).validate_for(3)
    with pytest.raises(ValueError, match="num_layers=0"):
        create_standard_config(0)


def test_ashem_config_defaults_and_validation():
    config = ASHEMConfig()
    assert (config.phase1_layers, config.phase2_layers, config.hard_example_ratio) == (2, 4, 0.5)
    assert (config.phase1_lr, config.phase2_lr, config.phase1_patience, config.phase2_patience) == (1e-3, 1e-4, 1, 3)
    with pytest.raises(ValueError, match="phase2_layers=2 must be greater than phase1_layers=2"):
        ASHEMConfig(phase2_layers=2)
    with pytest.raises(ValueError, match=r"hard_example_ratio=1.0 is outside \(0.0, 1.0\)"):
        ASHEMConfig(hard_example_ratio=1.0)
    with pytest.raises(ValueError, match="hard_example_ratio=0"):
        ASHEMConfig(hard_example_ratio=0)
    with pytest.raises(ValueError, match="phase1_lr"):
        ASHEMConfig(phase1_lr=-1e-3)
    with pytest.raises(ValueError, match="phase2_patience=0 must be an int >= 1"):
        ASHEMConfig(phase2_patience=0)


@pytest.mark.parametrize("field", ["freeze_embedding", "freeze_lower_layers", "freeze_head"])
def test_ashem_flags_must_be_booleans(field):
    with pytest.raises(ValueError, match=f"{field}='no' must be True or False"):
        ASHEMConfig(**{field: "no"})


@FAST
@given(
    weights=st.dictionaries(st.one_of(st.integers(-1, 5), st.booleans(), st.text(max_size=1)), NUMBER, max_size=4),
    scales=st.one_of(st.none(), st.dictionaries(st.integers(-1, 5), NUMBER, max_size=3)),
    threshold=st.one_of(NUMBER, ODD),
    exit_layer=ODD,
)
def test_training_config_is_valid_or_a_value_error(weights, scales, threshold, exit_layer):
    try:
        config = TrainingConfig(weights, scales, threshold, exit_layer)
    except ValueError as error:
        assert "\n" not in str(error)
        return
    assert config.active_layers and all(w >= 0 and math.isfinite(w) for w in config.layer_weights.values())
    assert 0 <= config.routing_threshold <= 1 and config.output_layer >= 1
    try:
        config.validate_for(4)
    except ValueError:
        return
    assert all(1 <= layer <= 4 for layer in config.layer_weights)


@FAST
@given(
    layers=st.tuples(ODD, ODD),
    lrs=st.tuples(NUMBER, NUMBER),
    ratio=NUMBER,
    flags=st.tuples(ODD, ODD, ODD),
    protocol=st.sampled_from(["held-out", "original", "reference", "other", 3]),
)
def test_ashem_config_is_valid_or_a_value_error(layers, lrs, ratio, flags, protocol):
    try:
        config = ASHEMConfig(layers[0], lrs[0], 1, ratio, layers[1], lrs[1], 1, 1, 1, *flags, protocol)
    except ValueError:
        return
    assert 1 <= config.phase1_layers < config.phase2_layers and 0 < config.hard_example_ratio < 1
    assert all(isinstance(flag, bool) for flag in flags)
