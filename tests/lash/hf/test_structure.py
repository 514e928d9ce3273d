"""lash.hf.structure: the parts of every family, refusals, and the decoder run only as deep as asked."""

import pytest
import torch

pytest.importorskip("transformers")

from lash.hf import decoder_hidden_states, decoder_parts  # noqa: E402
from tests.lash.hf.tiny import FAMILIES, LAYERS, batch, tiny_model  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_parts_finds_every_part(family):
    model = tiny_model(family)
    parts = decoder_parts(model)
    assert parts.backbone is model.model
    assert parts.embed is model.model.embed_tokens
    assert parts.layers is model.model.layers and len(parts.layers) == LAYERS
    assert parts.norm is model.model.norm
    assert parts.head is model.lm_head


def test_softcapped_gemma2_is_refused_with_the_model_type_and_reason():
    model = tiny_model("gemma", final_logit_softcapping=30.0)
    model.config.model_type = "gemma2"  # the family that softcaps by default
    with pytest.raises(ValueError, match=r"model_type='gemma2'.*final_logit_softcapping"):
        decoder_parts(model)


def test_a_real_gemma2_is_refused():
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"model_type='gemma2'.*final_logit_softcapping is set"):
        decoder_parts(transformers.Gemma2ForCausalLM(config))


def test_a_head_with_a_bias_is_refused():
    model = tiny_model("llama")
    model.lm_head = torch.nn.Linear(32, 64, bias=True)
    with pytest.raises(ValueError, match=r"model_type='llama'.*without bias"):
        decoder_parts(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_equal_the_models_and_deeper_layers_do_not_run(family):
    model = tiny_model(family)
    input_ids, _ = batch()
    calls = []
    model.model.layers[2].register_forward_hook(lambda *_: calls.append(1))
    full = model(input_ids=input_ids, output_hidden_states=True).hidden_states  # L + 1 × (B, T, D)
    assert len(calls) == 1
    run = decoder_hidden_states(model, [2, 1], input_ids=input_ids)
    assert len(calls) == 1, "layer 3 ran although layer 2 was the deepest asked for"
    assert sorted(run.hiddens) == [1, 2]
    torch.testing.assert_close(run.hiddens[1], full[1], rtol=0, atol=0)
    torch.testing.assert_close(run.hiddens[2], full[2], rtol=0, atol=0)
    torch.testing.assert_close(run.last_normed, model.model.norm(full[2]), rtol=0, atol=0)
    assert model.config.num_hidden_layers == LAYERS
    hooks = [len(layer._forward_hooks) for layer in model.model.layers]
    again = decoder_hidden_states(model, [1], input_ids=input_ids)
    assert [len(layer._forward_hooks) for layer in model.model.layers] == hooks, "hooks are installed once"
    assert sorted(again.hiddens) == [1]
    torch.testing.assert_close(again.last_normed, model.model.norm(full[1]), rtol=0, atol=0)


def test_depth_and_recorder_are_restored_after_an_exception():
    model = tiny_model("llama")

    def fail(*_):
        raise RuntimeError("boom")

    model.model.layers[0].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        decoder_hidden_states(model, [2], input_ids=batch()[0])
    assert model.config.num_hidden_layers == LAYERS
    recorder = model.model.layers._lash_recorder
    assert not recorder.wanted and not recorder.record


def test_layers_outside_the_model_are_refused():
    with pytest.raises(ValueError, match=r"layers=\[4\] must be .* in \[1, 3\]"):
        decoder_hidden_states(tiny_model("llama"), [4], input_ids=batch()[0])
