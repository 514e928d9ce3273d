import pytest
import torch

from lash import DeepSupervisionTransformer, Trainer, TrainingConfig
from lash.evaluation import evaluate, perplexity

V = 41


def batches(n=3, B=3, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, V, (B, T + 1), generator=g) for _ in range(n)]
    return [(seq[:, :-1], seq[:, 1:]) for seq in seqs]


def test_the_free_function_is_what_the_trainer_reports():
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(V, dim=16, num_layers=3, num_heads=2)
    config = TrainingConfig(layer_weights={1: 0.5, 3: 0.5}, routing_threshold=0.05, exit_layer=1)
    data = batches()
    assert evaluate(model, data, config, torch.device("cpu")) == Trainer(config, V, progress=False).evaluate(model, data)


def test_threshold_zero_sends_every_token_out_and_none_keeps_them():
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(V, dim=16, num_layers=3, num_heads=2)
    data, cpu = batches(), torch.device("cpu")
    off = evaluate(model, data, TrainingConfig(layer_weights={1: 0.5, 3: 0.5}), cpu)
    assert off["shallow_ratio"] == 0.0 and off["compute_cost"] == 1.0 and off["loss"] == off["per_layer"][3]["loss"]
    everything = TrainingConfig(layer_weights={1: 0.5, 3: 0.5}, routing_threshold=1e-30, exit_layer=1)
    out = evaluate(model, data, everything, cpu)
    assert out["shallow_ratio"] == 1.0 and out["compute_cost"] == pytest.approx(1 / 3)
    assert out["loss"] == pytest.approx(out["per_layer"][1]["loss"])


def test_no_labelled_token_is_an_error_and_ppl_does_not_overflow():
    model = DeepSupervisionTransformer(V, dim=16, num_layers=2, num_heads=2)
    x = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="no token with a label"):
        evaluate(model, [(x, torch.full_like(x, -100))], TrainingConfig(layer_weights={2: 1}), torch.device("cpu"))
    assert perplexity(1000.0) == float("inf")
