"""The trainer's graphed step (lash.step_graphs) against its eager step.

CUDA graphs need a GPU. On the CPU a stand-in capture keeps a graph's contract: a warm-up run,
then a capture whose outputs (the loss and every gradient) become the graph's buffers, and
replays that compute the step again from the input buffers and write the results into those
same buffers, leaving every Python-side state (the parameters' ``.grad``) as it was, since a
replay runs no Python. The trainer's side (input buffers, gradients handed to the optimizer, the loss
copied out, signatures, the eager fallbacks) is tested through it; the GPU tests replay real graphs.
"""

import logging
import re

import pytest
import torch

from lash import DeepSupervisionTransformer, Trainer, TrainingConfig
from lash.data import TokenBatches
from lash.parallel import fast_path
from lash.step_graphs import MAX_GRAPHS, StepGraphs, _signature

V = 37
CONFIG = TrainingConfig(layer_weights={1: 0.3, 2: 0.7})


class StandIn:
    """A CUDA graph's semantics on the CPU, counting captures and replays."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail, self.captures, self.replays = fail, 0, 0
        self.params: list[torch.nn.Parameter] = []  # the model's, set by train()

    def __call__(self, body, pool):
        if self.fail is not None:
            raise self.fail
        self.captures += 1
        body()  # the warm-up
        loss, grads = body()  # the capture: its outputs are the graph's buffers

        def replay():
            self.replays += 1
            attributes = [p.grad for p in self.params]
            new_loss, new_grads = body()
            for p, grad in zip(self.params, attributes):
                p.grad = grad
            loss.copy_(new_loss)
            for buffer, grad in zip(grads, new_grads, strict=True):
                if buffer is not None:
                    buffer.copy_(grad)
            return loss, grads

        return replay


def batches(sizes, weighted=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        seq = torch.randint(0, V, (size, 10), generator=g)
        w = torch.rand(size, 9, generator=g) if weighted else None
        out.append((seq[:, :-1], seq[:, 1:]) + ((w,) if weighted else ()))
    return out


def train(data, capture=None, epochs=2, freeze_after=None):
    """Train a fresh model; with ``capture``, through StepGraphs with it. Returns the trainer, the
    model and the epochs' losses."""
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(V, dim=16, num_layers=2, num_heads=2)
    trainer = Trainer(CONFIG, V, progress=False, warmup_steps=2, total_steps=12)
    optimizer = trainer.create_optimizer(model, 1e-2, weight_decay=0.01)
    if capture is not None:
        capture.params = list(model.parameters())
        trainer.graphs = StepGraphs(trainer.device, capture)
    losses = []
    for epoch in range(epochs):
        if epoch == freeze_after:
            model.layers[0].requires_grad_(False)
        losses.append(trainer.train_epoch(model, data, optimizer, grad_clip=0.5))
    return trainer, model, losses


def assert_same_training(a, b):
    (_, model_a, losses_a), (_, model_b, losses_b) = a, b
    assert losses_a == losses_b
    for (name, p), q in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(p, q), name


def test_replayed_steps_train_exactly_as_eager_steps_with_a_ragged_last_batch():
    data = TokenBatches(*batches([43])[0], batch_size=8, shuffle=True, seed=1)  # 5 batches of 8, one of 3
    stand_in = StandIn()
    graphed = train(data, stand_in)
    assert_same_training(graphed, train(data))
    assert stand_in.captures == 2 and stand_in.replays == 12  # a graph per shape, every step a replay
    assert len(graphed[0].graphs.graphs) == 2 and graphed[0].graphs.failed is None


def test_weighted_batches_beyond_the_kept_graphs_run_eagerly():
    data = batches([6, 6, 5, 4, 6, 3], weighted=True)
    stand_in = StandIn()
    graphed = train(data, stand_in)
    assert_same_training(graphed, train(data))
    assert stand_in.captures == MAX_GRAPHS == 2  # batches of 6 and 5; those of 4 and 3 ran eagerly
    assert stand_in.replays == 8  # 4 graphed batches an epoch


def test_frozen_parameters_make_a_new_signature_and_train_as_eager():
    data = batches([5, 5, 5])
    stand_in = StandIn()
    graphed = train(data, stand_in, epochs=3, freeze_after=1)
    assert_same_training(graphed, train(data, epochs=3, freeze_after=1))
    assert stand_in.captures == 2 and stand_in.replays == 9


def test_a_step_that_cannot_be_captured_says_why_once_and_trains_eagerly(caplog):
    data = batches([4, 4, 3])
    with caplog.at_level(logging.WARNING, logger="lash.captured"):
        graphed = train(data, StandIn(RuntimeError("operation not permitted when stream is capturing")))
    assert_same_training(graphed, train(data))
    assert graphed[0].graphs.failed == "RuntimeError: operation not permitted when stream is capturing"
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA graphs: the training step could not be captured (RuntimeError: operation not permitted when stream "
        "is capturing); it runs eagerly"
    ]


def test_a_value_error_in_the_step_is_raised_not_taken_for_a_failed_capture():
    with pytest.raises(ValueError, match="a bad batch"):
        train(batches([4, 4]), StandIn(ValueError("a bad batch")))


def test_each_capture_logs_its_first_steps_seconds(caplog):
    with caplog.at_level(logging.INFO, logger="lash.captured"):
        trainer, _, _ = train(batches([4, 4, 3]), StandIn())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and len(trainer.graphs.capture_seconds) == 2
    for message, shape, seconds in zip(messages, ("4 × 9", "3 × 9"), trainer.graphs.capture_seconds):
        assert message == f"CUDA graphs: the first training step took {seconds:.2f} s, capturing included (batches of {shape})"
        assert float(re.search(r"took ([\d.]+) s", message).group(1)) == round(seconds, 2)  # as e2e_ashem reads it


def test_a_signature_names_shapes_dtypes_and_the_parameters_storage():
    model = DeepSupervisionTransformer(V, dim=16, num_layers=2, num_heads=2)
    params = list(model.parameters())
    x, y = batches([4])[0]
    key = _signature((x, y), params)
    assert _signature((x.clone(), y.clone()), params) == key
    assert _signature((x[:3], y[:3]), params) != key
    assert _signature((x, y, torch.ones(4, 9)), params) != key
    assert _signature((x, y), params[1:]) != key  # a parameter frozen
    params[0].data = params[0].data.clone()  # a parameter moved
    assert _signature((x, y), params) != key


@pytest.mark.parametrize(
    "device, compile, world_size, accum, path",
    [
        ("cuda", None, 1, 1, "graphs"),
        ("cuda", None, 2, 1, "compile"),
        ("cuda", None, 1, 4, "compile"),
        ("cuda", True, 1, 1, "compile"),
        ("cuda", False, 1, 1, "eager"),
        ("cpu", None, 1, 1, "eager"),
        ("cpu", True, 1, 1, "compile"),
    ],
)
def test_the_fast_path_by_device_and_set_up(device, compile, world_size, accum, path):
    assert fast_path(torch.device(device), compile, world_size, accum) == path


def test_the_cpu_default_trains_eagerly():
    trainer = Trainer(CONFIG, V, progress=False, model=DeepSupervisionTransformer(V, dim=16, num_layers=2, num_heads=2))
    assert trainer.fast_path == "eager" and trainer.graphs is None and not trainer.compile


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_graphs_are_the_default_and_train_like_eager_steps(precision):
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 512, (70, 33), generator=g)
    data = TokenBatches(seqs[:, :-1], seqs[:, 1:], batch_size=16, shuffle=True, seed=1)  # a ragged last batch of 6
    runs = []
    for compile in (None, False):
        torch.manual_seed(0)
        model = DeepSupervisionTransformer(512, dim=64, num_layers=4, num_heads=4).cuda()
        trainer = Trainer(TrainingConfig(layer_weights={1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25}), 512, "cuda",
                          progress=False, precision=precision, compile=compile, model=model)  # fmt: skip
        losses = [trainer.train_epoch(model, data, trainer.optimizer) for _ in range(3)]
        runs.append((trainer, model, losses))
    (graphed, graphed_model, graphed_losses), (eager, eager_model, eager_losses) = runs
    assert graphed.fast_path == "graphs" and graphed.graphs.failed is None and len(graphed.graphs.graphs) == 2
    assert eager.graphs is None
    tolerance = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}[precision]
    torch.testing.assert_close(torch.tensor(graphed_losses), torch.tensor(eager_losses), rtol=tolerance, atol=0)
    for p, q in zip(graphed_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=tolerance, atol=tolerance)
