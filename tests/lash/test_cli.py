"""The training CLI: distributed equivalence, exact resume, precisions, compile, errors."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lash import DeepSupervisionTransformer, Trainer, TrainingConfig, cli
from lash.optim import warmup_cosine

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["train", "--dataset", "offline", "--samples", "96", "--val-samples", "32", "--seq-len", "12",
        "--batch-size", "16", "--num-layers", "2", "--dim", "16", "--num-heads", "2", "--max-vocab", "64",
        "--layer-weights", "1:0.5,2:0.5", "--no-progress", "--max-steps", "8"]  # fmt: skip


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def run_cli(tmp_path: Path, name: str, *extra: str) -> dict:
    assert cli.main([*ARGS, "--out", str(tmp_path / name), *extra]) == 0
    return metrics(tmp_path / name)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(tmp_path, engine):
    single = run_cli(tmp_path, "single", "--batch-size", "15")  # 15 rows: the ranks split 8 + 7
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lash",
               *ARGS, "--batch-size", "15", "--distributed", engine, "--out", str(tmp_path / "two")]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = metrics(tmp_path / "two")
    assert two["world_size"] == 2 and two["global_step"] == single["global_step"] == 8
    assert abs(two["final_val_loss"] - single["final_val_loss"]) / single["final_val_loss"] < 1e-3
    assert abs(two["final_train_loss"] - single["final_train_loss"]) / single["final_train_loss"] < 1e-3
    assert two["per_exit"].keys() == {"1", "2"}
    assert (tmp_path / "two" / "checkpoint.pt").is_file()


def test_resume_matches_uninterrupted_run(tmp_path):
    schedule = ["--grad-accum", "2", "--warmup-steps", "2", "--cosine"]
    full = run_cli(tmp_path, "full", *schedule)
    first = run_cli(tmp_path, "part", *schedule, "--stop-at-step", "5")  # mid-epoch, mid-schedule
    assert first["global_step"] == 5
    resumed = run_cli(tmp_path, "part", *schedule, "--resume", str(tmp_path / "part" / "checkpoint.pt"))
    assert resumed["global_step"] == 8
    assert abs(resumed["final_val_loss"] - full["final_val_loss"]) < 1e-5
    assert abs(resumed["final_train_loss"] - full["final_train_loss"]) < 1e-5
    assert len(resumed["history"]) == len(first["history"]) + 2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_close_to_fp32(tmp_path, precision):
    fp32 = run_cli(tmp_path, "fp32")
    low = run_cli(tmp_path, precision, "--precision", precision)
    assert abs(low["final_val_loss"] - fp32["final_val_loss"]) < 0.05


def test_compile_path_runs(tmp_path, monkeypatch):
    # aot_eager traces exactly what inductor would compile, without minutes of C++ codegen on CI.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    eager = run_cli(tmp_path, "eager")
    compiled = run_cli(tmp_path, "compiled", "--compile")
    assert abs(compiled["final_val_loss"] - eager["final_val_loss"]) < 1e-4
    model = DeepSupervisionTransformer(30, dim=16, num_layers=1, num_heads=2)
    trainer = Trainer(TrainingConfig(layer_weights={1: 1}), 30, progress=False, compile=True)
    x = torch.randint(0, 30, (2, 5))
    with pytest.raises(ValueError, match=r"target value 30 is outside \[0, 30\)"):
        trainer.train_epoch(model, [(x, torch.full_like(x, 30))], trainer.create_optimizer(model, 1e-3))


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error_and_touches_nothing(tmp_path, capsys):
    run_cli(tmp_path, "run")
    ckpt, saved = tmp_path / "run" / "checkpoint.pt", (tmp_path / "run" / "metrics.json").read_bytes()
    good = ckpt.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good[: len(good) // 2])
    assert cli.main([*ARGS, "--out", str(tmp_path / "run"), "--resume", str(bad)]) == 2
    assert "is unreadable or corrupt" in capsys.readouterr().err
    assert cli.main([*ARGS, "--dim", "32", "--out", str(tmp_path / "run"), "--resume", str(ckpt)]) == 2
    assert "does not fit the model" in capsys.readouterr().err
    assert cli.main([*ARGS, "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert ckpt.read_bytes() == good and (tmp_path / "run" / "metrics.json").read_bytes() == saved


def test_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main([*ARGS, "--layer-weights", "2:abc"])
    assert "not a list of layer:value pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*ARGS, "--precision", "fp8"])
    assert cli.main([*ARGS, "--layer-weights", "9:1", "--out", str(tmp_path)]) == 2
    assert "layer index 9 is outside [1, 2]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="precision='int8'"):
        Trainer(TrainingConfig(layer_weights={1: 1}), 10, precision="int8")
    with pytest.raises(ValueError, match="grad_accum_steps=0"):
        Trainer(TrainingConfig(layer_weights={1: 1}), 10, grad_accum_steps=0)


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


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = DeepSupervisionTransformer(30, dim=16, num_layers=1, num_heads=2)
    trainer = Trainer(TrainingConfig(layer_weights={1: 1}), 30)
    trainer.create_optimizer(model, 1e-3)
    path = tmp_path / "ckpt.pt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    def broken_save(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="no space"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
