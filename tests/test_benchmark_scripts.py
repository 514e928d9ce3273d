"""The GPU run's benchmark scripts run end to end on the CPU, small, and write what they promise:
``decode_bench.py --dry-run`` and a short ``e2e_ashem.py``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LASH_KERNELS"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.slow
def test_decode_bench_dry_run_writes_every_mode_with_its_ratios(tmp_path):
    _run("decode_bench.py", "--dry-run", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"))
    rows = json.loads((tmp_path / "out" / "decode.json").read_text())["rows"]
    assert {row["batch"] for row in rows} == {1, 2}
    for batch in (1, 2):
        modes = [row["mode"] for row in rows if row["batch"] == batch]
        assert modes[0] == "plain" and sum(m.startswith("early exit") for m in modes) == 3 + (batch > 1)
        assert sum(m.startswith("speculative") for m in modes) == 3
    plain = [row for row in rows if row["mode"] == "plain"]
    assert all(row["speedup_vs_plain"] == 1.0 for row in plain)
    for row in rows:
        assert row["tokens_per_s"] > 0 and {"shallow_ratio", "executed_layer_ratio", "acceptance_rate"} <= set(row)
        assert ("bytes_ideal" in row) == row["mode"].startswith("early exit")
    assert "| batch | mode | tokens/s |" in (tmp_path / "out" / "decode.md").read_text()


@pytest.mark.slow
def test_e2e_ashem_times_both_paths_and_prints_the_ratio(tmp_path):
    done = _run("e2e_ashem.py", "--device", "cpu", "--samples", "300", "--epochs", "1", "--json", str(tmp_path / "e2e.json"))
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert set(rows) == {"eager (lash.original, plain loop)", "LASH default path"}
    for row in rows.values():
        assert row["total"] >= row["phase1"] + row["phase2"] - 1e-6 > 0 and row["phase1_tokens"] > 0
    assert "end to end, compiling included: LASH" in done.stdout
