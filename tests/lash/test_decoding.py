"""The decoding engine (lash.decoding) through the LASH adapter: exactness, the deep fill, host reads, stats."""

import pytest
import torch

from lash import DeepSupervisionTransformer
from lash import decoding_parts
from lash.decoding import MAX_PENDING
from lash.generation import generate

from .counting import OpCounter

V, DIM, LAYERS, HEADS, PROMPT = 37, 32, 4, 4, 6
STATS = {"shallow_ratio", "compute_cost", "executed_layer_ratio", "acceptance_rate"}


def make_model(deep_scale=1.0, head_scale=4.0, dtype=torch.float64, weight_scale=1.0):
    """``deep_scale`` < 1 shrinks layers 2+'s residual updates so shallow exits often agree with
    the last layer (speculative drafts then get both accepted and rejected); ``weight_scale`` > 1
    scales every matrix, so the keys and values an exited token leaves in the deep layers change
    later predictions."""
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(V, DIM, LAYERS, HEADS, max_seq_len=64, exit_layer=2).to(dtype).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(weight_scale)
        model.output_head.weight.mul_(head_scale)
        for block in model.layers[1:]:
            block.attn.o_proj.weight.mul_(deep_scale)
            block.ffn.w2.weight.mul_(deep_scale)
    return model


def prompts(batch, seed=0):
    return torch.randint(0, V, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))


def split_threshold(model, x, exit_layer=2):
    """A threshold that some generated tokens reach and others do not: the middle of the widest gap
    between the middle half of their confidences, so that no token sits on it (a GPU's graphed and
    eager steps may round a confidence differently, and a token at the threshold would then exit
    in one and not the other)."""
    with torch.no_grad():
        out = generate(model, x, 12)
        conf = model.compute_confidence(model.hidden_states(out, [exit_layer])[0])[:, PROMPT:]
    ordered = conf.flatten().sort().values
    middle = ordered[len(ordered) // 4 : 3 * len(ordered) // 4 + 1]
    widest = int((middle[1:] - middle[:-1]).argmax())
    return float((middle[widest] + middle[widest + 1]) / 2)


@torch.no_grad()
def reference(model, x, n, exit_layer=None, threshold=None, rule="row"):
    """Greedy decoding recomputed from scratch at every step with the model's own forward.

    With a threshold, a generated token (not the first, which the prefilled prompt predicts)
    takes the exit layer's prediction where that layer is confident: exact deep states for every
    earlier token, which is what ``deep_fill="recompute"`` keeps in its caches.
    """
    decisions = []
    for step in range(n):
        h_exit, h_last = model.hidden_states(x, [exit_layer or 1, model.num_layers])
        logits = model.output_head(h_last[:, -1])
        if threshold is not None and step > 0:
            exit_logits = model.output_head(h_exit[:, -1])
            exited = model.compute_confidence(h_exit[:, -1:])[:, 0] >= threshold  # (B,)
            if rule == "batch":
                exited = exited.all().expand_as(exited)
            logits = torch.where(exited[:, None], exit_logits, logits)
            decisions.append(exited)
        x = torch.cat((x, logits.argmax(-1, keepdim=True)), dim=1)
    return x, (torch.stack(decisions, dim=1) if decisions else None)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", [{}, {"routing_threshold": 1.0}, {"speculative": True, "draft_tokens": 1},
                                  {"speculative": True, "draft_tokens": 4, "exit_layer": 1},
                                  {"speculative": True, "draft_tokens": 3, "exit_layer": 3}])  # fmt: skip
def test_greedy_modes_equal_recomputation(batch, mode):
    model, x = make_model(deep_scale=0.1), prompts(batch)
    out, stats = generate(model, x, 15, return_stats=True, **mode)
    assert out.shape == (batch, PROMPT + 15) and set(stats) == STATS
    assert torch.equal(out, reference(model, x, 15)[0])


@pytest.mark.parametrize("rule", ["row", "batch"])
@pytest.mark.parametrize("batch", [1, 3])
def test_recompute_early_exit_is_exact_deep_states_with_exit_predictions(rule, batch):
    model, x = make_model(), prompts(batch)
    threshold = split_threshold(model, x)
    out, stats = generate(model, x, 14, routing_threshold=threshold, exit_batching=rule, return_stats=True)
    expected, decisions = reference(model, x, 14, 2, threshold, rule)
    assert torch.equal(out, expected)
    assert 0 < decisions.sum() < decisions.numel()  # the threshold splits the tokens
    assert stats["shallow_ratio"] == pytest.approx(decisions.sum().item() / (batch * 14))


@torch.no_grad()
def propagated_reference(model, x, n, exit_layer, threshold):
    """CALM: an exited generated token keeps its exit-layer state in every deeper layer, held there
    by hooks while the model's own forward recomputes the whole sequence at every step."""
    held = torch.zeros(x.shape, dtype=torch.bool)
    state = {}

    def keep_exit(module, args, output):
        state["exit"] = output

    def hold(module, args, output):
        return torch.where(held[:, : output.shape[1], None], state["exit"], output)

    hooks = [model.layers[exit_layer - 1].register_forward_hook(keep_exit)]
    hooks += [block.register_forward_hook(hold) for block in model.layers[exit_layer:]]
    try:
        for step in range(n):
            h_last = model.hidden_states(x)[-1]
            logits = model.output_head(h_last[:, -1])
            exited = torch.zeros(x.shape[0], dtype=torch.bool)
            if step > 0:
                exited = model.compute_confidence(state["exit"][:, -1:])[:, 0] >= threshold
                logits = torch.where(exited[:, None], model.output_head(state["exit"][:, -1]), logits)
            held = torch.cat((held[:, :-1], exited[:, None], torch.zeros_like(exited)[:, None]), dim=1)
            x = torch.cat((x, logits.argmax(-1, keepdim=True)), dim=1)
    finally:
        for hook in hooks:
            hook.remove()
    return x


@pytest.mark.parametrize("batch", [1, 3])
def test_propagate_early_exit_follows_calms_rule(batch):
    model, x = make_model(weight_scale=3.0), prompts(batch)
    threshold = split_threshold(model, x)
    out = generate(model, x, 14, routing_threshold=threshold, deep_fill="propagate")
    expected = propagated_reference(model, x, 14, 2, threshold)
    assert torch.equal(out, expected)
    assert not torch.equal(expected, reference(model, x, 14, 2, threshold)[0])  # the two fills do differ here


def _keep_cache(monkeypatch) -> list:
    caches = []
    new_cache = decoding_parts.LashParts.new_cache
    monkeypatch.setattr(decoding_parts.LashParts, "new_cache", lambda self, *a: caches.append(new_cache(self, *a)) or caches[-1])
    return caches


def test_recompute_fills_the_deep_caches_with_the_plain_runs_keys_and_values(monkeypatch):
    model, x = make_model(), prompts(3)
    caches = _keep_cache(monkeypatch)
    plain = generate(model, x, 3 * MAX_PENDING)
    out, stats = generate(model, x, 3 * MAX_PENDING, routing_threshold=0.0, return_stats=True)  # every step exits
    # Every MAX_PENDING + 1 tokens the deep layers catch up: what they cached equals a plain run's
    # cache for the same tokens.
    assert stats["shallow_ratio"] == pytest.approx((3 * MAX_PENDING - 1) / (3 * MAX_PENDING))
    filled = PROMPT + 2 * (MAX_PENDING + 1)
    replay = generate(model, out[:, :filled], 1)  # a plain run over the early-exit run's tokens
    assert torch.equal(replay[:, :filled], out[:, :filled]) and plain.shape == out.shape
    routed, replayed = caches[1], caches[2]
    for cache_a, cache_b in ((routed.keys, replayed.keys), (routed.values, replayed.values)):
        torch.testing.assert_close(cache_a[:, :, :, :filled], cache_b[:, :, :, :filled], rtol=1e-12, atol=1e-12)


def test_pending_tokens_are_filled_every_max_pending_tokens():
    model, x = make_model(), prompts(2)
    new = 2 * (MAX_PENDING + 1) + 1
    _, stats = generate(model, x, new, routing_threshold=0.0, return_stats=True)
    # The first token runs every layer; each later one 2 layers, and the deep 2 catch up twice on 16 rows.
    evals = LAYERS + (new - 1) * 2 + 2 * (MAX_PENDING + 1) * 2
    assert stats["executed_layer_ratio"] == pytest.approx(evals / (new * LAYERS))


@pytest.mark.parametrize("mode", [{}, {"routing_threshold": "split"}, {"routing_threshold": "split", "deep_fill": "propagate"},
                                  {"speculative": True, "draft_tokens": 3}])  # fmt: skip
def test_executed_layer_ratio_counts_the_layer_calls(monkeypatch, mode):
    model, x = make_model(deep_scale=0.1), prompts(3)
    if mode.get("routing_threshold") == "split":
        mode = {**mode, "routing_threshold": split_threshold(model, x)}
    calls = []
    for block in model.layers:
        monkeypatch.setattr(block, "forward", lambda h, *a, f=block.forward: calls.append(h.shape[1]) or f(h, *a))
    new = 20
    _, stats = generate(model, x, new, return_stats=True, **mode)
    # Rows run together: a call on (B, n, D) is n token evaluations of one layer for every row.
    evaluated = sum(calls) - (PROMPT - 1) * LAYERS  # the prompt's prefill, less its last position's
    if mode.get("deep_fill") == "propagate":  # propagation writes keys and values, it runs no layer
        assert stats["executed_layer_ratio"] * new * LAYERS <= evaluated
    else:
        assert stats["executed_layer_ratio"] * new * LAYERS == pytest.approx(evaluated, rel=0.02)


@pytest.mark.parametrize("mode", [{}, {"routing_threshold": "split"}, {"routing_threshold": 0.0, "deep_fill": "propagate"},
                                  {"speculative": True, "draft_tokens": 3}, {"speculative": True, "draft_tokens": 1}])  # fmt: skip
@pytest.mark.parametrize("eos", [None, "some"])
def test_at_most_one_host_read_per_generated_token(mode, eos):
    model, x = make_model(deep_scale=0.1, dtype=torch.float32), prompts(3)
    if mode.get("routing_threshold") == "split":
        mode = {**mode, "routing_threshold": split_threshold(model, x)}
    # Ids no row generates in its first 20 tokens: checked for at every token, never found.
    seen = set(generate(model, x, 20)[:, PROMPT:].flatten().tolist())
    eos_ids = None if eos is None else [t for t in range(V) if t not in seen][:3]
    assert eos is None or eos_ids
    reads = {}
    for new in (10, 20):  # per generated token: the difference; per call (checks, stats): the rest
        with OpCounter() as counter:
            out = generate(model, x, new, eos_token_id=eos_ids, **mode)
        assert out.shape[1] == PROMPT + new
        reads[new] = len(counter.host_reads)
    assert reads[20] - reads[10] <= 10, reads
    assert reads[10] <= 10 + 3, reads


def test_sampling_with_top_p_keeps_the_most_likely_token_and_a_generator_repeats():
    model, x = make_model(deep_scale=0.3), prompts(2)
    greedy = generate(model, x, 10)
    assert torch.equal(generate(model, x, 10, temperature=1.0, top_p=1e-9, generator=torch.Generator().manual_seed(1)), greedy)
    runs = [generate(model, x, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], greedy)


def test_left_padded_prompts_decode_like_unpadded_ones():
    model = make_model()
    x = prompts(3)
    short = x[1:2, 2:]  # row 1 without its first two tokens
    padded = x.clone()
    padded[1, :2] = 0
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    for mode in ({}, {"speculative": True, "draft_tokens": 3}, {"routing_threshold": split_threshold(model, x)}):
        out = generate(model, padded, 10, attention_mask=mask, **mode)
        alone = generate(model, short, 10, **mode)
        assert torch.equal(out[1, 2:], alone[0]), mode
        assert torch.equal(out[0], generate(model, x[:1], 10, **mode)[0]), mode


@pytest.mark.parametrize("mode", [{}, {"speculative": True, "draft_tokens": 3}, {"routing_threshold": 1.0}])
def test_eos_stops_rows_and_pads_them(mode):
    model, x = make_model(deep_scale=0.1), prompts(3)
    plain = generate(model, x, 12)
    eos = [int(plain[0, PROMPT + 2]), int(plain[1, PROMPT + 4])]
    out = generate(model, x, 12, eos_token_id=eos, pad_token_id=V - 1, **mode)
    for row in range(3):
        new = plain[row, PROMPT:].tolist()
        stop = next((i for i, t in enumerate(new) if t in eos), None)
        want = new if stop is None else new[: stop + 1] + [V - 1] * (len(new) - stop - 1)
        assert out[row, PROMPT:].tolist() == want[: out.shape[1] - PROMPT], (row, mode)


@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_each_row_keeps_its_own_drafts(draft_tokens):
    """At batch > 1 one row's rejection does not cut the others' drafts: the batch accepts about
    what its rows accept alone, not the fewest any row keeps (the runs differ only in the last
    steps, where the drafts are capped by the row with the fewest tokens)."""
    model, x = make_model(deep_scale=0.1), prompts(3)
    rate = generate(model, x, 30, speculative=True, draft_tokens=draft_tokens, return_stats=True)[1]["acceptance_rate"]
    alone = [generate(model, x[i : i + 1], 30, speculative=True, draft_tokens=draft_tokens, return_stats=True)[1]
             ["acceptance_rate"] for i in range(3)]  # fmt: skip
    assert min(alone) < max(alone)  # the rows differ
    assert rate > min(alone) and rate == pytest.approx(sum(alone) / 3, abs=0.1)


@pytest.mark.parametrize("draft_tokens", [2, 4])
def test_rows_ahead_stay_within_the_models_positions(draft_tokens):
    """A row that kept more drafts than another, or has all its tokens, drafts past its last kept
    token; with the prompt and new tokens filling ``max_seq_len``, those positions must not run
    past the RoPE tables (an IndexError here, an out-of-bounds read on CUDA)."""
    model, x = make_model(deep_scale=0.1), prompts(3)
    new = model.max_seq_len - PROMPT
    out, stats = generate(model, x, new, speculative=True, draft_tokens=draft_tokens, return_stats=True)
    assert torch.equal(out, generate(model, x, new)) and 0 < stats["acceptance_rate"] < 1


def test_a_call_runs_its_last_layer_only_for_the_tokens_it_returns():
    """A deep step's pending tokens need their keys and values from the last layer, not its output:
    the last layer projects q, runs attention, o_proj and the FFN for the returned tokens alone."""
    from torch.utils.flop_counter import FlopCounterMode

    from lash.decoding import DecodeState
    from lash.modules import inference_weights

    model, n, start = make_model(), 5, 3
    parts = decoding_parts.LashParts(model)
    h = torch.randn(2, n, DIM, dtype=torch.float64)
    positions = torch.arange(start, start + n).expand(2, n)
    results, flops = {}, {}
    with torch.no_grad(), inference_weights(model):
        for outputs in (None, 1, 2):
            state = DecodeState(parts.new_cache(2, 16), torch.ones(2, 16, dtype=torch.bool), torch.arange(16).expand(2, 16))
            torch.manual_seed(1)  # the same earlier columns, which the queries read, in every call
            state.cache.keys[:, :, :, :start].normal_()
            state.cache.values[:, :, :, :start].normal_()
            with FlopCounterMode(display=False) as counter:
                results[outputs] = parts.run(h, start, positions, range(1, LAYERS), state, outputs=outputs), state.cache
            flops[outputs] = counter.get_total_flops()
    full, full_cache = results[None]
    for outputs in (1, 2):
        out, cache = results[outputs]
        assert out.shape == (2, outputs, DIM)
        torch.testing.assert_close(out, full[:, n - outputs :], rtol=1e-12, atol=1e-12)
        assert torch.equal(cache.keys, full_cache.keys) and torch.equal(cache.values, full_cache.values)
    ffn = model.layers[0].ffn.w2.weight.shape[1]
    per_token = 2 * (DIM * DIM + 3 * DIM * ffn)  # o_proj and the FFN of the last layer
    assert flops[None] - flops[1] >= (n - 1) * per_token
    assert flops[2] - flops[1] >= per_token
