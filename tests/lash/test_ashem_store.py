"""A stopped ASHEM run keeps its work in --out and, run again, ends exactly where an uninterrupted run ends.

The runs are real processes of ``python -m lash ashem``, stopped with real signals once the phase
in question has checkpointed an epoch, then run again with the same command.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Enough epochs in each phase that a signal sent after its first checkpoint lands inside it.
ARGS = ["ashem", "--dataset", "offline", "--samples", "300", "--val-samples", "60", "--seq-len", "16", "--dim", "16",
        "--num-heads", "2", "--max-vocab", "128", "--phase1-max-epochs", "8", "--phase1-patience", "8",
        "--phase2-max-epochs", "20", "--phase2-patience", "20", "--no-progress", "--threads", "1"]  # fmt: skip


def _start(out: Path, *extra: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "lash", *ARGS, "--out", str(out), *extra]
    # A shell's background job ignores SIGINT, and a child keeps that: give it the default back,
    # so that the run reacts to Ctrl-C as it does in a terminal.
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    process = _start(out, *extra)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _stop_when(out: Path, checkpoint: str, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Start a run and send ``sig`` once ``seed-42/{checkpoint}`` holds an epoch."""
    process = _start(out)
    path = out / "seed-42" / checkpoint
    deadline = time.monotonic() + 240
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before the phase checkpointed"
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _figures(out: Path) -> list:
    """Every run's figures, without wall times (the only thing a stop may change)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "seconds"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads((out / "results.json").read_text())["runs"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list:
    out = tmp_path_factory.mktemp("ashem") / "full"
    done = _run(out)
    assert done.returncode == 0, done.stderr[-2000:]
    return _figures(out)


@pytest.mark.parametrize(
    "checkpoint, sig",
    [("phase2-checkpoint.pt", signal.SIGINT), ("phase2-checkpoint.pt", signal.SIGKILL), ("phase1-checkpoint.pt", signal.SIGKILL)],
)
def test_a_stopped_run_continues_to_the_uninterrupted_result(tmp_path, uninterrupted, checkpoint, sig):
    out = tmp_path / "run"
    stopped = _stop_when(out, checkpoint, sig)
    assert stopped.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    if sig == signal.SIGINT:  # the interrupt says what it kept
        assert f"interrupted; kept in {out}" in stopped.stderr
        assert "phase1_model.pt" in stopped.stderr and "phase2-checkpoint.pt" in stopped.stderr
        assert "Traceback" not in stopped.stderr
    phase = checkpoint.split("-")[0]
    assert (out / "seed-42" / checkpoint).is_file()
    if phase == "phase2":  # phase 1 was kept whole: its model, figures and report
        assert {"phase1_model.pt", "phase1.json", "phase1.md"} <= {p.name for p in (out / "seed-42").iterdir()}
    again = _run(out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"continuing the run in {out}" in again.stdout
    assert _figures(out) == uninterrupted
    assert not (out / "seed-42" / checkpoint).exists()  # a kept phase needs no checkpoint


def test_a_finished_run_is_kept_and_other_settings_are_refused(tmp_path, uninterrupted):
    out = tmp_path / "run"
    assert _run(out).returncode == 0
    again = _run(out)
    assert again.returncode == 0 and "seed 42 finished earlier" in again.stdout
    assert _figures(out) == uninterrupted
    other = _run(out, "--phase2-lr", "0.001")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "--phase2-lr 0.0001, not 0.001" in other.stderr and "--overwrite" in other.stderr
    assert _figures(out) == uninterrupted  # the refused run changed nothing


def test_resume_needs_a_run_to_continue(tmp_path):
    done = _run(tmp_path / "empty", "--resume")
    assert done.returncode == 2 and "holds no ASHEM run to continue" in done.stderr
