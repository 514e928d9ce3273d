"""The early-exit rule as one value: built, checked, and taken by every routing entry point."""

import pytest
import torch

from lash import DeepSupervisionTransformer, TrainingConfig
from lash.exit_rule import ExitRule, as_rule, routing_rule
from lash.generation import generate
from lash.routing import early_exit_forward, forward_inference


def test_a_rule_exits_at_or_above_its_threshold():
    rule = ExitRule(0.5, 2)
    assert rule.exits(torch.tensor([0.2, 0.5, 0.9])).tolist() == [False, True, True]
    assert ExitRule(0, 1).exits(torch.tensor([0.0])).item()  # a rule of 0: every token exits


@pytest.mark.parametrize(
    "threshold, exit_layer, message",
    [(1.5, 1, r"routing_threshold=1.5 is outside \[0.0, 1.0\]"), (None, 1, "use None for no rule"),
     (0.5, 0, "exit_layer: layer index 0"), (float("nan"), 1, "routing_threshold=nan")],
)  # fmt: skip
def test_a_bad_rule_names_the_field(threshold, exit_layer, message):
    with pytest.raises(ValueError, match=message):
        ExitRule(threshold, exit_layer)


def test_the_original_spelling_of_off_is_read_in_one_place():
    assert routing_rule(None, 2) is None and routing_rule(0, 2) is None and routing_rule(0.0, 2) is None
    assert routing_rule(0.7, 2) == ExitRule(0.7, 2)
    assert TrainingConfig({1: 1.0}, routing_threshold=0).exit_rule is None
    assert TrainingConfig({2: 1.0}, routing_threshold=0.9, exit_layer=1).exit_rule == ExitRule(0.9, 1)
    model = DeepSupervisionTransformer(32, 16, 3, 2, exit_layer=2, routing_threshold=0.6)
    assert model.exit_rule == ExitRule(0.6, 2)


def test_bare_thresholds_become_rules_checked_against_the_model():
    assert as_rule(None, 1, 3) is None and as_rule(0.0, 2, 3) == ExitRule(0.0, 2)
    assert as_rule(ExitRule(0.4, 1), 2, 3) == ExitRule(0.4, 1)  # a rule keeps its own layer
    with pytest.raises(ValueError, match=r"exit_layer=3 is outside \[1, 2\]"):
        as_rule(ExitRule(0.4, 3), 1, 3)


def test_every_entry_point_takes_a_rule_as_its_threshold_and_layer():
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(32, 16, 3, 2, max_seq_len=32).eval()
    x = torch.randint(0, 32, (2, 9))
    rule = ExitRule(0.05, 2)
    for route in (forward_inference, early_exit_forward):
        by_rule, by_pair = route(model, x, rule), route(model, x, 0.05, 2)
        torch.testing.assert_close(by_rule[0], by_pair[0])
        assert by_rule[1] == by_pair[1]
    out, stats = generate(model, x[:, :4], 5, routing_threshold=rule, return_stats=True)
    same, same_stats = generate(model, x[:, :4], 5, routing_threshold=0.05, exit_layer=2, return_stats=True)
    assert torch.equal(out, same) and stats == same_stats
