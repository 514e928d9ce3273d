"""Evaluation and mining replayed from CUDA graphs (lash.captured.forward) against their eager runs.

CUDA graphs need a GPU. On the CPU a stand-in capture keeps a graph's contract: a warm-up run,
then a capture whose output becomes the graph's buffer, and replays that compute the body again
from the input buffers and write the result into that same buffer. ``available`` is patched so
that the CPU counts as a device graphs serve; the GPU tests replay real graphs.
"""

import logging

import pytest
import torch

from lash import DeepSupervisionTransformer, Trainer, TrainingConfig, captured, cuda_graphs
from lash.ashem import score_tokens
from lash.data import TokenBatches
from lash.evaluation import evaluate

V = 41
CPU = torch.device("cpu")
ROUTED = TrainingConfig(layer_weights={3: 1.0}, routing_threshold=0.05, exit_layer=1)
PLAIN = TrainingConfig(layer_weights={1: 0.2, 2: 0.3, 3: 0.5})


class StandIn:
    """A CUDA graph's semantics on the CPU, counting captures and replays."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail, self.captures, self.replays = fail, 0, 0

    def __call__(self, body, pool):
        if self.fail is not None:
            raise self.fail
        self.captures += 1
        body()  # the warm-up
        out = body()  # the capture: its output is the graph's buffer

        def replay():
            self.replays += 1
            out.copy_(body())
            return out

        return replay


@pytest.fixture
def stand_in(monkeypatch):
    capture = StandIn()
    monkeypatch.setattr(captured, "available", lambda device: True)
    monkeypatch.setattr(captured, "CAPTURE", capture)
    return capture


def model_and_data(seed=0, sequences=23, batch_size=8, vocab=V, dim=16, heads=2):
    torch.manual_seed(seed)
    model = DeepSupervisionTransformer(vocab, dim=dim, num_layers=3, num_heads=heads)
    g = torch.Generator().manual_seed(seed + 1)
    seqs = torch.randint(0, vocab, (sequences, 11), generator=g)
    y = seqs[:, 1:].clone()
    y[torch.rand(y.shape, generator=g) < 0.2] = -100  # unlabelled tokens
    return model, TokenBatches(seqs[:, :-1], y, batch_size)  # by default batches of 8, 8 and a ragged 7


@pytest.mark.parametrize("config", [PLAIN, ROUTED], ids=["plain", "routed"])
def test_graphed_evaluation_equals_eager_evaluation_and_captures_each_shape_once(stand_in, config):
    model, data = model_and_data()
    eager = evaluate(model, data, config, CPU, graphs=False)
    assert stand_in.captures == 0
    for call in range(3):  # the later calls replay the graphs the first captured
        assert evaluate(model, data, config, CPU) == eager
        assert (stand_in.captures, stand_in.replays) == (2, 3 * (call + 1))  # a full and a ragged batch; every batch replays
    assert eager["tokens"] > 0 and (eager["shallow_ratio"] > 0) == config.has_routing


def test_one_model_under_two_configs_and_precisions_keeps_a_graph_for_each(stand_in):
    model, data = model_and_data()
    calls = [(PLAIN, "fp32"), (ROUTED, "fp32"), (PLAIN, "bf16"), (ROUTED, "fp32")]
    for config, precision in calls:
        assert evaluate(model, data, config, CPU, precision=precision) == evaluate(
            model, data, config, CPU, precision=precision, graphs=False
        )  # fmt: skip
    assert stand_in.captures == 6  # two shapes each for three keys


def test_graphs_follow_the_weights_trained_between_calls(stand_in):
    model, data = model_and_data()
    before = evaluate(model, data, PLAIN, CPU)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # in place, as an optimizer step: the same graphs read the new values
    after = evaluate(model, data, PLAIN, CPU)
    assert stand_in.captures == 2 and after != before
    assert after == evaluate(model, data, PLAIN, CPU, graphs=False)


def test_weights_that_move_drop_the_models_graphs(stand_in):
    model, data = model_and_data()
    evaluate(model, data, PLAIN, CPU)
    first = captured._MODELS[model].graphs
    model.double()  # every parameter in new storage
    assert evaluate(model, data, PLAIN, CPU) == evaluate(model, data, PLAIN, CPU, graphs=False)
    assert captured._MODELS[model].graphs is not first and stand_in.captures == 4
    cuda_graphs.release(model)
    assert model not in captured._MODELS


def test_signatures_beyond_the_kept_graphs_run_eagerly(stand_in):
    model, data = model_and_data(sequences=40)
    for batch_size in range(3, 3 + captured.MAX_MODEL_GRAPHS + 3):  # more full-batch shapes than the graphs kept
        data = TokenBatches(data.inputs, data.targets, batch_size)
        assert evaluate(model, data, PLAIN, CPU) == evaluate(model, data, PLAIN, CPU, graphs=False)
    assert len(captured._MODELS[model].graphs.graphs) == captured.MAX_MODEL_GRAPHS == stand_in.captures


def test_mined_confidence_is_each_batchs_own_and_equals_eager_mining(stand_in):
    model, data = model_and_data()
    eager = score_tokens(model, data, CPU, graphs=False)
    graphed = score_tokens(model, data, CPU)
    assert stand_in.captures == 2 and stand_in.replays == 3
    assert torch.equal(graphed.confidence, eager.confidence) and graphed.confidence.shape == (23, 10)
    assert not torch.equal(graphed.confidence[:8], graphed.confidence[8:16])  # a replay's buffer was copied out


@pytest.mark.parametrize("first_inside", [True, False])
def test_graphs_serve_calls_in_and_out_of_inference_mode(stand_in, first_inside):
    model, data = model_and_data()
    eager = evaluate(model, data, ROUTED, CPU, graphs=False)
    for inside in (first_inside, not first_inside, first_inside):
        with torch.inference_mode(inside):
            assert evaluate(model, data, ROUTED, CPU) == eager
            assert torch.equal(score_tokens(model, data, CPU).confidence, score_tokens(model, data, CPU, graphs=False).confidence)
    assert stand_in.captures == 4


def test_a_bad_id_is_a_value_error_before_anything_is_captured(stand_in):
    model, data = model_and_data()
    x, y = next(iter(data))
    with pytest.raises(ValueError, match=rf"token id {V} is outside \[0, {V}\)"):
        evaluate(model, [(x, y), (x.clone().fill_(V), y)], PLAIN, CPU)
    with pytest.raises(ValueError, match=rf"target value {V + 3} is outside \[0, {V}\) or -100"):
        score_tokens(model, [(x, y.clone().fill_(V + 3))], CPU)
    assert stand_in.captures == 1  # the good batch's graph only


def test_a_capture_that_fails_says_why_once_and_evaluates_eagerly(monkeypatch, caplog):
    monkeypatch.setattr(captured, "available", lambda device: True)
    monkeypatch.setattr(captured, "CAPTURE", StandIn(RuntimeError("operation not permitted when stream is capturing")))
    model, data = model_and_data()
    with caplog.at_level(logging.WARNING, logger="lash.captured"):
        graphed = [evaluate(model, data, ROUTED, CPU) for _ in range(2)]
    assert graphed == [evaluate(model, data, ROUTED, CPU, graphs=False)] * 2
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA graphs: the evaluation batch could not be captured (RuntimeError: operation not permitted when stream "
        "is capturing); it runs eagerly"
    ]


def test_graphs_off_the_gpu_are_refused_and_the_cpu_default_is_eager(monkeypatch):
    model, data = model_and_data()
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device; it is on cpu"):
        evaluate(model, data, PLAIN, CPU, graphs=True)
    monkeypatch.setattr(captured, "CAPTURE", lambda body, pool: pytest.fail("a graph was captured"))
    assert evaluate(model, data, PLAIN, CPU) == evaluate(model, data, PLAIN, CPU, graphs=False)
    assert model not in captured._MODELS


def test_the_trainer_evaluates_through_graphs_on_its_graphs_path_only(stand_in):
    model, data = model_and_data()
    trainer = Trainer(PLAIN, V, progress=False)
    assert trainer.fast_path == "eager"
    eager = trainer.evaluate(model, data)
    assert stand_in.captures == 0
    trainer.fast_path = "graphs"
    assert trainer.evaluate(model, data) == eager and stand_in.captures == 2


def flat(stats: dict) -> dict:
    """An evaluation's numbers, the per-layer ones included, in one flat dict."""
    per_layer = {f"{layer} {key}": value for layer, values in stats["per_layer"].items() for key, value in values.items()}
    return {key: value for key, value in stats.items() if key != "per_layer"} | per_layer


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_evaluation_and_mining_on_cuda_match_eager(precision):
    model, data = model_and_data(sequences=70, batch_size=16, vocab=512, dim=64, heads=4)  # batches of 16 and a ragged 6
    model.cuda()
    cuda = torch.device("cuda")
    for config in (PLAIN, ROUTED):
        eager = flat(evaluate(model, data, config, cuda, precision=precision, graphs=False))
        for _ in range(2):  # a capture, then replays
            assert flat(evaluate(model, data, config, cuda, precision=precision)) == pytest.approx(eager, rel=1e-4)
    kept = captured._MODELS[model].graphs
    assert kept.failed is None and len(kept.graphs) == 4  # two shapes for each config
    graphed, eager = score_tokens(model, data, cuda), score_tokens(model, data, cuda, graphs=False)
    torch.testing.assert_close(graphed.confidence, eager.confidence, rtol=1e-4, atol=1e-6)
