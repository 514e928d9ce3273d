"""Checkpoints: safe to load (no pickle runs code), old files refused with a way out, damage caught."""

import pickle
import re
from pathlib import Path

import pytest
import torch

from lash import DeepSupervisionTransformer, Trainer, TrainingConfig, checkpoint, cli

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["train", "--dataset", "offline", "--samples", "32", "--val-samples", "8", "--seq-len", "8",
        "--batch-size", "16", "--num-layers", "2", "--dim", "16", "--num-heads", "2", "--max-vocab", "64",
        "--no-progress", "--max-steps", "2"]  # fmt: skip


class Evil:
    """Unpickling this creates ``marker``: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def trained(tmp_path: Path) -> tuple[Trainer, Path]:
    model = DeepSupervisionTransformer(30, dim=16, num_layers=2, num_heads=2)
    trainer = Trainer(TrainingConfig(layer_weights={1: 0.5, 2: 0.5}), 30, progress=False)
    trainer.create_optimizer(model, 1e-3)
    x = torch.randint(0, 30, (4, 6))
    trainer.train_epoch(model, [(x, x)], trainer.optimizer)
    path = tmp_path / "good.pt"
    trainer.save_checkpoint(path, extra={"note": "kept"})
    return trainer, path


def malicious_files(tmp_path: Path, good: Path, marker: Path) -> dict[str, Path]:
    """A bare evil pickle (zip and legacy), and an otherwise valid checkpoint hiding one."""
    files = {name: tmp_path / f"{name}.pt" for name in ("bare", "legacy", "hidden")}
    torch.save({"format": checkpoint.FORMAT, "model": Evil(marker)}, files["bare"])
    with open(files["legacy"], "wb") as f:
        pickle.dump(Evil(marker), f)
    payload = torch.load(good, weights_only=True)
    payload["extra"]["note"] = Evil(marker)
    torch.save(payload, files["hidden"])
    return files


def test_loading_a_malicious_checkpoint_never_runs_its_code(tmp_path, capsys):
    trainer, good = trained(tmp_path)
    marker = tmp_path / "pwned"
    before = {name: t.clone() for name, t in trainer.model.state_dict().items()}
    for name, path in malicious_files(tmp_path, good, marker).items():
        with pytest.raises(ValueError, match="refused|unreadable") as error:
            trainer.load_checkpoint(path)
        if name == "hidden":
            assert "io.open" in str(error.value)
        out = tmp_path / f"run-{name}"
        assert cli.main([*ARGS, "--out", str(out), "--resume", str(path)]) == 2
        assert "error: checkpoint" in capsys.readouterr().err
        assert not marker.exists(), f"loading the {name} file ran code"
    assert all(torch.equal(t, before[n]) for n, t in trainer.model.state_dict().items())


def test_no_loader_in_lash_can_unpickle_objects():
    # Every load in the package is checkpoint.load's weights_only=True (results are JSON); the one
    # weights_only=False is the conversion command the old-format message shows the user.
    calls, unsafe = [], []
    for path in (ROOT / "lash").rglob("*.py"):
        text = path.read_text()
        calls += re.findall(r"torch\.load\(path[^)]*\)", text)
        unsafe += re.findall(r"pickle\.loads?\(|torch\.load\([^)]*weights_only=False\)", text)
    assert calls == ['torch.load(path, map_location="cpu", weights_only=True)']
    assert unsafe == ["torch.load('{path}', weights_only=False)"]


def test_checkpoint_holds_only_what_a_safe_load_reads(tmp_path):
    trainer, good = trained(tmp_path)
    payload = torch.load(good, weights_only=True)
    assert payload["format"] == "lash-checkpoint-v2" and payload["config"] == trainer.config.as_dict()
    assert isinstance(payload["rng"]["python"], torch.Tensor) and isinstance(payload["rng"]["numpy"], torch.Tensor)
    assert trainer.load_checkpoint(good) == {"note": "kept"}
    with pytest.raises(ValueError, match=r"extra\['bad'\] is a object"):
        trainer.save_checkpoint(tmp_path / "other.pt", extra={"bad": object()})
    assert not (tmp_path / "other.pt").exists()


def test_rng_states_round_trip():
    state = checkpoint.rng_state()
    expected = (__import__("random").random(), __import__("numpy").random.rand(), torch.rand(1))
    checkpoint.set_rng_state(state)
    assert (__import__("random").random(), __import__("numpy").random.rand(), torch.rand(1)) == expected


def test_old_format_is_refused_with_the_conversion_that_works(tmp_path):
    trainer, good = trained(tmp_path)
    payload = torch.load(good, weights_only=True)
    import numpy as np
    import random

    old = payload | {"format": "lash-checkpoint-v1", "config": trainer.config}
    old["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": []}
    old["trainer"] = {k: v for k, v in old["trainer"].items() if k not in ("settings", "partial_epoch_loss")} | {"data_epoch": 0}
    path = tmp_path / "v1.pt"
    torch.save(old, path)
    with pytest.raises(ValueError, match="older lash-checkpoint-v1 format.*upgrade_v1") as error:
        trainer.load_checkpoint(path)
    # The message's one-off conversion, run on this trusted file:
    command = re.search(r'python -c "(.*)" \(README', str(error.value)).group(1)
    exec(command)  # noqa: S102 - the documented snippet itself
    assert trainer.load_checkpoint(f"{path}.v2.pt") == {"note": "kept"}


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.pop("rng"),
        lambda p: p["rng"].update(python="x"),
        lambda p: p["rng"].update(numpy=torch.zeros(3, dtype=torch.int64)),
        lambda p: p["trainer"].update(global_step=-1),
        lambda p: p["model"].update({"embedding.weight": "x"}),
        lambda p: p.update(format="something-else"),
    ],
)
def test_damaged_checkpoint_is_a_clear_error_and_changes_nothing(tmp_path, damage):
    trainer, good = trained(tmp_path)
    payload = torch.load(good, weights_only=True)
    damage(payload)
    torch.save(payload, tmp_path / "bad.pt")
    before = {name: t.clone() for name, t in trainer.model.state_dict().items()}
    step = trainer.global_step
    with pytest.raises(ValueError, match="checkpoint"):
        trainer.load_checkpoint(tmp_path / "bad.pt")
    assert trainer.global_step == step
    assert all(torch.equal(t, before[n]) for n, t in trainer.model.state_dict().items())
