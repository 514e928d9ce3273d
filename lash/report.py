"""ASHEM reports: the summary table, ``results.json``, ``results.md`` and the plots.

The files are published as a set (:func:`lash.files.publish`): all are rendered and written
to temporary names first, then renamed into place together, so an interrupted run never leaves
a half-written result, or old and new files mixed, over an earlier report.
"""

from __future__ import annotations

import io
from pathlib import Path

from lash.ashem import ASHEMResult
from lash.files import publish

# The original description's published ASHEM numbers (WikiText-2, 10K samples, dim 64), mined and measured on
# the validation set with single-token phase-2 training.
SEED_REFERENCE = {"phase1_ppl": 986.0, "routing_ppl": 830.0, "hard_ppl_before": 2600.0, "hard_ppl_after": 571.0, "compute_cost": 0.64}


def summary_table(result: ASHEMResult) -> str:
    """The headline numbers as a Markdown table (validation split)."""
    cfg, setup = result.config, result.setup
    p1, p2 = cfg["phase1_layers"], cfg["phase2_layers"]
    gain = 1 - result.hard_after["ppl"] / result.hard_before["ppl"]
    rows = [
        ("Phase 1 model", f"{p1} layers", f"{result.phase1['ppl']:.2f}", f"{result.phase1['acc']:.2%}"),
        ("Phase 2 model, full depth", f"{p2} layers", f"{result.phase2['ppl']:.2f}", f"{result.phase2['acc']:.2%}"),
        (
            "Two-stage routing",
            f"exit at {p1}, cost {result.routing['compute_cost']:.1%}",
            f"{result.routing['ppl']:.2f}",
            f"{result.routing['acc']:.2%}",
        ),
        ("Hard tokens, phase 1", f"{result.hard_before['tokens']} tokens", f"{result.hard_before['ppl']:.2f}", f"{result.hard_before['acc']:.2%}"),
        ("Hard tokens, phase 2", f"PPL {gain:+.1%} better" if gain >= 0 else f"PPL {-gain:.1%} worse", f"{result.hard_after['ppl']:.2f}", f"{result.hard_after['acc']:.2%}"),
    ]
    lines = ["| | | PPL | accuracy |", "|---|---|---:|---:|"] + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines.append("")
    lines.append(
        f"Threshold {result.threshold:.4f} (the {cfg['hard_example_ratio']:.0%} quantile of phase-1 confidence on "
        f"{setup['mined_from']} tokens; achieved hard ratio {result.hard_ratio_mined:.2%} there, "
        f"{result.hard_ratio_val:.2%} on validation); shallow ratio {result.routing['shallow_ratio']:.2%}; "
        f"protocol {cfg['protocol']}."
    )
    return "\n".join(lines)


def results_markdown(result: ASHEMResult, command: str = "") -> str:
    """``results.md``: the summary, per-exit PPL, per-epoch history and timings."""
    out = ["# ASHEM results", ""]
    if command:
        out += ["```", command, "```", ""]
    setup = ", ".join(f"{k}={v}" for k, v in result.setup.items())
    out += [f"Setup: {setup}.", "", "## Summary (validation split)", "", summary_table(result), ""]
    out += ["## PPL per exit", "", "| layer | phase 1 | phase 2 |", "|---:|---:|---:|"]
    for layer, after in result.phase2["per_layer"].items():
        before = result.phase1["per_layer"].get(layer)
        out.append(f"| {layer} | {before['ppl']:.2f} | {after['ppl']:.2f} |" if before else f"| {layer} | – | {after['ppl']:.2f} |")
    for name in ("phase1", "phase2"):
        phase = result.__dict__[name]
        out += ["", f"## {name} history (best epoch {phase['best_epoch']} of {phase['total_epochs']})", ""]
        out += ["| epoch | train loss | val loss | val PPL | val acc |", "|---:|---:|---:|---:|---:|"]
        for epoch, values in enumerate(zip(phase["train_losses"], phase["val_losses"], phase["val_ppls"], phase["val_accs"]), 1):
            out.append("| {} | {:.4f} | {:.4f} | {:.2f} | {:.2%} |".format(epoch, *values))
    out += ["", "## Wall time (s)", "", "| " + " | ".join(result.seconds) + " |", "|" + "---:|" * len(result.seconds)]
    out.append("| " + " | ".join(f"{s:.1f}" for s in result.seconds.values()) + " |")
    ref = SEED_REFERENCE
    out += [
        "",
        "## The original description's published numbers (for comparison)",
        "",
        f"Phase-1 PPL {ref['phase1_ppl']:.0f}, routing PPL {ref['routing_ppl']:.0f}, hard PPL "
        f"{ref['hard_ppl_before']:.0f} → {ref['hard_ppl_after']:.0f}, compute cost {ref['compute_cost']:.0%} "
        "(WikiText-2, 10K samples; hard tokens mined from and measured on the validation set, phase 2 on single tokens).",
    ]
    return "\n".join(out) + "\n"


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def render_plots(result: ASHEMResult) -> dict[str, bytes]:
    """Training curves, the confidence histogram with its threshold, and PPL per exit, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, name in zip(axes, ("phase1", "phase2")):
        phase = result.__dict__[name]
        epochs = range(1, len(phase["train_losses"]) + 1)
        ax.plot(epochs, phase["train_losses"], marker="o", label="train loss")
        ax.plot(epochs, phase["val_losses"], marker="s", label="val loss")
        ax.axvline(phase["best_epoch"], color="grey", linestyle=":", label="best epoch")
        ax.set(title=f"{name} ({'hard tokens' if name == 'phase2' else 'all tokens'})", xlabel="epoch", ylabel="loss")
        ax.legend()
    plots["training_curves.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.8))
    edges, counts = result.confidence_histogram["edges"], result.confidence_histogram["counts"]
    ax.stairs(counts, edges, fill=True, alpha=0.6)
    ax.axvline(result.threshold, color="red", label=f"threshold {result.threshold:.3f}")
    ax.set(title="phase-1 confidence (max softmax probability)", xlabel="confidence", ylabel="tokens")
    ax.legend()
    plots["confidence_histogram.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, marker in (("phase1", "o"), ("phase2", "s")):
        per_layer = result.__dict__[name]["per_layer"]
        ax.plot([int(k) for k in per_layer], [v["ppl"] for v in per_layer.values()], marker=marker, label=name)
    ax.set(title="validation PPL per exit", xlabel="layer", ylabel="PPL", yscale="log")
    ax.legend()
    plots["ppl_per_exit.png"] = _png(fig)
    plt.close(fig)
    return plots


def write_report(result: ASHEMResult, out_dir: str | Path, command: str = "") -> list[Path]:
    """Write ``results.json``, ``results.md`` and the plots into ``out_dir``; return the paths."""
    files = {"results.json": result.to_json(), "results.md": results_markdown(result, command).encode()}
    return publish(files | render_plots(result), out_dir)
