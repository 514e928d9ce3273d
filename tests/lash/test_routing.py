import math

import pytest
import torch

from lash import DeepSupervisionTransformer, calibrate_threshold
from lash.exit_rule import ExitRule
from lash.routing import early_exit_forward, forward_inference
from tests.lash.counting import OpCounter
from tests.lash.test_models import count_layer_calls

V, DIM, LAYERS, HEADS = 40, 32, 4, 4


def make_model(dtype=torch.float64):
    model = DeepSupervisionTransformer(V, DIM, LAYERS, HEADS, max_seq_len=64, exit_layer=2).to(dtype).eval()
    # Sharpen the head so confidences spread out instead of sitting near 1/V.
    with torch.no_grad():
        model.output_head.weight.mul_(6.0)
    return model


def exit_confidence(model, x, exit_layer):
    with torch.no_grad():
        return model.compute_confidence(model.hidden_states(x, [exit_layer])[0])  # (B, T)


@torch.no_grad()
def propagated_reference(model, x, exits, exit_layer):
    """The CALM rule written plainly: full-sequence blocks whose input keeps exited tokens at their exit state."""
    h_exit = model.hidden_states(x, [exit_layer])[0]
    h = h_exit
    for block in model.layers[exit_layer:]:
        h = torch.where(exits.unsqueeze(-1), h_exit, block(h))
    return torch.where(exits.unsqueeze(-1), model.output_head(h_exit), model.output_head(h))


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.9])
def test_matches_plain_propagation_rule(exit_layer, quantile):
    model = make_model()
    x = torch.randint(0, V, (3, 29))
    conf = exit_confidence(model, x, exit_layer)
    threshold = float(conf.quantile(quantile))
    exits = conf >= threshold
    assert 0 < exits.sum() < exits.numel()
    assert len({tuple(row.tolist()) for row in exits}) == 3  # every row exits differently
    logits, stats = early_exit_forward(model, x, threshold, exit_layer)
    torch.testing.assert_close(logits, propagated_reference(model, x, exits, exit_layer), rtol=1e-10, atol=1e-10)
    shallow = exits.double().mean().item()
    assert stats["shallow_ratio"] == pytest.approx(shallow)
    assert stats["compute_cost"] == pytest.approx((shallow * exit_layer + (1 - shallow) * LAYERS) / LAYERS)
    assert stats["flop_ratio"] > stats["compute_cost"]  # keys/values of exited tokens, exit head, padding


def test_deep_tokens_see_propagated_states_not_true_ones():
    model = make_model()
    x = torch.randint(0, V, (2, 20))
    conf = exit_confidence(model, x, 2)
    threshold = float(conf.quantile(0.5))
    logits, _ = early_exit_forward(model, x, threshold, 2)
    selected, _ = forward_inference(model, x, threshold)
    exits = conf >= threshold
    torch.testing.assert_close(logits[exits], selected[exits])  # exited tokens: the same exit logits
    first_exit = int(exits[0].nonzero()[0])
    later_deep = ~exits[0] & (torch.arange(20) > first_exit)
    assert later_deep.any()
    assert not torch.allclose(logits[0][later_deep], selected[0][later_deep])


def test_rows_with_no_or_only_deep_tokens(monkeypatch):
    model = make_model()
    x = torch.randint(0, V, (3, 11))
    exits = torch.zeros(3, 11, dtype=torch.bool)
    exits[0] = True  # row 0 exits entirely, row 1 never, row 2 alternates
    exits[2, ::2] = True
    monkeypatch.setattr(ExitRule, "exits", lambda rule, confidence: exits)
    logits, stats = early_exit_forward(model, x, 0.5, 2)
    torch.testing.assert_close(logits, propagated_reference(model, x, exits, 2), rtol=1e-10, atol=1e-10)
    assert stats["shallow_ratio"] == pytest.approx(exits.double().mean().item())


@pytest.mark.parametrize("quantile", [0.3, 0.9])
def test_one_host_read_per_call_and_few_kernels_per_deep_layer(monkeypatch, quantile):
    """Counted with LASH's ops as one kernel each: the marginal kernels of one more deep layer."""
    monkeypatch.setenv("LASH_KERNELS", "triton")
    x = torch.randint(0, V, (2, 24))
    counts = {}
    for layers in (4, 6):
        torch.manual_seed(0)
        model = DeepSupervisionTransformer(V, DIM, layers, HEADS, max_seq_len=64, exit_layer=2).eval()
        with torch.no_grad():
            model.output_head.weight.mul_(6.0)
        threshold = float(exit_confidence(model, x, 2).quantile(quantile))
        with OpCounter() as counter:
            _, stats = early_exit_forward(model, x, threshold, 2)
        assert 0.0 < stats["shallow_ratio"] < 1.0
        assert len(counter.host_reads) <= 1, counter.host_reads
        counts[layers] = counter.kernels
    per_layer = (len(counts[6]) - len(counts[4])) / 2
    assert per_layer <= 15, sorted(counts[6])


def test_no_threshold_is_forward_and_zero_is_the_exit_layer():
    model = make_model(torch.float32)
    x = torch.randint(0, V, (2, 31))
    with torch.no_grad():
        full, all_logits = model(x), model.forward_all_layers(x)
    logits, stats = early_exit_forward(model, x, None, 2)
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)  # fp32 logits of magnitude ~10: a few ulps
    assert stats["shallow_ratio"] == 0.0 and stats["compute_cost"] == 1.0
    ffn, head = 4 * DIM, 2 * DIM * V
    layer_tokens = 2 * (4 * DIM * DIM + 3 * DIM * ffn)
    assert stats["flop_ratio"] > 1.0  # the exit head and padding are extra work
    logits, stats = early_exit_forward(model, x, 0.0, 2)
    torch.testing.assert_close(logits, all_logits[1], rtol=0, atol=1e-6)
    causal = layer_tokens * 31 + 31 * 32 // 2 * 4 * DIM  # one row, one layer
    expected = (2 * causal + 2 * 31 * head) / (LAYERS * causal + 31 * head)  # the head: statistics, then logits
    assert stats == {"shallow_ratio": 1.0, "compute_cost": 0.5, "flop_ratio": pytest.approx(expected)}


def test_exit_layer_defaults_to_the_model_s():
    model = make_model()
    x = torch.randint(0, V, (2, 9))
    model.exit_layer = 3
    logits, stats = early_exit_forward(model, x, 0.0)
    torch.testing.assert_close(logits, model.forward_all_layers(x)[2])
    assert stats["compute_cost"] == pytest.approx(0.75)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, math.nan, "0.5", True])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match=r"routing_threshold=.* (must be a finite number in|is outside) \[0.0, 1.0\]"):
        early_exit_forward(make_model(), torch.zeros(1, 4, dtype=torch.long), threshold)


@pytest.mark.parametrize("exit_layer", [0, 4, 1.0, True])
def test_bad_exit_layer(exit_layer):
    with pytest.raises(ValueError, match=rf"exit_layer={exit_layer!r} is outside \[1, 3\]"):
        early_exit_forward(make_model(), torch.zeros(1, 4, dtype=torch.long), 0.5, exit_layer)


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, V, (4, 33), generator=g)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_calibration_hits_the_target_shallow_ratio(target):
    model, data = make_model(), batches()
    threshold = calibrate_threshold(model, data, 2, target_shallow_ratio=target)
    ratios = [early_exit_forward(model, x, threshold, 2)[1]["shallow_ratio"] for x, _ in data]
    assert sum(ratios) / len(ratios) == pytest.approx(target, abs=0.02)


def selection_accuracy(model, data, threshold, exit_layer):
    hit = total = 0
    for x, y in data:
        h_exit, h_last = model.hidden_states(x, [exit_layer, LAYERS])
        exits = model.compute_confidence(h_exit) >= threshold
        pred = torch.where(exits, model.output_head(h_exit).argmax(-1), model.output_head(h_last).argmax(-1))
        hit, total = hit + (pred == y).sum().item(), total + y.numel()
    return hit / total


@pytest.mark.parametrize("drop", [0.0, 0.01, 0.05, 1.0])
def test_calibration_keeps_accuracy_within_the_drop(drop):
    model, data = make_model(), batches()
    # Targets the model predicts often enough for accuracy to mean something: its own argmax.
    data = [(x, model(x).argmax(-1)) for x, _ in data]
    with torch.no_grad():
        full = selection_accuracy(model, data, math.inf, 2)
        threshold = calibrate_threshold(model, data, 2, max_accuracy_drop=drop)
        threshold = math.inf if threshold is None else threshold  # None: no token exits
        assert selection_accuracy(model, data, threshold, 2) >= full - drop - 1e-12
        conf = torch.cat([exit_confidence(model, x, 2).flatten() for x, _ in data])
        lower = conf[conf < threshold]
        if drop == 1.0:
            assert threshold == conf.min().item()
        elif lower.numel():  # the lowest: the next lower threshold would break the bound
            assert selection_accuracy(model, data, lower.max().item(), 2) < full - drop


def test_calibration_errors():
    model, data = make_model(), batches(1)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_threshold(model, data, 2)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_threshold(model, data, 2, target_shallow_ratio=0.5, max_accuracy_drop=0.1)
    with pytest.raises(ValueError, match=r"target_shallow_ratio=1.5 is outside \[0.0, 1.0\]"):
        calibrate_threshold(model, data, 2, target_shallow_ratio=1.5)
    with pytest.raises(ValueError, match=r"max_accuracy_drop=-0.1 is outside \[0.0, 1.0\]"):
        calibrate_threshold(model, data, 2, max_accuracy_drop=-0.1)
    with pytest.raises(ValueError, match=r"exit_layer=4 is outside \[1, 3\]"):
        calibrate_threshold(model, data, 4, target_shallow_ratio=0.5)
    with pytest.raises(ValueError, match="no token with a label"):
        calibrate_threshold(model, [], 2, target_shallow_ratio=0.5)


def test_early_exit_on_empty_input_and_calibration_on_bad_targets_are_value_errors():
    model = make_model()
    for shape in ((2, 0), (0, 3)):
        with pytest.raises(ValueError, match=r"must have shape \(batch >= 1, seq_len >= 1\)"):
            early_exit_forward(model, torch.zeros(shape, dtype=torch.long), 0.5, 2)
    x = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match=rf"target value {V} is outside \[0, {V}\) or -100"):
        calibrate_threshold(model, [(x, torch.full_like(x, V))], exit_layer=2, target_shallow_ratio=0.5)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_selection_and_early_exit_send_the_same_tokens_out(threshold):
    model = make_model()
    model.routing_threshold = threshold
    x = torch.randint(0, V, (3, 25))
    with torch.no_grad():
        exit_logits = model.forward_all_layers(x)[1]  # (B, T, V), layer 2

    def exited(logits):  # the exit layer's logits, to rounding (early exit projects q, k, v with one GEMM)
        return torch.isclose(logits, exit_logits, rtol=1e-12, atol=1e-12).all(-1)  # (B, T)

    selected, selection_stats = forward_inference(model, x, threshold)
    routed, routed_stats = early_exit_forward(model, x, threshold, 2)
    assert torch.equal(exited(selected), exited(routed))
    assert selection_stats["shallow_ratio"] == routed_stats["shallow_ratio"]
    assert selection_stats["compute_cost"] == routed_stats["compute_cost"]
    if threshold == 0.0:
        assert bool(exited(routed).all())
    if threshold == 0.5:
        assert 0 < exited(routed).sum() < exited(routed).numel()


def test_forward_inference_selects_by_the_rule():
    model = DeepSupervisionTransformer(vocab_size=30, dim=16, num_layers=3, num_heads=2, exit_layer=1, routing_threshold=0.5)
    x = torch.randint(0, 30, (3, 6))
    with torch.no_grad():
        all_logits = model.forward_all_layers(x)
        conf = model.compute_confidence(model.hidden_states(x, [1])[0])
    threshold = float(conf.median())
    logits, stats = forward_inference(model, x, threshold)
    exits = conf >= threshold
    torch.testing.assert_close(logits, torch.where(exits[..., None], all_logits[0], all_logits[2]))
    shallow = exits.float().mean().item()
    assert stats["shallow_ratio"] == pytest.approx(shallow)
    assert stats["compute_cost"] == pytest.approx((shallow * 1 + (1 - shallow) * 3) / 3)

    logits, stats = forward_inference(model, x, None)  # routing off
    torch.testing.assert_close(logits, all_logits[2])
    assert stats == {"shallow_ratio": 0.0, "compute_cost": 1.0}

    calls = count_layer_calls(model)
    logits, stats = forward_inference(model, x, 0.0)  # every token exits: deeper layers are skipped
    torch.testing.assert_close(logits, all_logits[0])
    assert stats["compute_cost"] == pytest.approx(1 / 3) and calls == [1, 0, 0]
