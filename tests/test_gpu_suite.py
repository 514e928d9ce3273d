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
                    "RoPE forward+backward", "early exit", "Liger", "torch.compile / lash",
                    "same-size copy / lash time", "lash / bare head matmuls", "CCE per exit / lash", "lash peak memory",
                    "fullgraph=True", "host time per eager call: rms_norm forward",
                    "host time per eager call: apply_rotary forward+backward",
                    "host time per eager call: multi-exit CE forward+backward"):
        assert subject in bars, subject
    norm = result["measurements"]["rms_norm backward 256×128 float32"]
    assert norm["bytes_moved"] == 3 * 256 * 128 * 4 and "MiB moved" in markdown
    assert {"copy_s", "copy_spread", "lash_s", "lash_spread", "lash_times_s", "lash_method"} <= set(norm)
    assert len(norm["lash_times_s"]) >= 5 and "spread over" in markdown
    for row in rows:
        assert row["bar"] in markdown
        if row["status"] == "SKIPPED":
            assert row["note"], row  # every skip says why


def test_a_second_run_of_the_kernel_rows_is_compared_with_the_first(tmp_path):
    first = _run("--dry-run", "--only", "kernels", "--out", str(tmp_path / "first"))
    assert first.returncode == 0, first.stderr[-2000:]
    earlier = tmp_path / "first" / "gpu_suite.json"
    second = _run("--dry-run", "--only", "kernels", "--out", str(tmp_path / "second"), "--compare", str(earlier))
    assert second.returncode == 0, second.stderr[-2000:]
    result = json.loads((tmp_path / "second" / "gpu_suite.json").read_text())
    bars = [row["bar"] for row in result["rows"]]
    assert not [bar for bar in bars if "multi-exit" in bar or "host time" in bar or "seed" in bar]  # kernels only
    measured = [name for name, record in result["measurements"].items() if "ratios" in record]
    assert len(measured) == 5  # rms_norm and add_rms_norm forward and backward, RoPE
    compared = [row for row in result["rows"] if "difference from the earlier run" in row["bar"]]
    assert len(compared) == len(measured)
    assert all(row["status"] == "DRY" and row["measured"].endswith("%") and str(earlier) in row["note"]
               for row in compared), compared


@pytest.mark.parametrize(
    "args, words",
    [
        (["--dry-run", "--out", str(SUITE)], ["--out", str(SUITE)]),
        (["--out", "x", "--rounds", "3"], ["--rounds", "3"]),
        (["--dry-run", "--out", "x", "--compare", "no-such.json"], ["--compare", "no-such.json"]),
        (["--dry-run", "--out", "x", "--only", "loss"], ["--only", "loss"]),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, words):
    done = _run(*args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and all(w in done.stderr for w in words), done.stderr


def test_judged_rows_pass_and_fail_in_the_table():
    """What a dry run cannot show: rows judged against their targets, as a GPU run writes them."""
    code = """
import json, pathlib, sys, tempfile
sys.path.insert(0, "benchmarks")
import gpu_suite, suite_rows
suite = suite_rows.Suite(dry=False, quick=False)
suite_rows.ratio_row(suite, "fast", 4.0, 1.0, ">= 3x", lambda r: r >= 3)
suite_rows.ratio_row(suite, "slow", 2.0, 1.0, ">= 3x", lambda r: r >= 3)
suite_rows.ratio_row(suite, "absent", "skipped: liger_kernel is not importable", 1.0, ">= 1.5x", lambda r: r >= 1.5)
suite_rows.ratio_row(suite, "broken", 1.0, "error: ValueError: bad", ">= 2x", lambda r: r >= 2)
suite.measurements = {"steady": {"ratios": {"copy": 0.95, "liger": None}},
                      "moved": {"ratios": {"copy": 0.7, "liger": 1.2}}, "new": {"ratios": {"copy": 0.9}}}
earlier = pathlib.Path(tempfile.mkdtemp()) / "gpu_suite.json"
earlier.write_text(json.dumps({"measurements": {"steady": {"ratios": {"copy": 1.0, "liger": 1.1}},
                                                "moved": {"ratios": {"copy": 0.9, "liger": 1.2}}}}))
gpu_suite.rerun_agreement(suite, earlier)
print(suite_rows.markdown({"device": "d", "torch": "t", "date": "today"}, suite.rows, "full", seconds=1))
"""
    env = {k: v for k, v in os.environ.items() if k != "LASH_KERNELS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout
    assert "| fast | 4× | >= 3x | PASS |" in table and "| slow | 2× | >= 3x | FAIL |" in table
    assert "| absent | – | >= 1.5x | SKIPPED | liger_kernel is not importable |" in table
    assert "| broken | – | >= 2x | ERROR | ValueError: bad |" in table
    assert "carry them as wheels" in table
    assert "| steady: difference from the earlier run | 5% | ≤ 10% | PASS |" in table
    assert "| moved: difference from the earlier run | 22.2% | ≤ 10% | FAIL |" in table  # (0.9 - 0.7) / 0.9
    assert "| new: difference from the earlier run | – | ≤ 10% | SKIPPED |" in table


def test_a_run_stopped_inside_a_section_keeps_the_rows_it_finished(tmp_path):
    """The time box kills the suite wherever it is: every row written before then is on disk."""
    code = f"""
import sys
sys.path.insert(0, "benchmarks")
import gpu_suite

def norms(suite):
    suite.info("first norm row", "1")
    raise SystemExit("killed by the time box")

gpu_suite.norms = norms
gpu_suite.main(["--dry-run", "--only", "kernels", "--out", {str(tmp_path)!r}])
"""
    env = {k: v for k, v in os.environ.items() if k != "LASH_KERNELS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "killed by the time box" in done.stderr
    rows = json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]
    assert [row["bar"] for row in rows] == ["first norm row"]
    assert "| first norm row | 1 |" in (tmp_path / "gpu_suite.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_suite.json", "gpu_suite.md"]  # no partial files left


def test_a_loss_that_syncs_is_judged_against_lash_timed_the_same_way():
    """Liger's and CCE's losses sync with the host, so they are timed by eager calls: their ratio is
    taken to LASH's eager calls, not to LASH's graph replays (host time on one side only)."""
    code = """
import sys
sys.path.insert(0, "benchmarks")
import gpu_suite, measure
record = {"liger_method": measure.EAGER_METHOD + " (host syncs at x.py:1)", "cce_method": "CUDA graph replay, 4 input sets"}
print(gpu_suite._timed_alike(record, "liger")[0], gpu_suite._timed_alike(record, "cce")[0])
"""
    env = {k: v for k, v in os.environ.items() if k != "LASH_KERNELS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["lash-eager", "lash"]
