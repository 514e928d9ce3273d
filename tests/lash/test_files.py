"""Output files: atomic, published as a set, cleaned after a kill, with the umask's permissions."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lash import files

ROOT = Path(__file__).resolve().parents[2]


def test_write_atomic_follows_the_umask(tmp_path):
    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(mask)
        try:
            files.write_atomic(tmp_path / f"f{mask}", b"x")
        finally:
            os.umask(old)
        assert (tmp_path / f"f{mask}").stat().st_mode & 0o777 == mode


def test_an_interrupted_report_leaves_the_old_set_and_no_temporary(tmp_path, monkeypatch):
    files.publish({"a.json": b"old a", "b.md": b"old b", "c.png": b"old c"}, tmp_path)
    real, calls = os.fsync, []

    def interrupt_on_third(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(fd)

    monkeypatch.setattr("lash.files.os.fsync", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        files.publish({"a.json": b"new a", "b.md": b"new b", "c.png": b"new c"}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.md", "c.png"]
    assert [(tmp_path / n).read_bytes() for n in ("a.json", "b.md", "c.png")] == [b"old a", b"old b", b"old c"]


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_save_keeps_the_old_one_and_the_next_save_cleans_up(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        from lash import DeepSupervisionTransformer, Trainer, TrainingConfig
        model = DeepSupervisionTransformer(30, dim=16, num_layers=1, num_heads=2)
        trainer = Trainer(TrainingConfig(layer_weights={{1: 1}}), 30, progress=False)
        trainer.create_optimizer(model, 1e-3)
        trainer.save_checkpoint({str(tmp_path / "ckpt.pt")!r})
        def stuck(obj, f):
            f.write(b"half a checkpoint")
            f.flush()
            print("saving", flush=True)
            time.sleep(60)
        torch.save = stuck
        trainer.save_checkpoint({str(tmp_path / "ckpt.pt")!r})
        """
    )
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "saving\n"
    saved = (tmp_path / "ckpt.pt").read_bytes()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    stale = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and (tmp_path / "ckpt.pt").read_bytes() == saved
    files.write_atomic(tmp_path / "ckpt.pt", saved)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_live_processes_keep_their_temporaries(tmp_path):
    mine = tmp_path / f".out.json.{os.getpid()}.abc.tmp"
    mine.write_bytes(b"")
    files.write_atomic(tmp_path / "out.json", b"{}")
    assert mine.exists()


def test_check_writable_dir(tmp_path):
    assert files.check_writable_dir("--out", tmp_path / "new" / "dir").is_dir()
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="--out '.*f' is a file, not a directory"):
        files.check_writable_dir("--out", tmp_path / "f")
