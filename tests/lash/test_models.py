import pytest
import torch

from lash import DeepSupervisionTransformer, StandardTransformer


def count_layer_calls(model):
    calls = [0] * model.num_layers
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_shapes_and_shared_head():
    model = StandardTransformer(vocab_size=53, dim=16, num_layers=3, num_heads=2)
    x = torch.randint(0, 53, (2, 7))
    assert model(x).shape == (2, 7, 53)
    all_logits = model.forward_all_layers(x)
    assert len(all_logits) == 3 and all(t.shape == (2, 7, 53) for t in all_logits)
    hs = model.hidden_states(x)
    for h, logits in zip(hs, all_logits):
        torch.testing.assert_close(model.output_head(h), logits)
    torch.testing.assert_close(model(x), all_logits[-1])


def test_hidden_states_runs_no_deeper_layer_than_asked():
    model = StandardTransformer(vocab_size=20, dim=8, num_layers=4, num_heads=2)
    calls = count_layer_calls(model)
    x = torch.randint(0, 20, (1, 5))
    h3, h1 = model.hidden_states(x, [3, 1])
    assert calls == [1, 1, 1, 0]
    torch.testing.assert_close(h1, model.hidden_states(x, [1])[0])
    torch.testing.assert_close(h3, model.hidden_states(x)[2])
    with pytest.raises(ValueError, match=r"layer=5 is outside \[1, 4\]"):
        model.hidden_states(x, [5])
    with pytest.raises(ValueError, match=r"layer=0 is outside"):
        model.hidden_states(x, [0])


@pytest.mark.parametrize("bad", [-1, 20, 1000])
def test_bad_token_ids_raise_value_error(bad):
    model = StandardTransformer(vocab_size=20, dim=8, num_layers=1, num_heads=2)
    x = torch.randint(0, 20, (2, 5))
    x[1, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {bad} is outside \[0, 20\)"):
        model(x)


def test_too_long_sequence_and_bad_shapes():
    model = StandardTransformer(vocab_size=20, dim=8, num_layers=1, num_heads=2, max_seq_len=8)
    with pytest.raises(ValueError, match=r"sequence length 9 is outside \[1, max_seq_len=8\]"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="num_layers=0"):
        StandardTransformer(vocab_size=20, num_layers=0)
    with pytest.raises(ValueError, match=r"exit_layer=4 is outside \[1, 2\]"):
        DeepSupervisionTransformer(vocab_size=20, exit_layer=4)
    with pytest.raises(ValueError, match="routing_threshold=1.2"):
        DeepSupervisionTransformer(vocab_size=20, routing_threshold=1.2)


def test_init_follows_reference():
    torch.manual_seed(1)
    model = StandardTransformer(vocab_size=500, dim=64, num_layers=2, num_heads=4)
    assert model.embedding.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.layers[0].attn.q_proj.weight.std().item() == pytest.approx(64**-0.5, rel=0.1)
    assert model.output_head.weight.std().item() == pytest.approx(64**-0.5, rel=0.1)
    assert torch.equal(model.layers[1].norm2.weight, torch.ones(64))


def test_deep_supervision_confidence():
    model = DeepSupervisionTransformer(vocab_size=30, dim=16, num_layers=3, num_heads=2, exit_layer=1, routing_threshold=0.5)
    x = torch.randint(0, 30, (3, 6))
    with torch.no_grad():
        h1 = model.hidden_states(x, [1])[0]
        all_logits = model.forward_all_layers(x)
        conf = model.compute_confidence(h1)
    torch.testing.assert_close(conf, model.output_head(h1).softmax(-1).amax(-1))
    assert len(model.forward_train(x)) == 3


def test_constructor_and_input_checks_are_value_errors():
    for ffn_dim in (0, -4, 2.5):
        with pytest.raises(ValueError, match=f"ffn_dim={ffn_dim!r} must be None or an int >= 1"):
            StandardTransformer(vocab_size=11, dim=8, num_layers=1, num_heads=2, ffn_dim=ffn_dim)
    with pytest.raises(ValueError, match="routing_threshold='0.5' must be a finite number"):
        DeepSupervisionTransformer(vocab_size=11, dim=8, num_layers=2, num_heads=2, routing_threshold="0.5")
    model = StandardTransformer(vocab_size=11, dim=8, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="token ids must be an integer tensor .* got dtype torch.float32"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"sequence length 0 is outside \[1, max_seq_len=1024\]"):
        model(torch.zeros(2, 0, dtype=torch.long))
