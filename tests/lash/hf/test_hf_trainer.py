"""lash.hf under transformers.Trainer: gradient accumulation, per-layer rates and evaluation, end to end."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainingArguments  # noqa: E402

from lash.config import TrainingConfig  # noqa: E402
from lash.hf import apply_lash, layer_param_groups  # noqa: E402
from tests.lash.hf.tiny import VOCAB, tiny_model  # noqa: E402

EXITS = {1: 0.3, 2: 0.2, 3: 0.5}


def examples(count: int, length: int = 8) -> list[dict[str, torch.Tensor]]:
    """``count`` random examples ``{input_ids, labels}`` (T,); row r ignores its first ``r % 7`` labels."""
    input_ids = torch.randint(0, VOCAB, (count, length))  # (B, T)
    labels = input_ids.clone()
    for row in range(count):
        labels[row, : row % 7] = -100  # labelled tokens differ between any two micro-batches
    return [dict(input_ids=ids, labels=targets) for ids, targets in zip(input_ids, labels)]


def make_trainer(model, tmp_path, optimizer=None, train=None, evaluate=None, **args) -> Trainer:
    """A CPU ``Trainer`` reading examples in order, with a constant rate, no clipping, saving nor reports."""
    arguments = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, train_sampling_strategy="sequential",
        lr_scheduler_type="constant", max_grad_norm=0.0, **args,
    )  # fmt: skip
    return Trainer(model=model, args=arguments, train_dataset=train, eval_dataset=evaluate, optimizers=(optimizer, None))


def train_sgd(model, data, tmp_path, batch_size: int, accumulation: int, pass_num_items: bool = True) -> list[float]:
    """Three SGD steps of ``batch_size × accumulation`` examples each; returns the logged step losses.

    ``pass_num_items=False`` makes ``Trainer`` treat the model as one without loss kwargs: it then
    averages each micro-batch on its own and divides by the accumulation steps.
    """
    trainer = make_trainer(
        model, tmp_path, torch.optim.SGD(model.parameters(), lr=0.5), train=data, max_steps=3,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
    )  # fmt: skip
    assert trainer.model_accepts_loss_kwargs  # the patched forward takes **kwargs: num_items_in_batch arrives
    trainer.model_accepts_loss_kwargs = pass_num_items
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    """Batches of 4 and 2 × 2 accumulated micro-batches train to the same parameters and step losses.

    The micro-batches hold different numbers of labelled tokens, so they add up to the large batch
    only through ``num_items_in_batch``, which ``Trainer`` passes to the patched forward.
    """
    torch.manual_seed(0)
    model = apply_lash(tiny_model("llama"), TrainingConfig(EXITS))
    data = examples(12)
    large, accumulated = copy.deepcopy(model), copy.deepcopy(model)
    large_losses = train_sgd(large, data, tmp_path, batch_size=4, accumulation=1)
    accumulated_losses = train_sgd(accumulated, data, tmp_path, batch_size=2, accumulation=2)
    assert len(large_losses) == 3
    assert accumulated_losses == pytest.approx(large_losses, rel=1e-6, abs=1e-6)
    for before, a, b in zip(model.parameters(), large.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    moved = max((a - before).abs().max().item() for before, a in zip(model.parameters(), large.parameters()))
    assert moved > 1e-2, "the three steps should change the parameters"


def test_without_num_items_in_batch_accumulation_would_differ(tmp_path):
    """The control: averaging each micro-batch alone (no ``num_items_in_batch``) trains elsewhere,
    so the data of the test above can tell a wrong normalisation."""
    torch.manual_seed(0)
    model = apply_lash(tiny_model("llama"), TrainingConfig(EXITS))
    data = examples(12)
    large, averaged = copy.deepcopy(model), copy.deepcopy(model)
    large_losses = train_sgd(large, data, tmp_path, batch_size=4, accumulation=1)
    averaged_losses = train_sgd(averaged, data, tmp_path, batch_size=2, accumulation=2, pass_num_items=False)
    assert abs(averaged_losses[0] - large_losses[0]) > 1e-3
    gap = max((a - b).abs().max().item() for a, b in zip(large.parameters(), averaged.parameters()))
    assert gap > 1e-4


def test_layer_param_groups_train_under_trainer_at_their_rates(tmp_path):
    """AdamW over ``layer_param_groups`` runs under ``Trainer``: the loss on a repeated batch falls
    over 10 steps, and layer 1 at a tenth of the rate moves far less than layer 2."""
    torch.manual_seed(0)
    config = TrainingConfig(EXITS, layer_lr_scales={1: 0.1})
    model = apply_lash(tiny_model("llama"), config)
    before = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(layer_param_groups(model, config, base_lr=1e-2))
    trainer = make_trainer(model, tmp_path, optimizer, train=examples(4), max_steps=10, per_device_train_batch_size=4)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.1

    def mean_change(layer: int) -> float:
        pairs = zip(model.model.layers[layer].parameters(), before.model.layers[layer].parameters())
        changes = [(a - b).abs().flatten() for a, b in pairs]
        return torch.cat(changes).mean().item()

    assert 0 < mean_change(0) < 0.3 * mean_change(1)


def test_evaluate_reports_the_lash_loss_in_eval_mode(tmp_path):
    """``Trainer.evaluate`` gets LASH's weighted loss from the patched forward (labels mean the loss
    in eval mode too): eval_loss is the mean of the direct loss over its two equal batches."""
    torch.manual_seed(0)
    model = apply_lash(tiny_model("llama"), TrainingConfig(EXITS))
    data = examples(8)
    metrics = make_trainer(model, tmp_path, evaluate=data, per_device_eval_batch_size=4).evaluate()
    assert not model.training
    input_ids = torch.stack([row["input_ids"] for row in data])  # (8, T)
    labels = torch.stack([row["labels"] for row in data])  # (8, T)
    with torch.no_grad():
        halves = [model(input_ids=input_ids[rows], labels=labels[rows]).loss for rows in (slice(0, 4), slice(4, 8))]
    assert metrics["eval_loss"] == pytest.approx(((halves[0] + halves[1]) / 2).item(), rel=1e-6)
