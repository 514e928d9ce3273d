import pytest
import torch

from lash import Trainer, TrainingConfig
from lash.optim import warmup_cosine
from tests.lash.test_trainer import V, make_batches, tiny


def test_warmup_cosine_schedule_keeps_per_layer_scales():
    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in (1.0, 0.5)]
    opt = torch.optim.SGD(groups, lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    seen = []
    for _ in range(7):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[0] == [0.5, 0.25] and seen[1] == [1.0, 0.5]
    assert seen[4][0] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.5)).item()))
    assert seen[6] == pytest.approx([0.1, 0.05])
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        warmup_cosine(opt, -1, None)


def test_param_groups_follow_layer_lr_scales():
    model = tiny(num_layers=6)
    scales = {1: 1.0, 2: 0.8, 3: 0.6, 4: 0.4, 5: 0.2, 6: 0.1}
    trainer = Trainer(TrainingConfig(layer_weights={6: 1}, layer_lr_scales=scales), vocab_size=V)
    opt = trainer.create_optimizer(model, base_lr=1e-3, weight_decay=0.01)
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == [f"layer_{i}" for i in range(1, 7)] + ["embedding_head"]
    for layer, scale in scales.items():
        assert groups[f"layer_{layer}"]["lr"] == pytest.approx(1e-3 * scale)
        assert {id(p) for p in groups[f"layer_{layer}"]["params"]} == {id(p) for p in model.layers[layer - 1].parameters()}
    assert groups["embedding_head"]["lr"] == 1e-3
    assert {id(p) for p in groups["embedding_head"]["params"]} == {id(model.embedding.weight), id(model.output_head.weight)}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="base_lr=0"):
        trainer.create_optimizer(model, base_lr=0)


def test_lr_scales_change_per_layer_step_size():
    model = tiny(num_layers=2)
    config = TrainingConfig(layer_weights={1: 0.5, 2: 0.5}, layer_lr_scales={1: 1.0, 2: 1e-6})
    trainer = Trainer(config, vocab_size=V, progress=False)
    opt = trainer.create_optimizer(model, base_lr=1e-2)
    before = [p.detach().clone() for p in model.layers.parameters()]
    trainer.train_epoch(model, make_batches(1), opt)
    n1 = len(list(model.layers[0].parameters()))
    moved = [(p - b).abs().max().item() for p, b in zip(model.layers.parameters(), before)]
    assert min(moved[:n1]) > 1e-4 > max(moved[n1:]) * 10
