"""Every example of the seed description, run with ``lash`` in place of ``ease``."""

import pytest
import torch

from lash import (
    DeepSupervisionTransformer,
    StandardTransformer,
    Trainer,
    TrainingConfig,
    create_deep_supervision_config,
    create_standard_config,
    load_dataset,
)


@pytest.fixture(scope="module")
def loaders():
    data = load_dataset("offline", num_samples=48, batch_size=16, seq_len=16, max_vocab=1000)
    return data.train, data.val


def test_basic_usage_verbatim(loaders):
    train_batches, val_batches = loaders
    import sys

    sys.path.insert(0, "src")

    from lash import DeepSupervisionTransformer, Trainer, TrainingConfig

    # モデル作成
    model = DeepSupervisionTransformer(vocab_size=1000, dim=64, num_layers=3)

    # 設定: LASHの3つのオプションで全てを制御
    config = TrainingConfig(
        layer_weights={1: 0.7, 2: 0, 3: 0.3},  # 層ごとの損失重み
        layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1},  # 層ごとの学習率
        routing_threshold=0.95,  # Early Exit閾値
    )

    # 訓練
    trainer = Trainer(config, vocab_size=1000)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    loss = trainer.train_epoch(model, train_batches, optimizer)

    # 評価
    stats = trainer.evaluate(model, val_batches)
    assert loss > 0 and {"loss", "ppl", "acc", "shallow_ratio", "compute_cost"} <= stats.keys()


PATTERNS = [
    (3, TrainingConfig(layer_weights={1: 0, 2: 0, 3: 1})),
    (3, TrainingConfig(layer_weights={1: 0.33, 2: 0.33, 3: 0.33})),
    (6, TrainingConfig(layer_weights={1: 0, 2: 0, 3: 0.5, 4: 0, 5: 0, 6: 0.5}, routing_threshold=0.95, exit_layer=3)),
    (
        6,
        TrainingConfig(
            layer_weights={1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 1}, layer_lr_scales={1: 1.0, 2: 0.8, 3: 0.6, 4: 0.4, 5: 0.2, 6: 0.1}
        ),
    ),
    (
        6,
        TrainingConfig(
            layer_weights={1: 0.7, 2: 0, 3: 0.3, 4: 0, 5: 0, 6: 0},
            layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1, 4: 0.05, 5: 0.02, 6: 0.01},
            routing_threshold=0.9,
            exit_layer=1,
        ),
    ),
    (3, TrainingConfig(layer_weights={1: 0, 2: 0, 3: 1}, layer_lr_scales={1: 1.0, 2: 0.8, 3: 0.6})),
    (3, create_standard_config(num_layers=3)),
    (3, create_deep_supervision_config(num_layers=3)),
]


@pytest.mark.parametrize("num_layers, config", PATTERNS)
def test_configuration_patterns_train_and_evaluate(loaders, num_layers, config):
    train_batches, val_batches = loaders
    model = DeepSupervisionTransformer(vocab_size=1000, dim=32, num_layers=num_layers, num_heads=4)
    trainer = Trainer(config, vocab_size=1000, progress=False)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    assert trainer.train_epoch(model, train_batches, optimizer) > 0
    stats = trainer.evaluate(model, val_batches)
    assert stats["output_layer"] == config.output_layer
    assert 0 <= stats["shallow_ratio"] <= 1 and stats["compute_cost"] <= 1


def test_early_stopping_example(loaders):
    train_loader, val_loader = loaders
    model = StandardTransformer(vocab_size=1000, dim=32, num_layers=3)
    trainer = Trainer(create_standard_config(num_layers=3), vocab_size=1000, progress=False)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    result = trainer.train_with_early_stopping(
        model=model,
        train_batches=train_loader,
        val_batches=val_loader,
        optimizer=optimizer,
        max_epochs=3,
        patience=1,  # デフォルト値: 1エポック改善なしで停止
        verbose=True,
    )
    assert 1 <= result["total_epochs"] <= 3 and result["best_epoch"] >= 1


def test_patience_defaults_to_one():
    import inspect

    assert inspect.signature(Trainer.train_with_early_stopping).parameters["patience"].default == 1


def test_ashem_config_example():
    from lash import ASHEMConfig

    ashem_config = ASHEMConfig(
        phase1_layers=2,
        hard_example_ratio=0.5,
        phase2_layers=4,
    )
    assert ashem_config.phase2_layers == 4


def test_gpu_check_snippet():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert device in ("cuda", "cpu")
