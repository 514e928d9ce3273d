"""CUDA graphs for Hugging Face decoding (lash.hf.generation.GraphedHFParts over a StaticCache):
a replay gives what eager decoding gives. On the CPU the captures are FX traces
(:func:`tests.lash.graphs.traced`)."""

import pytest
import torch

pytest.importorskip("transformers")

from lash.hf import generate  # noqa: E402

from ..graphs import traced  # noqa: E402, F401 (a fixture)
from .test_generation import NEW, hf_greedy, make_model, prompts  # noqa: E402

MODES = [{}, {"speculative": True, "draft_tokens": 3, "exit_layer": 1}, {"routing_threshold": 0.2},
         {"routing_threshold": 0.2, "deep_fill": "propagate"}]  # fmt: skip


def _model(family, mode):
    return make_model(family, weight_scale=10.0 if "routing_threshold" in mode else 1.0,
                      deep_scale=0.2 if "speculative" in mode else 1.0)  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 3])
def test_replayed_graphs_decode_as_eager_decoding(traced, family, mode, batch):
    model, x = _model(family, mode), prompts(batch)
    mask = torch.ones_like(x)
    mask[-1, :2] = 0  # left padding
    x = x.masked_fill(mask == 0, 0)
    call = {"exit_layer": 2, "attention_mask": mask, "return_stats": True, **mode}
    eager, eager_stats = generate(model, x, NEW, cuda_graphs=False, **call)
    for _ in range(2):  # the second call replays the first call's graphs
        graphed, stats = generate(model, x, NEW, cuda_graphs=True, **call)
        assert traced and torch.equal(graphed, eager) and stats == eager_stats
    if "routing_threshold" not in mode:
        assert torch.equal(graphed, hf_greedy(model, x, attention_mask=mask))


def test_graphs_are_the_default_only_where_they_can_be(traced):
    model, x = make_model(), prompts(1)
    generate(model, x, 4, exit_layer=1)
    assert traced  # "available" (patched here): graphs over a static cache
    captured = len(traced)
    generate(model, x, 4, exit_layer=1, cache_implementation="dynamic")
    generate(make_model("mistral"), x, 4, exit_layer=1)  # sliding-window layers: a dynamic cache, eagerly
    assert len(traced) == captured


@pytest.mark.parametrize("first_in_inference_mode", [True, False])
def test_graphs_serve_calls_in_and_out_of_inference_mode(traced, first_in_inference_mode):
    model, x = make_model(deep_scale=0.2), prompts(2)
    call = {"exit_layer": 1, "speculative": True, "draft_tokens": 2}
    eager = generate(model, x, NEW, cuda_graphs=False, **call)
    for inference in (first_in_inference_mode, not first_in_inference_mode):  # the same graphs and cache
        with torch.inference_mode(inference):
            assert torch.equal(generate(model, x, NEW, cuda_graphs=True, **call), eager)


@pytest.mark.parametrize(
    ("family", "kwargs", "message"),
    [
        ("llama", {"cuda_graphs": True}, "cuda_graphs=True needs the model on a CUDA device"),
        ("llama", {"cuda_graphs": 1}, "cuda_graphs"),
    ],
)
def test_graph_options_that_do_not_go_together_are_refused(family, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(make_model(family), prompts(1), 2, exit_layer=1, **kwargs)


@pytest.mark.parametrize(
    ("family", "kwargs", "message"),
    [
        ("mistral", {"cuda_graphs": True}, "sliding-window layers"),
        ("llama", {"cuda_graphs": True, "cache_implementation": "dynamic"}, "needs cache_implementation='static'"),
        ("flash", {"cuda_graphs": True}, "needs attn_implementation 'sdpa' or 'eager'; the model uses 'flash_attention_2'"),
    ],
)
def test_graphs_need_a_static_cache_and_attention_that_takes_a_mask(traced, family, kwargs, message):
    model = make_model("llama" if family == "flash" else family)
    if family == "flash":  # as if loaded with attn_implementation="flash_attention_2" (not installed here)
        model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=message):
        generate(model, prompts(1), 2, exit_layer=1, **kwargs)


@pytest.mark.parametrize("rope", ["dynamic", "longrope"])
def test_rope_chosen_on_the_host_decodes_eagerly(traced, rope):
    """Dynamic-scaling and longrope RoPE pick their frequencies on the host from the longest
    position: a read no graph can capture. Such models decode eagerly by default; asking for
    graphs is a ValueError naming the RoPE type."""
    model, x = make_model(), prompts(1)
    model.model.rotary_emb.rope_type = rope  # as a model configured with that scaling would have it
    with pytest.raises(ValueError, match=f"uses '{rope}' RoPE"):
        generate(model, x, 4, exit_layer=1, cuda_graphs=True)
    if rope == "dynamic":  # longrope would need the rest of its configuration to run at all
        generate(model, x, 4, exit_layer=1)
        assert not traced


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_replay_decodes_as_eager_decoding(mode, batch):
    model, x = _model("llama", mode).cuda(), prompts(batch).cuda()
    call = {"exit_layer": 2, **mode}
    eager = generate(model, x, NEW, cuda_graphs=False, **call)
    for _ in range(2):
        assert torch.equal(generate(model, x, NEW, cuda_graphs=True, **call), eager)
