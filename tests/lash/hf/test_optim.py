"""lash.hf.optim: layer_lr_scales as param groups of a Hugging Face causal LM."""

import pytest
import torch

pytest.importorskip("transformers")

from lash.config import TrainingConfig  # noqa: E402
from lash.hf import layer_param_groups  # noqa: E402
from tests.lash.hf.tiny import tiny_model  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_every_layer_gets_its_scaled_rate_and_every_parameter_one_group(family):
    model = tiny_model(family)
    config = TrainingConfig({3: 1.0}, layer_lr_scales={1: 0.5, 3: 2.0})
    groups = layer_param_groups(model, config, base_lr=1e-3, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["layer_1", "layer_2", "layer_3", "rest"]
    assert [g["lr"] for g in groups] == pytest.approx([5e-4, 1e-3, 2e-3, 1e-3])
    assert all(g["weight_decay"] == 0.1 for g in groups)
    for layer, group in enumerate(groups[:3]):
        assert {id(p) for p in group["params"]} == {id(p) for p in model.model.layers[layer].parameters()}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each once, tied weights included
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4, 1e-3, 2e-3, 1e-3])


def test_without_scales_every_group_runs_at_the_base_rate():
    groups = layer_param_groups(tiny_model("qwen3"), TrainingConfig({3: 1.0}), base_lr=3e-4)
    assert [g["lr"] for g in groups] == pytest.approx([3e-4] * 4)


def test_bad_rates_and_layers_are_refused():
    with pytest.raises(ValueError, match="base_lr"):
        layer_param_groups(tiny_model("llama"), TrainingConfig({3: 1.0}), base_lr=0.0)
    with pytest.raises(ValueError, match="layer_lr_scales"):
        layer_param_groups(tiny_model("llama"), TrainingConfig({3: 1.0}, layer_lr_scales={5: 2.0}), base_lr=1e-3)
