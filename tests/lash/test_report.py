import json
import runpy
from pathlib import Path

import pytest

from lash.ashem import ASHEMResult
from lash.report import PUBLISHED_REFERENCE, aggregate, load_results, results_markdown, summary_table, write_report


def phase(ppl, layers, epochs=2, start=False):
    dev = [3.2, 3.1, 2.9][: epochs + 1] if start else [3.1, 2.9][:epochs]
    return {
        "ppl": ppl, "acc": 0.25, "per_layer": {str(layer): {"ppl": ppl + layer} for layer in layers},
        "train_losses": [3.0, 2.5][:epochs], "dev_losses": dev, "dev_ppls": dev, "best_epoch": epochs,
        "total_epochs": epochs,
    } | ({"dev_routing_losses": [3.0, 2.8][: epochs + 1]} if start else {})  # fmt: skip


def run(seed=0, phase1_ppl=40.0, hard_after=80.0, routing=37.5, kept=1):
    return ASHEMResult(
        config={"phase1_layers": 2, "phase2_layers": 3, "hard_example_ratio": 0.5, "protocol": "held-out"},
        setup={"mined_from": "train", "seq_len": 8, "seed": seed},
        phase1=phase(phase1_ppl, [1, 2]),
        threshold=0.3125,
        hard_ratio_mined=0.5,
        hard_ratio_val=0.4375,
        hard_before={"ppl": 100.0, "acc": 0.1, "tokens": 64},
        hard_after={"ppl": hard_after, "acc": 0.15, "tokens": 64},
        phase2=phase(35.0, [1, 2, 3], epochs=1, start=True) | {"best_epoch": kept},
        routing={"ppl": routing, "acc": 0.24, "shallow_ratio": 0.5, "compute_cost": 5 / 6},
        confidence_histogram={"edges": [0.0, 0.5, 1.0], "counts": [10.0, 6.0]},
        seconds={"phase1": 1.0, "phase2": 2.5},
    )


def test_summary_table_one_run_in_plain_words():
    table = summary_table([run()])
    assert "| Phase 1 model | 2 layers | 40.00 | 25.00% |" in table
    assert "| Two-stage routing | exit at 2, cost 83.3%; 6.2% lower PPL than phase 1 (better) | 37.50 | 24.00% |" in table
    assert "| Hard tokens, phase 2 | 20.0% lower PPL than phase 1 (better) | 80.00 | 15.00% |" in table
    assert "Threshold 0.3125 (the 50% quantile" in table and "43.75% of validation tokens are hard" in table
    assert "Phase 2 kept epoch 1 of 1: a trained epoch in every run" in table
    assert "20.0% higher PPL than phase 1 (worse)" in summary_table([run(hard_after=120.0)])
    assert "phase 2 did not help" in summary_table([run(hard_after=100.0, kept=0)])


def test_seeds_give_mean_and_sample_std_of_every_figure():
    runs = [run(0, 40.0, 80.0, kept=0), run(1, 44.0, 90.0, kept=1), run(2, 42.0, 70.0, kept=1)]
    summary = aggregate(runs)
    assert summary["phase1_ppl"] == {"mean": 42.0, "std": 2.0, "values": [40.0, 44.0, 42.0]}
    assert summary["hard_ppl_change"]["mean"] == pytest.approx(-0.2) and summary["hard_ppl_change"]["std"] == pytest.approx(0.1)
    assert summary["phase2_kept_epoch"]["values"] == [0, 1, 1]
    table = summary_table(runs)
    assert "| Phase 1 model | 2 layers | 42.00 ± 2.00 | 25.00% ± 0.00% |" in table
    assert "20.0% ± 10.0% lower PPL than phase 1 (better)" in table and "Over 3 runs (seeds 0, 1, 2)" in table
    assert "epoch 0 (the starting model: phase 2 did not help) in 1 of 3 runs" in table
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])


def test_results_markdown_sections():
    md = results_markdown([run(0), run(1, 44.0)], "python colab2.py")
    assert md.startswith("# ASHEM results\n\n```\npython colab2.py\n```")
    assert "| 3 | – | 38.00 ± 0.00 |" in md  # a layer phase 1 did not have
    assert "| 1 | 43.00 ± 2.83 | 36.00 ± 0.00 |" in md
    assert "| 1 | 44.00 | 37.50 | 100.00 → 80.00 | 1 of 1 | 4 |" in md
    assert "## Seed 1: history (dev slice)" in md and "| 2 | 2.5000 | 2.9000 | 2.90 |" in md
    assert "| 0 | – | 3.2000 | 3.0000 |" in md and "| 1 | 3.0000 | 3.1000 | 2.8000 |" in md
    assert "| seed | phase1 | phase2 |" in md and "| 0 | 1.0 | 2.5 |" in md
    assert f"Phase-1 PPL {PUBLISHED_REFERENCE['phase1_ppl']:.0f}" in md


def test_write_report_publishes_every_file_and_reads_back(tmp_path):
    runs = [run(0), run(1, 44.0)]
    paths = write_report(runs, tmp_path, "cmd")
    names = {"results.json", "results.md", "training_curves.png", "confidence_histogram.png", "ppl_per_exit.png"}
    assert {p.name for p in paths} == names == {p.name for p in tmp_path.iterdir()}
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["command"] == "cmd" and document["seeds"] == [0, 1] and document["summary"]["phase1_ppl"]["mean"] == 42.0
    assert load_results(tmp_path / "results.json") == runs
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in names if name.endswith(".png"))


def test_compare_script_prints_one_row_per_directory(tmp_path):
    compare = runpy.run_path(str(Path(__file__).parents[2] / "benchmarks" / "ashem_compare.py"))
    write_report([run(0, 40.0, 80.0, kept=0), run(1, 44.0, 90.0)], tmp_path, "cmd")
    row = compare["row"]("held-out", tmp_path)
    assert row.startswith("| held-out | 42.0 ± 2.8 | 35.0 ± 0.0 | 37.5 ± 0.0 | -10.5% ± 6.0% | 83.3% ± 0.0% |")
    assert "| 100.0 ± 0.0 → 85.0 ± 7.1 | -15.0% ± 7.1% | 0, 1 |" in row
