"""``benchmarks/gpu_suite.py --dry-run`` runs end to end on the CPU and writes its table, JSON and Markdown."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "benchmarks" / "gpu_suite.py"
STATUSES = {"PASS", "FAIL", "INFO", "DRY", "SKIPPED", "ERROR"}


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LASH_KERNELS", "PYTHONPATH")}  # the suite finds lash itself
    return subprocess.run([sys.executable, str(SUITE), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_dry_run_writes_the_bars_table(tmp_path):
    done = _run("--dry-run", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-2000:]
    markdown = (tmp_path / "out" / "gpu_suite.md").read_text()
    result = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert markdown in done.stdout  # the printed table is the file's
    assert "| bar | measured | target | status | note |" in markdown
    assert result["mode"] == "dry-run" and result["environment"]["device"].startswith("cpu")
    assert result["environment"]["torch"] and result["environment"]["date"]
    rows = result["rows"]
    assert {row["status"] for row in rows} <= STATUSES
    assert not [row for row in rows if row["status"] == "ERROR"], rows
    assert not [row for row in rows if row["status"] in ("PASS", "FAIL")]  # a dry run judges nothing
    bars = " ".join(row["bar"] for row in rows)
    for subject in ("tests -m gpu", "ceiling: device copy bandwidth", "ceiling: dense matmul", "seed train step",
                    "no host sync", "multi-exit CE", "rms_norm forward", "rms_norm backward", "add_rms_norm backward",
                    "RoPE forward+backward", "early exit", "Liger", "torch.compile / lash"):
        assert subject in bars, subject
    for row in rows:
        assert row["bar"] in markdown
        if row["status"] == "SKIPPED":
            assert row["note"], row  # every skip says why


@pytest.mark.parametrize(
    "args, words",
    [(["--dry-run", "--out", str(SUITE)], ["--out", str(SUITE)]), (["--out", "x", "--rounds", "3"], ["--rounds", "3"])],
)
def test_bad_input_is_one_line_and_exit_code_2(args, words):
    done = _run(*args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and all(w in done.stderr for w in words), done.stderr


def test_judged_rows_pass_and_fail_in_the_table():
    """What a dry run cannot show: rows judged against their targets, as a GPU run writes them."""
    code = """
import sys
sys.path.insert(0, "benchmarks")
import gpu_suite
suite = gpu_suite.Suite(dry=False, quick=False)
gpu_suite._ratio_row(suite, "fast", 4.0, 1.0, ">= 3x", lambda r: r >= 3)
gpu_suite._ratio_row(suite, "slow", 2.0, 1.0, ">= 3x", lambda r: r >= 3)
gpu_suite._ratio_row(suite, "absent", "skipped: liger_kernel is not importable", 1.0, ">= 1.5x", lambda r: r >= 1.5)
gpu_suite._ratio_row(suite, "broken", 1.0, "error: ValueError: bad", ">= 2x", lambda r: r >= 2)
print(gpu_suite.markdown({"device": "d", "torch": "t", "date": "today"}, suite.rows, dry=False, quick=False, seconds=1))
"""
    env = {k: v for k, v in os.environ.items() if k != "LASH_KERNELS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout
    assert "| fast | 4× | >= 3x | PASS |" in table and "| slow | 2× | >= 3x | FAIL |" in table
    assert "| absent | – | >= 1.5x | SKIPPED | liger_kernel is not importable |" in table
    assert "| broken | – | >= 2x | ERROR | ValueError: bad |" in table
    assert "carry them as wheels" in table
