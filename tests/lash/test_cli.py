"""The training CLI: distributed equivalence, exact resume, precisions, compile, errors."""

import functools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lash import DeepSupervisionTransformer, Trainer, TrainingConfig, cli

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


def test_every_flag_has_help_and_shared_concepts_share_one_name():
    commands = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    flags = {}
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help and action.help.strip(), f"lash {name} {action.option_strings} has no help"
            assert "(default: None)" not in parser.format_help()
            flags[name] = flags.get(name, set()) | set(action.option_strings)
    shared = {"--dataset", "--samples", "--seq-len", "--batch-size", "--device", "--seed", "--threads", "--out", "--dim",
              "--num-heads", "--no-progress", "--overwrite", "--resume"}  # fmt: skip
    assert shared <= flags["train"] & flags["ashem"]
    assert "--heads" not in flags["ashem"]


def test_train_ends_saying_what_it_wrote_and_the_early_exit_figures(tmp_path, capsys):
    run_cli(tmp_path, "run", "--routing-threshold", "0.01", "--exit-layer", "1")
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'run' / 'metrics.json'} and {tmp_path / 'run' / 'checkpoint.pt'}" in out
    assert "early exit at layer 1 (threshold 0.01):" in out and "of tokens exited, compute cost" in out
    assert not out.lstrip().startswith("{")


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error_and_touches_nothing(tmp_path, capsys):
    run_cli(tmp_path, "run")
    ckpt, saved = tmp_path / "run" / "checkpoint.pt", (tmp_path / "run" / "metrics.json").read_bytes()
    good = ckpt.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good[: len(good) // 2])
    assert cli.main([*ARGS, "--out", str(tmp_path / "run"), "--resume", str(bad)]) == 2
    assert "is not a LASH checkpoint (damaged or another format)" in capsys.readouterr().err
    assert cli.main([*ARGS, "--dim", "32", "--out", str(tmp_path / "run"), "--resume", str(ckpt)]) == 2
    assert "does not fit the model" in capsys.readouterr().err
    assert cli.main([*ARGS, "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "nope.pt")]) == 2
    assert f"--resume {tmp_path / 'nope.pt'} does not exist: name the checkpoint file" in capsys.readouterr().err
    assert cli.main([*ARGS, "--out", str(tmp_path / "run"), "--resume", str(tmp_path)]) == 2
    assert f"--resume {tmp_path} is a directory" in capsys.readouterr().err
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


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = DeepSupervisionTransformer(30, dim=16, num_layers=1, num_heads=2)
    trainer = Trainer(TrainingConfig(layer_weights={1: 1}), 30)
    trainer.create_optimizer(model, 1e-3)
    path = tmp_path / "ckpt.pt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="no space"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [3, 5, 7, 8], ids=["epoch-end", "mid-epoch", "mid-last-epoch", "last-step"])
def test_resume_from_any_stop_point_ends_bit_for_bit_where_the_full_run_ends(tmp_path, stop):
    # 96 sequences / 16 = 6 batches = 3 steps per epoch with --grad-accum 2: step 3 ends epoch 1.
    schedule = ["--grad-accum", "2", "--warmup-steps", "2", "--cosine"]
    full = run_cli(tmp_path, "full", *schedule)
    first = run_cli(tmp_path, "part", *schedule, "--stop-at-step", str(stop))
    resumed = run_cli(tmp_path, "part", *schedule, "--resume", str(tmp_path / "part" / "checkpoint.pt"))
    assert first["global_step"] == stop and resumed["global_step"] == full["global_step"] == 8
    assert len(resumed["history"]) == len(first["history"]) + (stop < 8) + (stop < 6)
    assert resumed["final_val_loss"] == full["final_val_loss"]
    assert resumed["final_train_loss"] == full["final_train_loss"]
    a, b = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"] for name in ("full", "part"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_may_change_the_exit_rule_and_trains_the_same_weights(tmp_path):
    # The exit rule only decides evaluation: a resumed run under another one trains exactly as before.
    full = run_cli(tmp_path, "full")
    run_cli(tmp_path, "part", "--stop-at-step", "4")
    resumed = run_cli(tmp_path, "part", "--resume", str(tmp_path / "part" / "checkpoint.pt"),
                      "--routing-threshold", "0.5", "--exit-layer", "1")  # fmt: skip
    assert resumed["global_step"] == full["global_step"] == 8 and "shallow_ratio" in resumed
    a, b = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"] for name in ("full", "part"))
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs=0 must be an int >= 1"),
        (["--max-steps", "0"], "--max-steps=0 must be an int >= 1"),
        (["--stop-at-step", "-1"], "--stop-at-step=-1 must be an int >= 1"),
        (["--grad-accum", "0"], "--grad-accum=0 must be an int >= 1"),
        (["--grad-clip", "-1"], r"--grad-clip=-1.0 is outside \[0.0, inf\)"),
        (["--lr", "0"], r"--lr=0.0 is outside \(0.0, inf\)"),
        (["--warmup-steps", "-2"], "--warmup-steps=-2 must be an int >= 0"),
        (["--samples", "0"], "--samples=0 must be an int >= 1"),
        (["--val-samples", "0"], "--val-samples=0 must be an int >= 1"),
        (["--max-vocab", "0"], "--max-vocab=0 must be an int >= 2"),
        (["--device", "tpu"], "--device='tpu' is not a device"),
        (["--routing-threshold", "2"], r"--routing-threshold=2.0 is outside \[0.0, 1.0\]"),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device='cuda': this machine has no cuda device")]),
)
def test_bad_values_are_one_line_and_exit_2_before_any_work(tmp_path, capsys, flags, message):
    assert cli.main([*ARGS, "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_argparse_errors_are_one_line(capsys):
    for flags in (["--layer-weights", "2:0.5,2:0.7"], ["--epochs", "x"], ["--precision", "fp8"]):
        with pytest.raises(SystemExit) as done:
            cli.main([*ARGS, *flags])
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.count("\n") == 1 and err.startswith("lash train: error: argument")
    with pytest.raises(SystemExit):
        cli.main([*ARGS, "--layer-weights", "1:1,1:0"])
    assert "names layer 1 more than once" in capsys.readouterr().err


def test_out_is_checked_before_training(tmp_path, capsys, monkeypatch):
    trained = []
    monkeypatch.setattr(Trainer, "train_epoch", lambda *a, **k: trained.append(1))
    (tmp_path / "file").write_text("x")
    assert cli.main([*ARGS, "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: make the write itself fail as it would
        monkeypatch.setattr("lash.files.tempfile.TemporaryFile", lambda **_: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    try:
        assert cli.main([*ARGS, "--out", str(locked)]) == 2
        assert "is not a writable directory (Permission denied)" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)
    assert not trained


def test_an_earlier_runs_checkpoint_is_never_replaced_silently(tmp_path, capsys):
    run_cli(tmp_path, "run")
    saved = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    assert cli.main([*ARGS, "--out", str(tmp_path / "run"), "--lr", "0.01"]) == 2
    assert "already holds the checkpoint.pt of an earlier run" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == saved
    assert cli.main([*ARGS, "--out", str(tmp_path / "run"), "--lr", "0.01", "--overwrite"]) == 0
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() != saved


@pytest.mark.slow
def test_a_finished_run_extended_by_an_epoch_ends_where_the_longer_run_ends(tmp_path):
    # Every CLI checkpoint ends an epoch; the extension must not replay epoch 1's shuffle order.
    plain = [arg for arg in ARGS if arg not in ("--max-steps", "8")]
    assert cli.main([*plain, "--epochs", "2", "--out", str(tmp_path / "full")]) == 0
    assert cli.main([*plain, "--epochs", "1", "--out", str(tmp_path / "part")]) == 0
    ckpt = str(tmp_path / "part" / "checkpoint.pt")
    assert cli.main([*plain, "--epochs", "2", "--out", str(tmp_path / "part"), "--resume", ckpt]) == 0
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert resumed["final_val_loss"] == full["final_val_loss"] and resumed["global_step"] == full["global_step"] == 12
    cosine = [*plain, "--cosine", "--epochs", "1", "--out", str(tmp_path / "cos")]
    assert cli.main(cosine) == 0
    assert cli.main([*cosine[:-4], "--epochs", "2", "--out", str(tmp_path / "cos"), "--resume", str(tmp_path / "cos" / "checkpoint.pt")]) == 2


def test_resuming_with_other_flags_is_refused(tmp_path, capsys):
    run_cli(tmp_path, "run", "--stop-at-step", "2")
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    assert cli.main([*ARGS, "--out", str(tmp_path / "run"), "--lr", "0.01", "--resume", ckpt]) == 2
    assert "lr=0.001 in param group layer_1, this optimizer has 0.01" in capsys.readouterr().err
    assert cli.main([*ARGS, "--out", str(tmp_path / "run"), "--seq-len", "12", "--seed", "1", "--resume", ckpt]) == 2
    assert "--seed is 1 but the checkpoint's run used 42" in capsys.readouterr().err


def test_non_finite_loss_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    run_cli(tmp_path, "run", "--stop-at-step", "6")
    saved = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    monkeypatch.setattr("lash.trainer_state.WeightedLoss.forward", lambda self, x, y: self.model(x).sum() * math.nan)
    assert cli.main([*ARGS, "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "run" / "checkpoint.pt")]) == 1
    err = capsys.readouterr().err
    assert "training loss became nan" in err and err.count("\n") == 1
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == saved


def test_output_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run_cli(tmp_path, "run")
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "metrics.json"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644


BAD_FLAGS = [("--epochs", "0"), ("--max-steps", "-1"), ("--grad-accum", "0"), ("--grad-clip", "-1"), ("--grad-clip", "nan"),
             ("--lr", "0"), ("--lr", "inf"), ("--seq-len", "0"), ("--batch-size", "0"), ("--layer-weights", "1:-1"),
             ("--layer-weights", "1:1,1:1"), ("--layer-weights", "2:1"), ("--samples", "-3"), ("--device", "tpu"),
             ("--stop-at-step", "0"), ("--warmup-steps", "-1"), ("--max-vocab", "1"), ("--val-samples", "0")]  # fmt: skip


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    good=st.fixed_dictionaries(
        {
            "--max-steps": st.sampled_from(["1", "2", "3"]),
            "--grad-accum": st.sampled_from(["1", "2"]),
            "--grad-clip": st.sampled_from(["0", "0.5"]),
            "--seq-len": st.sampled_from(["1", "4"]),
            "--batch-size": st.sampled_from(["1", "3"]),
            "--warmup-steps": st.sampled_from(["0", "2"]),
        }
    ),
    bad=st.one_of(st.none(), st.sampled_from(BAD_FLAGS)),
)
def test_cli_train_runs_or_names_the_bad_flag_in_one_line(tmp_path_factory, capsys, good, bad):
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--dataset", "offline", "--samples", "6", "--val-samples", "2", "--num-layers", "1", "--dim", "8",
            "--num-heads", "2", "--max-vocab", "64", "--no-progress", "--out", str(out)]  # fmt: skip
    for flag, value in [*good.items(), *([bad] if bad else [])]:
        argv += [flag, value]
    try:
        code = cli.main(argv)
    except SystemExit as done:  # argparse's own errors
        code = done.code
    err = capsys.readouterr().err
    if bad is None:
        assert code == 0 and (out / "metrics.json").is_file() and (out / "checkpoint.pt").is_file()
    else:
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert bad[0] in err or bad[0][2:].replace("-", "_") in err  # the flag, or the config field it sets
        assert not (out / "checkpoint.pt").exists()
