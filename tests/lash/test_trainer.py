import math

import pytest
import torch
import torch.nn.functional as F

import lash.trainer
import lash.trainer_state
from lash import DeepSupervisionTransformer, StandardTransformer, Trainer, TrainingConfig
from lash.trainer import NonFiniteLossError

V = 41


def make_batches(n=4, B=3, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, V, (B, T + 1), generator=g)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def tiny(num_layers=3, cls=DeepSupervisionTransformer):
    return cls(vocab_size=V, dim=16, num_layers=num_layers, num_heads=2)


def spy_loss(monkeypatch):
    calls = []
    real = lash.trainer_state.multi_exit_loss

    def spy(hiddens, *args, **kwargs):
        calls.append(len(hiddens))
        return real(hiddens, *args, **kwargs)

    monkeypatch.setattr(lash.trainer_state, "multi_exit_loss", spy)
    return calls


def test_fast_path_applies_head_once_and_equals_forward(monkeypatch):
    model = tiny()
    trainer = Trainer(TrainingConfig(layer_weights={1: 0, 2: 0, 3: 1}), vocab_size=V)
    calls = spy_loss(monkeypatch)
    x, y = make_batches(1)[0]
    loss = trainer.compute_loss(model, x, y)
    assert calls == [1]
    torch.testing.assert_close(loss, F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)))


def test_weighted_loss_skips_zero_weight_heads_and_deep_layers(monkeypatch):
    model = tiny(num_layers=6)
    calls = [0] * 6
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    config = TrainingConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3, 4: 0, 5: 0, 6: 0})
    trainer = Trainer(config, vocab_size=V)
    heads = spy_loss(monkeypatch)
    x, y = make_batches(1)[0]
    loss = trainer.compute_loss(model, x, y)
    assert calls == [1, 1, 1, 0, 0, 0] and heads == [2]
    logits = model.forward_all_layers(x)
    expected = 0.7 * F.cross_entropy(logits[0].reshape(-1, V), y.reshape(-1)) + 0.3 * F.cross_entropy(
        logits[2].reshape(-1, V), y.reshape(-1)
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is None for p in model.layers[3:].parameters())


def test_trainer_checks_model_and_device():
    trainer = Trainer(TrainingConfig(layer_weights={4: 1}), vocab_size=V)
    x, y = make_batches(1)[0]
    with pytest.raises(ValueError, match=r"layer index 4 is outside \[1, 3\]"):
        trainer.compute_loss(tiny(), x, y)
    with pytest.raises(ValueError, match="model vocab_size=41 but Trainer vocab_size=40"):
        Trainer(TrainingConfig(layer_weights={3: 1}), vocab_size=40).compute_loss(tiny(), x, y)
    with pytest.raises(ValueError, match="Trainer device is meta"):
        Trainer(TrainingConfig(layer_weights={3: 1}), vocab_size=V, device="meta").compute_loss(tiny(), x, y)
    y = y.clone()
    y[0, 0] = V
    with pytest.raises(ValueError, match=rf"target value {V} is outside"):
        Trainer(TrainingConfig(layer_weights={3: 1}), vocab_size=V).compute_loss(tiny(), x, y)


def test_evaluate_reports_every_exit():
    model = tiny()
    batches = make_batches(2)
    trainer = Trainer(TrainingConfig(layer_weights={1: 0.5, 3: 0.5}), vocab_size=V)
    stats = trainer.evaluate(model, batches)
    with torch.no_grad():
        for layer in (1, 2, 3):
            logits = torch.cat([model.forward_all_layers(x)[layer - 1].reshape(-1, V) for x, _ in batches])
            y = torch.cat([y.reshape(-1) for _, y in batches])
            loss = F.cross_entropy(logits, y).item()
            assert stats["per_layer"][layer]["loss"] == pytest.approx(loss, rel=1e-5)
            assert stats["per_layer"][layer]["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
            assert stats["per_layer"][layer]["acc"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    assert stats["loss"] == stats["per_layer"][3]["loss"] and stats["tokens"] == 2 * 3 * 9
    assert stats["weighted_loss"] == pytest.approx(0.5 * stats["per_layer"][1]["loss"] + 0.5 * stats["per_layer"][3]["loss"])
    assert (stats["shallow_ratio"], stats["compute_cost"]) == (0.0, 1.0)
    assert model.training


def test_routing_extremes_and_mix():
    model = tiny()
    batches = make_batches(2)
    off = Trainer(TrainingConfig(layer_weights={1: 0.5, 3: 0.5}, routing_threshold=0.0), vocab_size=V).evaluate(model, batches)
    assert off["shallow_ratio"] == 0.0 and off["compute_cost"] == 1.0
    config = TrainingConfig(layer_weights={1: 0.5, 3: 0.5}, routing_threshold=1e-9, exit_layer=1)
    everyone = Trainer(config, vocab_size=V).evaluate(model, batches)
    assert everyone["shallow_ratio"] == 1.0 and everyone["compute_cost"] == pytest.approx(1 / 3)
    assert everyone["loss"] == pytest.approx(everyone["per_layer"][1]["loss"])
    with torch.no_grad():
        conf = torch.cat([model.compute_confidence(model.hidden_states(x, [2])[0]).reshape(-1) for x, _ in batches])
    threshold = conf.median().item()
    config = TrainingConfig(layer_weights={2: 0.5, 3: 0.5}, routing_threshold=threshold, exit_layer=2)
    mixed = Trainer(config, vocab_size=V).evaluate(model, batches)
    shallow = (conf >= threshold).float().mean().item()
    assert mixed["shallow_ratio"] == pytest.approx(shallow)
    assert mixed["compute_cost"] == pytest.approx((shallow * 2 + (1 - shallow) * 3) / 3)


def test_early_stopping_with_patience_one_restores_best(monkeypatch):
    model = tiny()
    trainer = Trainer(TrainingConfig(layer_weights={3: 1}), vocab_size=V, progress=False)
    opt = trainer.create_optimizer(model, base_lr=1e-3)
    val_losses = iter([3.0, 2.0, 2.5, 1.0])
    snapshots = []
    real_evaluate = trainer.evaluate

    def scripted_evaluate(m, batches):
        stats = real_evaluate(m, batches)
        snapshots.append(m.output_head.weight.detach().clone())
        return stats | {"loss": next(val_losses)}

    monkeypatch.setattr(trainer, "evaluate", scripted_evaluate)
    result = trainer.train_with_early_stopping(model, make_batches(2), make_batches(1, seed=1), opt, max_epochs=10, verbose=False)
    assert result["val_losses"] == [3.0, 2.0, 2.5]
    assert (result["best_epoch"], result["total_epochs"], result["stopped_early"]) == (2, 3, True)
    assert len(result["train_losses"]) == 3 and len(result["history"]) == 3
    assert not torch.equal(snapshots[1], snapshots[2])
    torch.testing.assert_close(model.output_head.weight, snapshots[1], rtol=0, atol=0)


def test_early_stopping_runs_to_max_epochs_while_improving(monkeypatch):
    model = tiny()
    trainer = Trainer(TrainingConfig(layer_weights={3: 1}), vocab_size=V, progress=False)
    opt = trainer.create_optimizer(model, base_lr=1e-3)
    result = trainer.train_with_early_stopping(model, make_batches(2), make_batches(2), opt, max_epochs=2, patience=5, verbose=True)
    assert result["total_epochs"] == 2 and not result["stopped_early"]
    with pytest.raises(ValueError, match="patience=0 must be an int >= 1"):
        trainer.train_with_early_stopping(model, make_batches(1), make_batches(1), opt, patience=0)


def test_non_finite_loss_names_epoch_and_step_and_keeps_best(monkeypatch):
    model = tiny()
    trainer = Trainer(TrainingConfig(layer_weights={3: 1}), vocab_size=V, progress=False)
    opt = trainer.create_optimizer(model, base_lr=1e-3)
    real = lash.trainer_state.multi_exit_loss
    count = [0]

    def poisoned(*args, **kwargs):
        count[0] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if count[0] == 6 else loss

    monkeypatch.setattr(lash.trainer_state, "multi_exit_loss", poisoned)
    best = {}
    with pytest.raises(NonFiniteLossError, match="at epoch 2, step 2"):
        real_eval = trainer.evaluate

        def remember(m, b):
            best.setdefault("w", m.output_head.weight.detach().clone())
            return real_eval(m, b)

        monkeypatch.setattr(trainer, "evaluate", remember)
        trainer.train_with_early_stopping(model, make_batches(4), make_batches(1), opt, verbose=False)
    torch.testing.assert_close(model.output_head.weight, best["w"], rtol=0, atol=0)


def test_epoch_length_a_multiple_of_the_check_interval():
    model = tiny()
    trainer = Trainer(TrainingConfig(layer_weights={3: 1}), vocab_size=V, progress=False)
    opt = trainer.create_optimizer(model, base_lr=1e-3)
    batches = make_batches(lash.trainer._SYNC_EVERY, B=1, T=3)
    assert math.isfinite(trainer.train_epoch(model, batches, opt))
    assert trainer.global_step == lash.trainer._SYNC_EVERY


def test_tiny_model_overfits_tiny_batch():
    torch.manual_seed(0)
    model = StandardTransformer(vocab_size=V, dim=32, num_layers=2, num_heads=2)
    trainer = Trainer(TrainingConfig(layer_weights={2: 1}), vocab_size=V, progress=False)
    opt = trainer.create_optimizer(model, base_lr=3e-3)
    batch = make_batches(1, B=4, T=12)
    for _ in range(60):
        loss = trainer.train_epoch(model, batch, opt)
    assert loss < 0.2 * math.log(V)
    assert trainer.evaluate(model, batch)["acc"] > 0.9


# --- Exact resume: a run stopped at any step and resumed in a fresh trainer ends bit for bit
# where the uninterrupted run ends. 40 sequences in batches of 8 = 5 batches per epoch; with
# accumulation 2 that is 3 optimizer steps per epoch (the last one on a single batch), 9 steps
# in 3 epochs, under a warm-up + cosine schedule and gradient clipping.
EPOCHS, STEPS = 3, 9


def resume_run(tmp_path, stop_at=None, resume_from=None):
    """Train (from scratch or ``resume_from``) until ``stop_at`` or the end; return what it ended with."""
    from lash.utils import set_seed
    from lash.data import TokenBatches

    set_seed(7)
    g = torch.Generator().manual_seed(3)
    seqs = torch.randint(0, V, (40, 9), generator=g)
    data = TokenBatches(seqs[:, :-1], seqs[:, 1:], batch_size=8, shuffle=True, seed=5)
    model = tiny(2)
    trainer = Trainer(TrainingConfig(layer_weights={1: 0.3, 2: 0.7}), V, progress=False, grad_accum_steps=2,
                      warmup_steps=2, total_steps=STEPS)  # fmt: skip
    optimizer = trainer.create_optimizer(model, 1e-2, weight_decay=0.01)
    if resume_from:
        trainer.load_checkpoint(resume_from)
    losses = []
    while trainer.epochs_trained < EPOCHS and (stop_at is None or trainer.global_step < stop_at):
        losses.append(trainer.train_epoch(model, data, optimizer, grad_clip=0.5, max_steps=stop_at))
    trainer.save_checkpoint(tmp_path / "ckpt.pt")
    val = trainer.evaluate(model, [(seqs[:8, :-1], seqs[:8, 1:])])["loss"]
    return trainer, model, losses, val


@pytest.mark.parametrize("stop_at", [1, 2, 3, 4, 6, 8, 9], ids=lambda s: f"stop{s}")
def test_resume_is_bit_exact_from_any_step(tmp_path, stop_at):
    # 3 and 6 end an epoch exactly; 9 is the last step; the others stop mid-epoch.
    full_trainer, full_model, full_losses, full_val = resume_run(tmp_path / "full")
    part_trainer, _, _, _ = resume_run(tmp_path / "part", stop_at=stop_at)
    assert part_trainer.global_step == stop_at
    assert part_trainer.epochs_trained == stop_at // 3  # an epoch's last step completes it
    trainer, model, losses, val = resume_run(tmp_path / "resumed", resume_from=tmp_path / "part" / "ckpt.pt")
    assert trainer.global_step == full_trainer.global_step == STEPS and trainer.epochs_trained == EPOCHS
    assert val == full_val
    if stop_at % 3 == 0:  # the resumed run's epochs are the full run's last ones
        assert losses == full_losses[len(full_losses) - len(losses) :]
    for (name, p), q in zip(model.state_dict().items(), full_model.state_dict().values()):
        assert torch.equal(p, q), name
    for a, b in zip(trainer.optimizer.param_groups, full_trainer.optimizer.param_groups):
        assert a["lr"] == b["lr"]


def test_epoch_order_depends_on_the_epoch_not_on_earlier_iterations():
    from lash.data import TokenBatches

    seqs = torch.arange(60).view(20, 3) % V
    first, second = (TokenBatches(seqs, seqs, 4, shuffle=True, seed=1) for _ in range(2))
    list(second)  # someone iterated these batches before: the trainer still serves epoch 0's order
    orders = []
    for data in (first, second):
        model = tiny(1)
        trainer = Trainer(TrainingConfig(layer_weights={1: 1}), V, progress=False)
        seen = []
        trainer._runner = lambda m, seen=seen: (lambda x, y: seen.append(x[:, 0].tolist()) or m(x).sum() * 0)
        trainer.train_epoch(model, data, trainer.create_optimizer(model, 1e-3))
        orders.append(seen)
    assert orders[0] == orders[1]


def test_batches_without_labels_take_no_step():
    model = tiny(1)
    trainer = Trainer(TrainingConfig(layer_weights={1: 1}), V, progress=False)
    optimizer = trainer.create_optimizer(model, 1e-2, weight_decay=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, V, (2, 5))
    unlabelled = [(x, torch.full_like(x, -100)), (x[:0], x[:0])]
    with pytest.raises(ValueError, match="no batch with a labelled target"):
        trainer.train_epoch(model, unlabelled, optimizer)
    assert trainer.global_step == 0 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    trainer.train_epoch(model, [*unlabelled, (x, x)], optimizer)
    assert trainer.global_step == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grad_clip": -1.0}, r"grad_clip=-1.0 is outside \[0.0, inf\)"),
        ({"grad_clip": math.nan}, "grad_clip=nan must be a finite number"),
        ({"max_steps": -3}, "max_steps=-3 must be None or an int >= 1"),
        ({"max_steps": 0}, "max_steps=0 must be None or an int >= 1"),
    ],
)
def test_train_epoch_rejects_bad_arguments(kwargs, message):
    model = tiny(1)
    trainer = Trainer(TrainingConfig(layer_weights={1: 1}), V, progress=False)
    optimizer = trainer.create_optimizer(model, 1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        trainer.train_epoch(model, make_batches(2), optimizer, **kwargs)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"config": TrainingConfig(layer_weights={2: 1})}, "was trained with .*layer_weights"),
        ({"grad_accum_steps": 2}, "grad_accum_steps=1, this trainer has grad_accum_steps=2"),
        ({"warmup_steps": 3}, "warmup_steps=0, this trainer has warmup_steps=3"),
        ({"lr": 1e-2}, "lr=0.001 in param group layer_1, this optimizer has 0.01"),
        ({"weight_decay": 0.1}, "weight_decay=0.0 in param group layer_1"),
    ],
)
def test_resuming_under_other_settings_is_refused(tmp_path, change, message):
    model = tiny(2)
    trainer = Trainer(TrainingConfig(layer_weights={1: 0.5, 2: 0.5}), V, progress=False)
    trainer.create_optimizer(model, 1e-3)
    trainer.save_checkpoint(tmp_path / "ckpt.pt")
    other = Trainer(change.get("config", trainer.config), V, progress=False, grad_accum_steps=change.get("grad_accum_steps", 1),
                    warmup_steps=change.get("warmup_steps", 0))  # fmt: skip
    other.create_optimizer(tiny(2), change.get("lr", 1e-3), change.get("weight_decay", 0.0))
    with pytest.raises(ValueError, match=message):
        other.load_checkpoint(tmp_path / "ckpt.pt")


def test_trainer_rejects_unknown_or_missing_devices():
    with pytest.raises(ValueError, match="device='tpu' is not a device"):
        Trainer(TrainingConfig(layer_weights={1: 1}), V, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda': this machine has no cuda device"):
            Trainer(TrainingConfig(layer_weights={1: 1}), V, device="cuda")


def test_epoch_lines_are_printed_once_when_logging_shows_them(capsys):
    import logging
    import sys

    handler, logger = logging.StreamHandler(sys.stdout), logging.getLogger("lash")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        model, trainer = tiny(), Trainer(TrainingConfig(layer_weights={3: 1}), V, progress=False)
        trainer.train_with_early_stopping(model, make_batches(), make_batches(seed=1), trainer.create_optimizer(model, 1e-3), max_epochs=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert capsys.readouterr().out.count("epoch 1: train loss") == 1
    trainer.train_with_early_stopping(model, make_batches(), make_batches(seed=1), trainer.create_optimizer(model, 1e-3), max_epochs=1)
    assert capsys.readouterr().out.count("epoch 1: train loss") == 1  # no handler: printed instead


def test_gradient_accumulation_equals_the_big_batch():
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 30, (8, 11), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]
    params = []
    for accum, batches in ((1, [(x, y)]), (2, [(x[:4], y[:4]), (x[4:], y[4:])])):
        torch.manual_seed(1)
        model = DeepSupervisionTransformer(30, dim=16, num_layers=2, num_heads=2)
        trainer = Trainer(TrainingConfig(layer_weights={1: 0.5, 2: 0.5}), 30, progress=False, grad_accum_steps=accum)
        trainer.train_epoch(model, batches, trainer.create_optimizer(model, 1e-2), grad_clip=None)
        assert trainer.global_step == 1
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[0], params[1], atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_on_cuda_never_wait_for_the_device(precision):
    model = DeepSupervisionTransformer(vocab_size=512, dim=64, num_layers=4, num_heads=4).cuda()
    config = TrainingConfig(layer_weights={1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25})
    trainer = Trainer(config, vocab_size=512, device="cuda", precision=precision, progress=False)
    batch = (torch.randint(0, 512, (8, 32)), torch.randint(0, 512, (8, 32)))

    def batches():
        yield batch  # warm-up step: kernels compile, the allocator and optimizer state fill
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync in the next steps raises
        yield batch
        yield batch
        torch.cuda.set_sync_debug_mode("default")  # the epoch's closing report may sync

    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    try:
        trainer.train_epoch(model, batches(), optimizer, grad_clip=1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def weighted_ce_float64(model, x, y, w, layer_weights):
    """Σ_l w_l · Σ t·CE / Σ t over labelled tokens, from the model's logits in float64."""
    t = w.double().reshape(-1) * (y.reshape(-1) != -100)
    logits = model.forward_all_layers(x)
    return sum(
        weight * (t * F.cross_entropy(logits[layer - 1].double().reshape(-1, V), y.reshape(-1), reduction="none")).sum() / t.sum()
        for layer, weight in layer_weights.items()
    )


def test_token_weighted_batches_train_on_the_weighted_mean():
    layer_weights = {1: 0.4, 2: 0.0, 3: 0.6}
    x, y = make_batches(1)[0]
    y = y.clone()
    y[0, :2] = -100
    w = torch.rand(y.shape)
    w[1, ::2] = 0.0
    torch.manual_seed(0)
    model = tiny()
    trainer = Trainer(TrainingConfig(layer_weights=layer_weights), V, progress=False)
    expected = weighted_ce_float64(model, x, y, w, layer_weights)
    torch.testing.assert_close(trainer.compute_loss(model, x, y, w).double(), expected, atol=1e-5, rtol=1e-5)
    expected.backward()
    expected_grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    # SGD at rate 1 without clipping: each parameter moves by exactly minus its gradient.
    trainer.train_epoch(model, [(x, y, w)], torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=None)
    assert trainer.global_step == 1
    for p, b, g in zip(model.parameters(), before, expected_grads):
        torch.testing.assert_close(b - p.detach(), g.float(), atol=1e-5, rtol=1e-4)


def test_batches_whose_labelled_tokens_weigh_zero_take_no_step():
    model = tiny(1)
    trainer = Trainer(TrainingConfig(layer_weights={1: 1}), V, progress=False)
    optimizer = trainer.create_optimizer(model, 1e-2, weight_decay=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, V, (2, 5))
    y = x.clone()
    y[0] = -100
    only_on_ignored = torch.zeros(2, 5)
    only_on_ignored[0] = 1.0
    weightless = [(x, y, torch.zeros(2, 5)), (x, y, only_on_ignored)]
    with pytest.raises(ValueError, match="no batch with a labelled target"):
        trainer.train_epoch(model, weightless, optimizer)
    assert trainer.global_step == 0 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    trainer.train_epoch(model, [*weightless, (x, y, torch.ones(2, 5))], optimizer)
    assert trainer.global_step == 1


@pytest.mark.parametrize(
    ("w", "message"),
    [
        (torch.ones(5, 2), r"token_weights must have shape \(2, 5\) to match the targets; got \(5, 2\)"),
        (torch.full((2, 5), -1.0), "token weight -1.0 is negative or not finite"),
        (torch.ones(2, 5, dtype=torch.long), "must be a floating-point tensor"),
    ],
)
def test_bad_token_weights_are_refused_before_any_step(w, message):
    model = tiny(1)
    trainer = Trainer(TrainingConfig(layer_weights={1: 1}), V, progress=False)
    optimizer = trainer.create_optimizer(model, 1e-2)
    x = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match=message):
        trainer.train_epoch(model, [(x, x, w)], optimizer)
    with pytest.raises(ValueError, match=r"\(x, y\) or \(x, y, w\); got 4 tensors"):
        trainer.train_epoch(model, [(x, x, w, w)], optimizer)
    assert trainer.global_step == 0


def test_a_trainer_given_its_model_owns_it_and_its_optimizer_from_the_start():
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(30, dim=16, num_layers=2, num_heads=2)
    trainer = Trainer(TrainingConfig(layer_weights={2: 1.0}), 30, progress=False, model=model, lr=3e-3)
    assert trainer.model is model and trainer.optimizer.param_groups[0]["lr"] == 3e-3
    x = torch.randint(0, 30, (4, 6))
    trainer.train_epoch(model, [(x, x)], trainer.optimizer)
    assert trainer.global_step == 1 and set(trainer.state_dict()) == {"model", "optimizer", "trainer", "config"}


def test_load_state_dict_restores_what_state_dict_saw():
    torch.manual_seed(0)
    make = lambda: Trainer(TrainingConfig(layer_weights={2: 1.0}), 30, progress=False,  # noqa: E731
                           model=DeepSupervisionTransformer(30, dim=16, num_layers=2, num_heads=2))  # fmt: skip
    a, b = make(), make()
    x = torch.randint(0, 30, (4, 6))
    a.train_epoch(a.model, [(x, x), (x, x.roll(1, 1))], a.optimizer)
    b.load_state_dict(a.state_dict())
    assert (b.global_step, b.epochs_trained) == (a.global_step, a.epochs_trained) == (2, 1)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    a.train_epoch(a.model, [(x, x)], a.optimizer)
    b.train_epoch(b.model, [(x, x)], b.optimizer)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
