import pytest
import torch

from lash import DeepSupervisionTransformer
from lash.generation import generate
from lash.decoding import DecodeState
from lash.decoding_parts import LashParts

V, DIM, LAYERS, HEADS = 37, 32, 4, 4


def make_model(deep_scale=1.0):
    """A float64 model; ``deep_scale`` < 1 shrinks layers 2+'s residual updates so shallow exits
    often agree with the last layer (speculative drafts then get both accepted and rejected)."""
    model = DeepSupervisionTransformer(V, DIM, LAYERS, HEADS, max_seq_len=48, exit_layer=1).double().eval()
    with torch.no_grad():
        model.output_head.weight.mul_(4.0)
        for block in model.layers[1:]:
            block.attn.o_proj.weight.mul_(deep_scale)
            block.ffn.w2.weight.mul_(deep_scale)
    return model


def prompts(batch, length=6, seed=0):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_without_cache(model, x, n):
    for _ in range(n):
        x = torch.cat((x, model(x)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return x


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_cached_greedy_equals_recomputation(batch, seed):
    model, x = make_model(), prompts(batch, seed=seed)
    out = generate(model, x, 12)
    assert out.shape == (batch, 18) and out.dtype == torch.long
    assert torch.equal(out, greedy_without_cache(model, x, 12))


def test_speculative_exercises_accepts_and_rejects():
    model, x = make_model(deep_scale=0.1), prompts(3)
    _, stats = generate(model, x, 20, exit_layer=1, speculative=True, draft_tokens=4, return_stats=True)
    assert 0.0 < stats["acceptance_rate"] < 1.0


@pytest.mark.parametrize("speculative", [False, True])
def test_top_1_sampling_is_greedy(speculative):
    model, x = make_model(deep_scale=0.1), prompts(2)
    g = torch.Generator().manual_seed(3)
    out = generate(model, x, 10, temperature=0.7, top_k=1, speculative=speculative, generator=g)
    assert torch.equal(out, generate(model, x, 10))


@pytest.mark.parametrize("mode", [{}, {"speculative": True}, {"routing_threshold": 0.3}])
def test_sampling_is_reproducible_with_a_generator(mode):
    model, x = make_model(deep_scale=0.3), prompts(2)
    runs = [generate(model, x, 12, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7), **mode) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, :6], x) and ((runs[0] >= 0) & (runs[0] < V)).all()
    other = generate(model, x, 12, temperature=1.0, generator=torch.Generator().manual_seed(8), **mode)
    assert not torch.equal(runs[0], other)


def test_no_new_tokens_returns_the_prompt():
    model, x = make_model(), prompts(2)
    assert torch.equal(generate(model, x, 0, speculative=True), x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": -1}, r"max_new_tokens=-1 must be an int >= 0"),
        ({"max_new_tokens": 43}, r"prompt length 6 \+ max_new_tokens 43 = 49 is outside \[1, max_seq_len=48\]"),
        ({"temperature": -0.5}, r"temperature=-0.5 is outside \[0.0, inf\)"),
        ({"top_k": 0}, r"top_k=0 is outside \[1, 37\] \(the vocabulary size\)"),
        ({"top_k": 38}, r"top_k=38 is outside"),
        ({"draft_tokens": 0, "speculative": True}, r"draft_tokens=0 must be an int >= 1"),
        ({"exit_layer": 4, "speculative": True}, r"exit_layer=4 is outside \[1, 3\]"),
        ({"routing_threshold": -1.0}, r"routing_threshold=-1.0 is outside \[0.0, 1.0\]"),
        ({"routing_threshold": 0.5, "speculative": True}, r"choose one mode"),
        ({"generator": 3}, r"generator must be a torch.Generator"),
        ({"top_p": 0.0}, r"top_p=0.0 is outside \(0.0, 1.0\]"),
        ({"deep_fill": "copy", "routing_threshold": 0.5}, r"deep_fill='copy' must be one of recompute, propagate"),
        ({"exit_batching": "all", "routing_threshold": 0.5}, r"exit_batching='all' must be one of row, batch"),
        ({"attention_mask": torch.ones(1, 5)}, r"attention_mask shape \(1, 5\) must equal input_ids shape \(1, 6\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    model = make_model()
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, prompts(1), **kwargs)


def test_bad_prompts():
    model = make_model()
    with pytest.raises(ValueError, match=r"token id 37 is outside \[0, 37\)"):
        generate(model, torch.tensor([[1, 37]]), 2)
    with pytest.raises(ValueError, match=r"non-empty integer tensor \(batch, prompt_len\); got torch.int64 of shape \(2,\)"):
        generate(model, torch.tensor([1, 2]), 2)
    with pytest.raises(ValueError, match="non-empty integer tensor"):
        generate(model, torch.zeros(2, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"non-empty integer tensor \(batch, prompt_len\); got torch.float32 of shape \(1, 3\)"):
        generate(model, torch.ones(1, 3), 2)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_prompts_of_any_integer_dtype_decode_as_int64(dtype):
    model, x = make_model(), prompts(2)
    assert torch.equal(generate(model, x.to(dtype), 5), generate(model, x, 5))


def test_tiny_temperature_samples_the_argmax_instead_of_failing():
    model = make_model()
    prompt = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(1))
    greedy = generate(model, prompt, 4)
    for temperature in (1e-45, 1e-300):  # the second rounds to 0 in fp32
        sampled = generate(model, prompt, 4, temperature=temperature, generator=torch.Generator().manual_seed(0))
        assert torch.equal(sampled, greedy)


@torch.no_grad()
def test_propagation_writes_what_the_deep_layers_project_from_the_exit_state():
    """LashParts.fill's one GEMM over every deep layer's stacked k/v weights and one rotation equal
    running those layers over the frozen state (what propagation means)."""
    model = make_model()
    parts = LashParts(model)
    B, S = 2, 9
    h = torch.randn(B, 2, DIM, dtype=torch.float64)
    positions = torch.tensor([[3, 4], [5, 6]])
    states = []
    for _ in range(2):
        cache = parts.new_cache(B, S)
        states.append(DecodeState(cache, torch.ones(B, S, dtype=torch.bool), torch.zeros(B, S, dtype=torch.long)))
    parts.fill(h, 4, positions, range(1, LAYERS), states[0])
    parts.run(h, 4, positions, range(1, LAYERS), states[1], frozen=torch.ones(B, 2, dtype=torch.bool))
    for a, b in ((states[0].cache.keys, states[1].cache.keys), (states[0].cache.values, states[1].cache.values)):
        torch.testing.assert_close(a[1:, :, :, 4:6], b[1:, :, :, 4:6], rtol=1e-12, atol=1e-12)
        assert bool(a[1:, :, :, 4:6].abs().sum() > 0) and not a[1:, :, :, :4].any() and not a[0].any()
