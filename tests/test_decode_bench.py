"""``benchmarks/decode_bench.py --dry-run`` runs end to end on the CPU and writes its table and rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_writes_every_mode_with_its_ratios(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LASH_KERNELS",)}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "decode_bench.py"), "--dry-run", "--cache", str(tmp_path / "cache"),
         "--out", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
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
