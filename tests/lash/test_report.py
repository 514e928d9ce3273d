import json

import pytest

from lash.ashem import ASHEMResult
from lash.report import SEED_REFERENCE, results_markdown, summary_table, write_report


def phase(ppl, layers, epochs=2):
    return {
        "ppl": ppl, "acc": 0.25, "per_layer": {str(layer): {"ppl": ppl + layer} for layer in layers},
        "train_losses": [3.0, 2.5][:epochs], "val_losses": [3.1, 2.9][:epochs], "val_ppls": [22.2, 18.2][:epochs],
        "val_accs": [0.2, 0.25][:epochs], "best_epoch": epochs, "total_epochs": epochs,
    }  # fmt: skip


@pytest.fixture
def result():
    return ASHEMResult(
        config={"phase1_layers": 2, "phase2_layers": 3, "hard_example_ratio": 0.5, "protocol": "held-out"},
        setup={"mined_from": "train", "seq_len": 8},
        phase1=phase(40.0, [1, 2]),
        threshold=0.3125,
        hard_ratio_mined=0.5,
        hard_ratio_val=0.4375,
        hard_before={"ppl": 100.0, "acc": 0.1, "tokens": 64},
        hard_after={"ppl": 80.0, "acc": 0.15, "tokens": 64},
        phase2=phase(35.0, [1, 2, 3], epochs=1),
        routing={"ppl": 37.5, "acc": 0.24, "shallow_ratio": 0.5, "compute_cost": 5 / 6},
        confidence_histogram={"edges": [0.0, 0.5, 1.0], "counts": [10.0, 6.0]},
        seconds={"phase1": 1.0, "phase2": 2.5},
    )


def test_summary_table_rows(result):
    table = summary_table(result)
    assert "| Phase 1 model | 2 layers | 40.00 | 25.00% |" in table
    assert "| Two-stage routing | exit at 2, cost 83.3% | 37.50 | 24.00% |" in table
    assert "| Hard tokens, phase 2 | PPL +20.0% better | 80.00 | 15.00% |" in table
    assert "Threshold 0.3125 (the 50% quantile" in table and "43.75% on validation" in table
    result.hard_after["ppl"] = 120.0
    assert "PPL 20.0% worse" in summary_table(result)


def test_results_markdown_sections(result):
    md = results_markdown(result, "python colab2.py")
    assert md.startswith("# ASHEM results\n\n```\npython colab2.py\n```")
    assert "| 3 | – | 38.00 |" in md  # a layer phase 1 did not have
    assert "| 1 | 41.00 | 36.00 |" in md
    assert "## phase1 history (best epoch 2 of 2)" in md and "| 2 | 2.5000 | 2.9000 | 18.20 | 25.00% |" in md
    assert "| phase1 | phase2 |" in md and "| 1.0 | 2.5 |" in md
    assert f"Phase-1 PPL {SEED_REFERENCE['phase1_ppl']:.0f}" in md


def test_write_report_publishes_every_file(result, tmp_path):
    paths = write_report(result, tmp_path, "cmd")
    names = {"results.json", "results.md", "training_curves.png", "confidence_histogram.png", "ppl_per_exit.png"}
    assert {p.name for p in paths} == names == {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "results.json").read_text())["threshold"] == 0.3125
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in names if name.endswith(".png"))
