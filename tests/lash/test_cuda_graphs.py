"""CUDA graphs for LASH decoding (lash.cuda_graphs): a replay gives what eager decoding gives.

On the CPU the captures are FX traces (:func:`tests.lash.graphs.traced`)."""

import importlib
from pathlib import Path

import pytest
import torch

from lash import DeepSupervisionTransformer, cuda_graphs
from lash.decoding import DecodeState
from lash.decoding_parts import LashParts
from lash.generation import generate

from .counting import OpCounter
from .graphs import traced  # noqa: F401 (a fixture)
from .test_decoding import DIM, HEADS, LAYERS, PROMPT, V, make_model, prompts, split_threshold

MODES = [{}, {"routing_threshold": "split"}, {"routing_threshold": "split", "deep_fill": "propagate"},
         {"speculative": True, "draft_tokens": 3}]  # fmt: skip


def _mode(model, x, mode):
    if mode.get("routing_threshold") == "split":
        return {**mode, "routing_threshold": split_threshold(model, x)}
    return mode


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 3])
def test_replayed_graphs_decode_as_eager_decoding(traced, mode, batch):
    model, x = make_model(deep_scale=0.1), prompts(batch)
    mode = _mode(model, x, mode)
    mask = torch.ones_like(x)
    mask[1:, :2] = 0  # rows after the first are left-padded
    eager, eager_stats = generate(model, x, 20, attention_mask=mask, cuda_graphs=False, return_stats=True, **mode)
    graphed, stats = generate(model, x, 20, attention_mask=mask, cuda_graphs=True, return_stats=True, **mode)
    assert traced and torch.equal(graphed, eager) and stats == eager_stats


def test_replays_sample_stop_and_return_the_prompt_as_eager_decoding(traced):
    model, x = make_model(deep_scale=0.1), prompts(3)
    eos = [int(t) for t in generate(model, x, 12, cuda_graphs=False)[:, PROMPT + 6]]
    for call in ({"temperature": 0.8, "top_k": 10}, {"eos_token_id": eos}, {"speculative": True, "temperature": 1.0},
                 {"max_new_tokens": 0}):  # fmt: skip
        call = {"max_new_tokens": 12, **call}
        runs = [generate(model, x, cuda_graphs=graphs, generator=torch.Generator().manual_seed(0), **call)
                for graphs in (False, True)]  # fmt: skip
        assert torch.equal(*runs), call


@pytest.mark.parametrize("mode", [{}, {"routing_threshold": 0.5}])
def test_attention_reaches_further_as_the_cache_fills(traced, mode):
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(V, DIM, LAYERS, HEADS, max_seq_len=160, exit_layer=2).double().eval()
    x = prompts(2)
    eager = generate(model, x, 130, cuda_graphs=False, **mode)
    assert torch.equal(generate(model, x, 130, cuda_graphs=True, **mode), eager)
    reaches = {key.reach for graphs in cuda_graphs._GRAPHS[model].shapes.values() for key in graphs.replays}
    assert reaches == {64, 128, 256}  # columns written so far, rounded up: 6 + 130 crosses 64 and 128


def test_padded_row_buckets_decode_as_eager_decoding(traced, monkeypatch):
    model, x = make_model(deep_scale=0.1), prompts(1)
    calls = []
    step = cuda_graphs.Graphs.step
    monkeypatch.setattr(cuda_graphs.Graphs, "step", lambda self, parts, x, *a: calls.append((x.shape[1], a[-1])) or step(self, parts, x, *a))
    for threshold in (split_threshold(model, x), 0.0):  # deep steps with 1 to 16 rows
        eager = generate(model, x, 40, routing_threshold=threshold, cuda_graphs=False)
        assert torch.equal(generate(model, x, 40, routing_threshold=threshold, cuda_graphs=True), eager)
    assert any(n < rows for n, rows in calls if n > 1)  # some calls ran padded: 3 rows as 4, 6 as 8
    assert {rows for _, rows in calls} <= {1, 2, 4, 8, 16}


def test_a_padded_call_at_the_end_of_its_reach_writes_its_own_columns_only(traced):
    model = make_model()
    graphed, eager = cuda_graphs.GraphedParts(model), LashParts(model)
    h = torch.randn(2, 3, DIM, dtype=torch.float64)  # 3 rows run as 4; the last column they write is 63 of 64
    valid = torch.ones(2, 64, dtype=torch.bool)
    positions = torch.arange(64).expand(2, 64)
    outs, caches = [], []
    for parts in (graphed, eager):
        with parts.serving():
            state = DecodeState(parts.new_cache(2, 64), valid, positions)
            outs.append(parts.step(h, 61, positions[:, 61:], range(LAYERS), state, heads=3))
            caches.append(torch.stack(state.cache)[..., :64, :].clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)  # 4 rows' GEMMs against 3 rows': rounding only
    torch.testing.assert_close(caches[0], caches[1], rtol=1e-12, atol=1e-12)


def test_graphs_are_captured_once_per_model_batch_and_length_and_serve_new_weights(traced):
    model, x = make_model(deep_scale=0.1), prompts(2)
    call = {"max_new_tokens": 12, "speculative": True, "draft_tokens": 2}
    before = generate(model, x, cuda_graphs=True, **call)
    captured = len(traced)
    assert torch.equal(generate(model, x, cuda_graphs=True, **call), before)
    assert len(traced) == captured  # the same model, batch and cache length: every graph replays
    with torch.no_grad():  # trained in place between calls: the graphs read the new weights
        for block in model.layers:
            block.ffn.w1.weight.mul_(3.0)
            block.attn.q_proj.weight.mul_(3.0)
    after = generate(model, x, cuda_graphs=True, **call)
    assert len(traced) == captured and not torch.equal(after, before)
    assert torch.equal(after, generate(model, x, cuda_graphs=False, **call))
    generate(model, x[:1], 12, cuda_graphs=True)
    assert len(traced) > captured  # another batch: new graphs
    model.float()  # the weights move: new graphs over them
    captured = len(traced)
    assert torch.equal(generate(model, x, cuda_graphs=True, **call), generate(model, x, cuda_graphs=False, **call))
    assert len(traced) > captured


def test_modes_that_need_other_cache_lengths_keep_their_graphs(traced, monkeypatch):
    """At batch > 1 speculative decoding's holes take more cache columns than plain decoding: calls
    that alternate between them (a benchmark's interleaved modes) replay, not capture anew, up to
    MAX_SHAPES batch and length pairs, the least recently used dropped first."""
    model, x = make_model(deep_scale=0.1), prompts(2)
    calls = [{}, {"speculative": True, "draft_tokens": 4}]  # 64 and 256 cache columns
    for call in calls:
        generate(model, x, 30, cuda_graphs=True, **call)
    captured = len(traced)
    for call in calls * 2:
        assert torch.equal(generate(model, x, 30, cuda_graphs=True, **call), generate(model, x, 30, cuda_graphs=False, **call))
    assert len(traced) == captured and len(cuda_graphs._GRAPHS[model].shapes) == 2
    monkeypatch.setattr(cuda_graphs, "MAX_SHAPES", 2)
    generate(model, x[:1], 30, cuda_graphs=True)  # a third shape: plain decoding's (2, 64) goes
    captured = len(traced)
    generate(model, x, 30, cuda_graphs=True, **calls[1])
    assert len(traced) == captured
    generate(model, x, 30, cuda_graphs=True)
    assert len(traced) > captured


def test_calls_of_similar_lengths_share_graphs_and_release_frees_them(traced):
    model, x = make_model(deep_scale=0.1), prompts(2)
    generate(model, x, 20, cuda_graphs=True)
    captured = len(traced)
    for new in (9, 14):  # cache columns 15 and 20, after 26: one bucket of 64
        assert torch.equal(generate(model, x, new, cuda_graphs=True), generate(model, x, new, cuda_graphs=False))
    assert len(traced) == captured
    cuda_graphs.release(model)
    generate(model, x, 9, cuda_graphs=True)
    assert len(traced) > captured
    assert [cuda_graphs.cache_columns(n) for n in (1, 64, 65, 300, 1024, 1025, 4100)] == [64, 64, 128, 512, 1024, 2048, 5120]


def test_graphs_need_cuda():
    model, x = make_model(), prompts(1)
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        generate(model, x, 2, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs"):
        generate(model, x, 2, cuda_graphs="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_replay_decodes_as_eager_decoding(mode, batch):
    model, x = make_model(deep_scale=0.1, dtype=torch.float32), prompts(batch)
    model, x = model.cuda(), x.cuda()
    mode = _mode(model, x, mode)
    eager = generate(model, x, 24, cuda_graphs=False, **mode)
    for _ in range(2):  # the second call replays the first call's graphs
        assert torch.equal(generate(model, x, 24, cuda_graphs=True, **mode), eager)
    assert generate(model, x, 24, **mode).shape == (batch, PROMPT + 24)  # graphs by default on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_at_most_one_sync_per_generated_token_on_cuda(mode, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    measure = importlib.import_module("measure")  # counts syncs with torch.cuda.set_sync_debug_mode
    model, x = make_model(deep_scale=0.1, dtype=torch.float32), prompts(3)
    model, x = model.cuda(), x.cuda()
    mode = _mode(model, x, mode)
    syncs = {new: len(measure.sync_warnings(lambda new=new: generate(model, x, new, **mode), warmup=1)) for new in (10, 20)}
    assert syncs[20] - syncs[10] <= 10, syncs


@pytest.mark.parametrize("first_in_inference_mode", [True, False])
def test_graphs_serve_calls_in_and_out_of_inference_mode(traced, first_in_inference_mode):
    model, x = make_model(deep_scale=0.1), prompts(2)
    eager = generate(model, x, 8, speculative=True, draft_tokens=2, cuda_graphs=False)
    for inference in (first_in_inference_mode, not first_in_inference_mode):  # the same graphs and buffers
        with torch.inference_mode(inference):
            assert torch.equal(generate(model, x, 8, speculative=True, draft_tokens=2, cuda_graphs=True), eager)


@pytest.mark.parametrize("mode, budget", [({}, 6), ({"routing_threshold": 0.0}, 13)])
def test_a_graphed_step_is_one_replay_and_a_few_copies(traced, mode, budget):
    """Kernels per generated token besides the replays (greedy, batch 1): a plain step copies its
    inputs in (ids, positions, validity, first column, row count) and its token out; an exiting
    step adds its exit state's copy, the exit test, the read and its count. The embedding, head,
    confidence and argmax are inside the graph."""
    model, x = make_model(), prompts(1)
    kernels = []
    for new in (8, 40):
        generate(model, x, new, cuda_graphs=True, **mode)  # captures
        with OpCounter() as counter:
            generate(model, x, new, cuda_graphs=True, **mode)
        kernels.append(len(counter.kernels))
    assert (kernels[1] - kernels[0]) / 32 <= budget, kernels
