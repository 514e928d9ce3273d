import contextlib
import functools
import logging

import torch

from lash import DeepSupervisionTransformer, Trainer, TrainingConfig, parallel
from lash.optim import create_optimizer
from lash.parallel import PRECISIONS, autocast, full_states, load_full_states, wrap


def test_autocast_is_a_no_op_for_fp32_and_lowers_matmuls_otherwise():
    cpu = torch.device("cpu")
    assert isinstance(autocast(cpu, "fp32"), contextlib.nullcontext)
    with autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert set(PRECISIONS) == {"fp32", "bf16", "fp16"}


def test_one_process_leaves_the_module_as_it_is():
    model = DeepSupervisionTransformer(11, dim=8, num_layers=2, num_heads=2)
    runner, root = wrap(model, model, torch.device("cpu"), 1, "fsdp", False, False)
    assert runner is model and root is None


def test_full_states_round_trip():
    model = DeepSupervisionTransformer(11, dim=8, num_layers=2, num_heads=2)
    optimizer = torch.optim.AdamW(model.parameters())
    model_state, optim_state = full_states(model, optimizer, sharded=False)
    other = DeepSupervisionTransformer(11, dim=8, num_layers=2, num_heads=2)
    load_full_states(other, torch.optim.AdamW(other.parameters()), model_state, optim_state, sharded=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_compile_is_what_the_trainer_is_told_and_off_by_default_on_the_cpu():
    assert Trainer(TrainingConfig(layer_weights={1: 1}), 30, progress=False).compile is False
    assert Trainer(TrainingConfig(layer_weights={1: 1}), 30, progress=False, compile=True).compile is True


def test_compiled_loss_times_its_first_step_once(monkeypatch, caplog):
    # aot_eager traces what inductor would compile, without its C++ codegen.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    model = DeepSupervisionTransformer(30, dim=16, num_layers=2, num_heads=2)
    trainer = Trainer(TrainingConfig(layer_weights={1: 0.5, 2: 0.5}), 30, progress=False, compile=True)
    optimizer = trainer.create_optimizer(model, 1e-3)
    assert isinstance(trainer.runner, parallel.CompiledLoss)
    x = torch.randint(0, 30, (4, 6))
    batches = [(x, x.roll(1, 1)), (x, x.roll(2, 1)), (x[:3], x[:3])]  # a ragged last batch: a second graph
    with caplog.at_level(logging.INFO, logger="lash.parallel"):
        trainer.train_epoch(model, batches, optimizer)
        first = trainer.runner.compile_seconds
        trainer.train_epoch(model, batches, optimizer)
    assert first is not None and first > 0 and trainer.runner.compile_seconds == first
    assert [r.getMessage() for r in caplog.records].count(
        f"torch.compile: the first training step took {first:.1f} s, compiling included") == 1
    eager = Trainer(TrainingConfig(layer_weights={1: 0.5, 2: 0.5}), 30, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(trainer.runner(x, x), eager.compute_loss(model, x, x), rtol=1e-5, atol=1e-5)


def test_the_optimizer_is_fused_on_cuda_only():
    model = DeepSupervisionTransformer(30, dim=16, num_layers=1, num_heads=2)
    optimizer, _ = create_optimizer(model, TrainingConfig(layer_weights={1: 1}), 1e-3)
    assert not optimizer.defaults["fused"]
