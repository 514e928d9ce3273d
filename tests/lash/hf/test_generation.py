import pytest
import torch

transformers = pytest.importorskip("transformers")

from lash.hf import generate  # noqa: E402

V, PROMPT, NEW = 40, 5, 10
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {}),
    # A window shorter than prompt + generation: sliding masks and rolling back past the window.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 6}),
}


def make_model(family="llama", head_scale=1.0, deep_scale=1.0, weight_scale=1.0, seed=0):
    """A tiny float32 model. ``head_scale`` > 1 spreads the confidences; ``weight_scale`` > 1
    scales every matrix so each layer's update counts (a threshold then splits tokens, and the
    deeper layers' cache entries of exited tokens change later predictions); ``deep_scale`` < 1
    shrinks layers 2+'s residual updates so the exit layer often agrees with the last
    (speculative drafts then get both accepted and rejected)."""
    config_class, model_class, extra = FAMILIES[family]
    config = config_class(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(weight_scale)
        model.lm_head.weight.mul_(head_scale)
        for layer in model.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(deep_scale)
            layer.mlp.down_proj.weight.mul_(deep_scale)
    return model


def prompts(batch, seed=0):
    return torch.randint(0, V, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, x, new=NEW, **kwargs):
    return model.generate(x, do_sample=False, max_new_tokens=new, **kwargs)


@torch.no_grad()
def routed_greedy_without_cache(model, x, new, exit_layer, threshold, propagate):
    """LASH's early exit recomputed from scratch each step with the model's own forward: a
    generated token after the first takes the exit layer's prediction where ``head(norm(h))`` is
    confident there. With ``propagate``, hooks hold exited generated tokens at their exit state in
    the deeper layers (CALM); without, every token keeps its exact deep state (the recompute fill).
    Returns the ids and the ``(B, new - 1)`` exit decisions."""
    layers, state = model.model.layers, {}
    held = torch.zeros(x.shape, dtype=torch.bool)

    def decide(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        state.update(h=h, logits=model.lm_head(model.model.norm(h)))

    def hold(module, args, kwargs, output):
        h = output[0] if isinstance(output, tuple) else output
        return torch.where(held[:, : h.shape[1], None], state["h"], h)

    hooks = [layers[exit_layer - 1].register_forward_hook(decide)]
    if propagate:
        hooks += [layer.register_forward_hook(hold, with_kwargs=True) for layer in layers[exit_layer:]]
    decisions = []
    try:
        for step in range(new):
            logits = model(x).logits[:, -1]  # (B, V)
            exited = torch.zeros(x.shape[0], dtype=torch.bool)
            if step:
                exited = state["logits"][:, -1].float().softmax(-1).amax(-1) >= threshold  # (B,)
                logits = torch.where(exited.unsqueeze(1), state["logits"][:, -1], logits)
                decisions.append(exited)
            held = torch.cat((held[:, :-1], exited[:, None], torch.zeros_like(exited)[:, None]), dim=1)
            x = torch.cat((x, logits.argmax(-1, keepdim=True)), dim=1)
    finally:
        for hook in hooks:
            hook.remove()
    return x, torch.stack(decisions, dim=1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("batch", [1, 3])
def test_plain_greedy_equals_hf_generate(family, batch):
    model, x = make_model(family), prompts(batch)
    out = generate(model, x, NEW, exit_layer=2)
    assert out.shape == (batch, PROMPT + NEW) and out.dtype == torch.long
    assert torch.equal(out, hf_greedy(model, x))


def test_plain_greedy_with_left_padding_equals_hf_generate():
    model, x = make_model(), prompts(3)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    mask[2, :1] = 0
    x = x.masked_fill(mask == 0, 0)
    assert torch.equal(generate(model, x, NEW, exit_layer=2, attention_mask=mask), hf_greedy(model, x, attention_mask=mask))


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("mode", [{}, {"speculative": True, "draft_tokens": 3, "exit_layer": 1}, {"routing_threshold": 0.2},
                                  {"routing_threshold": 0.2, "deep_fill": "propagate"}])  # fmt: skip
@pytest.mark.parametrize("batch", [1, 3])
def test_a_static_cache_decodes_as_the_dynamic_cache_and_hf_generate(family, mode, batch):
    model, x = make_model(family, weight_scale=10.0 if "routing_threshold" in mode else 1.0,
                          deep_scale=0.2 if "speculative" in mode else 1.0), prompts(batch)  # fmt: skip
    mask = torch.ones_like(x)
    mask[-1, :2] = 0  # left padding (batch 1: a single row's drafts are cropped away when rejected)
    x = x.masked_fill(mask == 0, 0)
    call = {"exit_layer": 2, "attention_mask": mask, "return_stats": True, **mode}  # drafts kept and rejected
    static, static_stats = generate(model, x, NEW, cache_implementation="static", **call)
    dynamic, dynamic_stats = generate(model, x, NEW, **call)
    assert torch.equal(static, dynamic) and static_stats == dynamic_stats
    if "routing_threshold" not in mode:
        assert torch.equal(static, hf_greedy(model, x, attention_mask=mask, cache_implementation="static"))
        assert static_stats["acceptance_rate"] > 0 or not mode
    else:
        assert 0 < static_stats["shallow_ratio"] < 1


def test_a_static_cache_is_refused_for_sliding_window_layers():
    with pytest.raises(ValueError, match="cache_implementation='static' needs full-attention layers"):
        generate(make_model("mistral"), prompts(1), 2, exit_layer=1, cache_implementation="static")


@pytest.mark.parametrize("speculative", [False, True])
def test_eos_pads_finished_rows_and_stops_like_hf_generate(speculative):
    model, x = make_model(deep_scale=0.2), prompts(3)
    reference = hf_greedy(model, x)
    eos = [int(reference[0, PROMPT + 2]), int(reference[1, PROMPT + 4])]
    model.generation_config.pad_token_id = 7
    expected = hf_greedy(model, x, eos_token_id=eos, pad_token_id=7)
    out = generate(model, x, NEW, exit_layer=1, speculative=speculative, draft_tokens=3, eos_token_id=eos)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_threshold_zero_takes_every_token_after_the_first_from_the_exit_layer(family):
    model, x = make_model(family), prompts(3)
    out, stats = generate(model, x, NEW, exit_layer=2, routing_threshold=0.0, return_stats=True)
    assert stats["shallow_ratio"] == (NEW - 1) / NEW  # the prefilled prompt predicts the first token
    assert torch.equal(out[:, : PROMPT + 1], hf_greedy(model, x, 1))
    # Then layers 1..2, norm and head: a 2-layer model with the same weights, on its own caches.
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    assert torch.equal(out, hf_greedy(model, out[:, : PROMPT + 1], NEW - 1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_threshold_one_equals_plain_greedy(family):
    model, x = make_model(family, head_scale=4.0), prompts(3)
    out, stats = generate(model, x, NEW, exit_layer=2, routing_threshold=1.0, return_stats=True)
    assert stats["shallow_ratio"] == 0.0
    assert torch.equal(out, hf_greedy(model, x))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("exit_layer", [1, 2])
@pytest.mark.parametrize("deep_fill", ["recompute", "propagate"])
def test_mixed_early_exit_follows_lashs_rule_row_by_row(family, exit_layer, deep_fill):
    model, x = make_model(family, weight_scale=10.0), prompts(3)
    threshold = 0.2
    out, stats = generate(model, x, NEW, exit_layer=exit_layer, routing_threshold=threshold, deep_fill=deep_fill,
                          return_stats=True)  # fmt: skip
    expected, decisions = routed_greedy_without_cache(model, x, NEW, exit_layer, threshold, deep_fill == "propagate")
    assert torch.equal(out, expected)
    assert stats["shallow_ratio"] == pytest.approx(decisions.sum().item() / (3 * NEW))
    mixed = decisions.any(0) & ~decisions.all(0)  # steps where some rows exit and others do not
    assert bool(mixed.any()), decisions


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("exit_layer", [1, 2, 3])
@pytest.mark.parametrize("draft_tokens", [1, 3, 5])
def test_speculative_greedy_equals_hf_generate(family, batch, exit_layer, draft_tokens):
    model, x = make_model(family, deep_scale=0.2), prompts(batch)
    out, stats = generate(model, x, NEW, exit_layer=exit_layer, speculative=True, draft_tokens=draft_tokens, return_stats=True)
    assert torch.equal(out, hf_greedy(model, x))
    assert 0.0 <= stats["acceptance_rate"] <= 1.0 and stats["executed_layer_ratio"] > 0


def test_stats_keys_are_the_same_for_every_mode_and_for_lash_models():
    from lash import DeepSupervisionTransformer
    from lash.generation import generate as lash_generate

    model, x = make_model(), prompts(2)
    lash_model = DeepSupervisionTransformer(V, 16, 4, 2, max_seq_len=32, exit_layer=2).eval()
    keys = {"shallow_ratio", "compute_cost", "executed_layer_ratio", "acceptance_rate"}
    for mode in ({}, {"routing_threshold": 0.5}, {"speculative": True}):
        assert set(generate(model, x, 4, exit_layer=2, return_stats=True, **mode)[1]) == keys
        assert set(lash_generate(lash_model, x, 4, exit_layer=2, return_stats=True, **mode)[1]) == keys


def test_sampling_is_reproducible_with_a_generator():
    model, x = make_model(deep_scale=0.2), prompts(2)
    for mode in ({}, {"routing_threshold": 0.3}, {"speculative": True}):
        runs = [generate(model, x, 8, exit_layer=2, temperature=1.0, top_p=0.9,
                         generator=torch.Generator().manual_seed(3), **mode) for _ in range(2)]  # fmt: skip
        assert torch.equal(runs[0], runs[1]), mode


@pytest.mark.parametrize("batch", [1, 3])
def test_speculative_exercises_accepts_and_rejects(batch):
    model, x = make_model(deep_scale=0.2), prompts(batch)
    _, stats = generate(model, x, 20, exit_layer=1, speculative=True, draft_tokens=4, return_stats=True)
    assert 0.0 < stats["acceptance_rate"] < 1.0


def test_zero_new_tokens_returns_the_prompt():
    model, x = make_model(), prompts(2)
    assert torch.equal(generate(model, x, 0, exit_layer=1, speculative=True), x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exit_layer": 0}, r"exit_layer=0 is outside \[1, 3\]"),
        ({"exit_layer": 4}, r"exit_layer=4 is outside \[1, 3\]"),
        ({"exit_layer": 1, "draft_tokens": 0, "speculative": True}, r"draft_tokens=0 must be an int >= 1"),
        ({"exit_layer": 1, "max_new_tokens": -1}, r"max_new_tokens=-1 must be an int >= 0"),
        ({"exit_layer": 1, "routing_threshold": 1.5}, r"routing_threshold=1.5 is outside \[0.0, 1.0\]"),
        ({"exit_layer": 1, "routing_threshold": 0.5, "speculative": True}, "choose one mode"),
        ({"exit_layer": 1, "cache_implementation": "paged"}, r"cache_implementation='paged' must be one of dynamic, static"),
    ],
)
def test_bad_arguments_name_the_value_and_the_range(kwargs, message):
    model, x = make_model(), prompts(1)
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, x, kwargs.pop("max_new_tokens"), **kwargs)


def test_gemma_is_refused_with_its_model_type():
    config = transformers.GemmaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    with pytest.raises(ValueError, match="model_type='gemma' scales its embeddings inside the backbone"):
        generate(transformers.GemmaForCausalLM(config).eval(), prompts(1), 3, exit_layer=1)


def test_softcapped_heads_are_refused():
    model = make_model()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"final_logit_softcapping is set"):
        generate(model, prompts(1), 3, exit_layer=1)
