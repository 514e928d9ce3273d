"""Probes of training state, checkpoints, output directories and the CLI's flags.

Each probe states what must happen. A probe fails when a traceback reaches a CLI user, a wrong
number comes back silently, a run hangs, data is lost, or a message does not name the
offending field and value.
"""

import errno
import json
import subprocess
import sys
import time

import pytest
import torch

from lash import DeepSupervisionTransformer, Trainer, TrainingConfig, cli
from lash.files import LOCK_NAME, WriteError, publish
from tests.lash.test_cli import ARGS, ROOT, run_cli

V = 30


def _trainer(seed: int = 0) -> Trainer:
    torch.manual_seed(seed)
    model = DeepSupervisionTransformer(V, dim=16, num_layers=2, num_heads=2)
    return Trainer(TrainingConfig(layer_weights={1: 0.5, 2: 0.5}), V, progress=False, model=model)


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, V, (4, 6), generator=g), torch.randint(0, V, (4, 6), generator=g)) for _ in range(n)]


def _snapshot(trainer: Trainer) -> dict:
    state = trainer.state_dict()
    return {"model": {k: v.clone() for k, v in state["model"].items()}, "trainer": state["trainer"],
            "optimizer": repr(trainer.optimizer.state_dict())}  # fmt: skip


def _same(before: dict, after: dict) -> bool:
    return (before["trainer"] == after["trainer"] and before["optimizer"] == after["optimizer"]
            and all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"]))  # fmt: skip


def _main(argv: list[str]) -> int:
    """``cli.main``'s exit status, whether it returns it or argparse exits with it."""
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return stop.code


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# --- a failed call leaves the trainer as it was ------------------------------------------------


def test_a_bad_id_in_the_last_batch_changes_nothing_and_a_retry_trains_on_everything():
    """A bad token id in batch 3 of 3: ValueError before any step; the retry takes 3 steps and one epoch."""
    trainer, batches = _trainer(), _batches()
    bad = [*batches[:2], (batches[2][0].clone().fill_(V), batches[2][1])]
    before = _snapshot(trainer)
    with pytest.raises(ValueError, match=f"token id {V}|outside"):
        trainer.train_epoch(trainer.model, bad, trainer.optimizer)
    assert _same(before, _snapshot(trainer))
    trainer.train_epoch(trainer.model, batches, trainer.optimizer)
    assert (trainer.global_step, trainer.epochs_trained, trainer.batches_into_epoch) == (3, 1, 0)


def test_an_epoch_with_nothing_to_learn_changes_nothing():
    """Every target ignored: ValueError, and the counters stay where they were."""
    trainer = _trainer()
    empty = [(x, torch.full_like(y, -100)) for x, y in _batches()]
    before = _snapshot(trainer)
    with pytest.raises(ValueError, match="no batch with a labelled target"):
        trainer.train_epoch(trainer.model, empty, trainer.optimizer)
    assert _same(before, _snapshot(trainer))


def test_a_position_beyond_the_epoch_is_refused():
    """A trainer further into its epoch than the batches reach: ValueError naming both counts."""
    trainer = _trainer()
    trainer.batches_into_epoch = 7
    with pytest.raises(ValueError, match="7 batches into its epoch, but train_batches has 3"):
        trainer.train_epoch(trainer.model, _batches(), trainer.optimizer)


# --- loading is all or nothing -----------------------------------------------------------------


def _saved(tmp_path):
    trainer = _trainer()
    trainer.train_epoch(trainer.model, _batches(), trainer.optimizer)
    path = tmp_path / "good.pt"
    trainer.save_checkpoint(path)
    return trainer, path


def _damaged(tmp_path, path, change) -> str:
    payload = torch.load(path, weights_only=True)
    change(payload)
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    return bad


def _first_param(payload):
    return next(iter(payload["model"]))


DAMAGE = {
    "int64 model tensor": (lambda p: p["model"].__setitem__(_first_param(p), p["model"][_first_param(p)].long()), "torch.int64"),
    "bool model tensor": (lambda p: p["model"].__setitem__(_first_param(p), p["model"][_first_param(p)] > 0), "torch.bool"),
    "NaN weight": (lambda p: p["model"][_first_param(p)].fill_(float("nan")), "NaN or infinite"),
    "Adam state shape": (lambda p: p["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(3)), r"has shape \(3,\)"),
    "negative exp_avg_sq": (lambda p: p["optimizer"]["state"][0]["exp_avg_sq"].fill_(-1.0), "negative"),
    "torch RNG size": (lambda p: p["rng"].__setitem__("torch", p["rng"]["torch"][:10]), "random states have the wrong sizes"),
    "param group size": (lambda p: p["optimizer"]["param_groups"][0]["params"].pop(), "of another size"),
    "negative step count": (lambda p: p["trainer"].__setitem__("global_step", -1), "global_step is -1"),
}  # fmt: skip


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_refused_whole_and_nothing_changes(tmp_path, damage):
    """Every tensor, optimizer state, RNG state and counter is checked before any is applied."""
    trainer, path = _saved(tmp_path)
    change, message = DAMAGE[damage]
    bad = _damaged(tmp_path, path, change)
    trainer.train_epoch(trainer.model, _batches(), trainer.optimizer)  # move on from the saved state
    before, rng = _snapshot(trainer), torch.get_rng_state()
    with pytest.raises(ValueError, match=message):
        trainer.load_checkpoint(bad)
    assert _same(before, _snapshot(trainer)) and torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("content", [b"\x80", b'{"model": {}}', b""], ids=["one-byte", "json", "empty"])
def test_a_file_that_is_no_checkpoint_is_called_damaged_not_dangerous(tmp_path, content):
    """A cut-short or foreign file: "not a LASH checkpoint (damaged or another format)", no talk of code."""
    trainer = _trainer()
    path = tmp_path / "file.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"not a LASH checkpoint \(damaged or another format\)") as error:
        trainer.load_checkpoint(path)
    assert "run code" not in str(error.value)


def test_a_directory_is_not_a_checkpoint_file(tmp_path, capsys):
    """--resume of a directory: one line saying it is a directory, exit 2."""
    assert cli.main([*ARGS, "--out", str(tmp_path / "run"), "--resume", str(tmp_path)]) == 2
    assert "is a directory, not a checkpoint file" in _one_line_error(capsys)


def test_resume_of_a_damaged_checkpoint_is_one_line(tmp_path, capsys):
    """A wrong RNG size through --resume: exit 2, one line, the checkpoint untouched."""
    run_cli(tmp_path, "run", "--stop-at-step", "2")
    path = tmp_path / "run" / "checkpoint.pt"
    bad = _damaged(tmp_path, path, DAMAGE["torch RNG size"][0])
    saved = path.read_bytes()
    assert cli.main([*ARGS, "--out", str(tmp_path / "run"), "--resume", str(bad)]) == 2
    assert "random states have the wrong sizes" in _one_line_error(capsys)
    assert path.read_bytes() == saved


def test_metrics_are_valid_json(tmp_path):
    """metrics.json never holds NaN or Infinity, which JSON does not have."""
    run_cli(tmp_path, "run")
    json.loads((tmp_path / "run" / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


@pytest.mark.parametrize("ignore_index", [0.5, "-100", True])
def test_a_trainer_refuses_an_ignore_index_that_is_no_int(ignore_index):
    """Trainer(ignore_index=...) must be an int: a named ValueError otherwise."""
    with pytest.raises(ValueError, match=f"ignore_index={ignore_index!r} must be an int"):
        Trainer(TrainingConfig(layer_weights={1: 1.0}), V, ignore_index=ignore_index)


# --- a full disk ------------------------------------------------------------------------------


def test_a_full_disk_while_publishing_a_report_names_the_file_and_keeps_the_old_set(tmp_path, monkeypatch):
    """files.publish (the ASHEM report) fails on a full disk: one WriteError naming the file; the old files stay."""
    publish({"results.md": b"old"}, tmp_path)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", full)
    with pytest.raises(WriteError, match="results.md .No space left on device.; the file there before, if any, is intact"):
        publish({"results.md": b"new"}, tmp_path)
    assert (tmp_path / "results.md").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


def test_a_full_disk_at_save_is_one_line_and_the_last_checkpoint_stays(tmp_path, capsys, monkeypatch):
    """Saving fails (EFBIG): exit 1, one line naming the file and saying the previous one is intact."""
    run_cli(tmp_path, "run", "--stop-at-step", "2")
    path = tmp_path / "run" / "checkpoint.pt"
    saved = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(torch, "save", full)
    assert cli.main([*ARGS, "--out", str(tmp_path / "run"), "--resume", str(path)]) == 1
    err = _one_line_error(capsys)
    assert str(path) in err and "File too large" in err and "intact" in err
    assert path.read_bytes() == saved
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["trainer"]["global_step"] == 2


# --- one writer per output directory ----------------------------------------------------------


def test_a_second_run_into_a_held_directory_exits_2_naming_the_holder(tmp_path, capsys):
    """A live process holds --out: the second run exits 2 with one line naming its PID; nothing is written."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lash.files import one_writer\n"
         f"with one_writer('--out', {str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in (ARGS, ["ashem", "--quick", "--dataset", "offline", "--no-progress"]):
            assert cli.main([*command, "--out", str(out)]) == 2
            assert f"in use by process {holder.pid}" in _one_line_error(capsys)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    started = time.perf_counter()
    run_cli(tmp_path, "run")  # the holder is gone: its lock went with it
    assert time.perf_counter() - started < 60


# --- every flag checked where it enters -------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--out", ""], "--out is empty"),
        (["--resume", ""], "--resume is empty"),
        (["--layer-weights", ""], "--layer-weights: is empty"),
        (["--layer-lr-scales", ""], "--layer-lr-scales: is empty"),
        (["--lr", "1e300"], r"--lr=1e\+300 is beyond float32's range"),
        (["--layer-weights", "1:1e300"], r"layer_weights\[1\]=1e\+300 is beyond float32's range"),
        (["--layer-lr-scales", "1:1e300"], r"layer_lr_scales\[1\]=1e\+300 is beyond float32's range"),
        (["--samples", str(10**12)], "--samples 1000000000000.* GiB; this machine has"),
        (["--seq-len", str(10**9)], "--seq-len 1000000000.* GiB"),
        (["--max-vocab", str(10**12)], "--max-vocab 1000000000000.* GiB"),
        (["--dim", str(10**8), "--num-heads", "2"], "--dim 100000000.* GiB"),
        (["--num-layers", str(10**8)], "100000000 layers need about"),
        (["--seed", "-1"], r"--seed=-1 is outside \[0, 4294967295\]"),
        (["--max-vocab", "2"], "max_vocab=2 is too small for the offline corpus"),
        (["--dim", "12", "--num-heads", "4"], "--dim 12 / --num-heads 4 must give a whole, even head width"),
    ],
)  # fmt: skip
def test_a_bad_train_flag_is_one_line_naming_it(tmp_path, capsys, flags, message):
    """Exit 2 with one line that names the flag and its value, before any work (no hang)."""
    started = time.perf_counter()
    assert _main([*ARGS, "--out", str(tmp_path / "run"), *flags]) == 2
    assert time.perf_counter() - started < 30
    err = _one_line_error(capsys)
    assert __import__("re").search(message, err), err


@pytest.mark.parametrize(
    "flags, message",
    [(["--dim", "3", "--num-heads", "1"], "--dim 3 / --num-heads 1"), (["--phase1-lr", "1e300"], r"phase1_lr=1e\+300"),
     (["--seed", "-1"], "--seed=-1")],
)  # fmt: skip
def test_a_bad_ashem_flag_is_one_line_before_phase_1(tmp_path, capsys, flags, message):
    """ashem refuses the flag before phase 1 starts: exit 2, one line, nothing trained."""
    assert _main(["ashem", "--quick", "--dataset", "offline", "--no-progress", "--out", str(tmp_path / "a"), *flags]) == 2
    err = _one_line_error(capsys)
    assert __import__("re").search(message, err) and "phase 1" not in capsys.readouterr().out
