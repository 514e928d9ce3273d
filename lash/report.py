"""ASHEM reports over one or more seeds: the summary table, ``results.json``, ``results.md`` and the plots.

Every figure is given as mean ± sample standard deviation over the runs (the value alone for one
run). The files are published as a set (:func:`lash.files.publish`): all are rendered and written
to temporary names first, then renamed into place together, so an interrupted run never leaves
a half-written result, or old and new files mixed, over an earlier report.
"""

from __future__ import annotations

import io
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lash.ashem import ASHEMResult
from lash.files import publish

# The ASHEM numbers the original implementation published (WikiText-2, 10K samples, dim 64), mined and measured
# on the validation set with single-token phase-2 training (README, "Compatibility").
PUBLISHED_REFERENCE = {"phase1_ppl": 986.0, "routing_ppl": 830.0, "hard_ppl_before": 2600.0, "hard_ppl_after": 571.0, "compute_cost": 0.64}

# Every scalar figure of a run, by name: what results.json's "summary" aggregates over seeds.
FIGURES: dict[str, Callable[[ASHEMResult], float]] = {
    "phase1_ppl": lambda r: r.phase1["ppl"],
    "phase1_acc": lambda r: r.phase1["acc"],
    "phase2_ppl": lambda r: r.phase2["ppl"],
    "phase2_acc": lambda r: r.phase2["acc"],
    "routing_ppl": lambda r: r.routing["ppl"],
    "routing_acc": lambda r: r.routing["acc"],
    "routing_ppl_change": lambda r: r.routing["ppl"] / r.phase1["ppl"] - 1,
    "shallow_ratio": lambda r: r.routing["shallow_ratio"],
    "compute_cost": lambda r: r.routing["compute_cost"],
    "hard_ppl_before": lambda r: r.hard_before["ppl"],
    "hard_ppl_after": lambda r: r.hard_after["ppl"],
    "hard_ppl_change": lambda r: r.hard_after["ppl"] / r.hard_before["ppl"] - 1,
    "hard_acc_before": lambda r: r.hard_before["acc"],
    "hard_acc_after": lambda r: r.hard_after["acc"],
    "threshold": lambda r: r.threshold,
    "hard_ratio_val": lambda r: r.hard_ratio_val,
    "phase1_best_epoch": lambda r: r.phase1["best_epoch"],
    "phase2_kept_epoch": lambda r: r.phase2["best_epoch"],
    "seconds": lambda r: sum(r.seconds.values()),
}


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def aggregate(results: Sequence[ASHEMResult]) -> dict[str, dict[str, Any]]:
    """``{figure: {"mean", "std", "values"}}`` for every figure of :data:`FIGURES` (std: sample, 0 for one run)."""
    if not results:
        raise ValueError("aggregate needs at least one ASHEM result")
    return {name: _spread([get(r) for r in results]) for name, get in FIGURES.items()}


def _pm(stats: dict[str, Any], fmt: str, runs: int) -> str:
    """``"24.33 ± 0.12"``, or the value alone for one run."""
    text = format(stats["mean"], fmt)
    return text if runs == 1 else f"{text} ± {format(stats['std'], fmt)}"


def _change(stats: dict[str, Any], runs: int) -> str:
    """A PPL ratio minus 1 in words: ``"4.4% lower PPL than phase 1 (better)"``."""
    mean = stats["mean"]
    spread = "" if runs == 1 else f" ± {stats['std']:.1%}"
    word, verdict = ("lower", "better") if mean < 0 else ("higher", "worse") if mean > 0 else ("equal", "no change")
    return f"{abs(mean):.1%}{spread} {word} PPL than phase 1 ({verdict})"


def summary_table(results: Sequence[ASHEMResult]) -> str:
    """The headline numbers as a Markdown table (validation split), mean ± std over the runs."""
    s, n = aggregate(results), len(results)
    cfg, setup = results[0].config, results[0].setup
    p1, p2 = cfg["phase1_layers"], cfg["phase2_layers"]
    rows = [
        ("Phase 1 model", f"{p1} layers", _pm(s["phase1_ppl"], ".2f", n), _pm(s["phase1_acc"], ".2%", n)),
        ("Phase 2 model, full depth", f"{p2} layers", _pm(s["phase2_ppl"], ".2f", n), _pm(s["phase2_acc"], ".2%", n)),
        (
            "Two-stage routing",
            f"exit at {p1}, cost {_pm(s['compute_cost'], '.1%', n)}; {_change(s['routing_ppl_change'], n)}",
            _pm(s["routing_ppl"], ".2f", n),
            _pm(s["routing_acc"], ".2%", n),
        ),
        ("Hard tokens, phase 1", f"{statistics.fmean(r.hard_before['tokens'] for r in results):.0f} tokens", _pm(s["hard_ppl_before"], ".2f", n), _pm(s["hard_acc_before"], ".2%", n)),
        ("Hard tokens, phase 2", _change(s["hard_ppl_change"], n), _pm(s["hard_ppl_after"], ".2f", n), _pm(s["hard_acc_after"], ".2%", n)),
    ]
    lines = ["| | | PPL | accuracy |", "|---|---|---:|---:|"] + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    kept = s["phase2_kept_epoch"]["values"]
    totals = [r.phase2["total_epochs"] for r in results]
    lines += [
        "",
        f"Over {n} run{'s' if n > 1 else ''} (seeds {', '.join(str(r.setup['seed']) for r in results)}). "
        f"Threshold {_pm(s['threshold'], '.4f', n)} (the {cfg['hard_example_ratio']:.0%} quantile of phase-1 "
        f"confidence on {setup['mined_from']} tokens; {_pm(s['hard_ratio_val'], '.2%', n)} of validation tokens "
        f"are hard); shallow ratio {_pm(s['shallow_ratio'], '.2%', n)}; protocol {cfg['protocol']}.",
        "",
        _kept_sentence(kept, totals, "validation hard tokens" if cfg["protocol"] == "original" else "dev slice's hard tokens"),
    ]
    return "\n".join(lines)


def _kept_sentence(kept: list[float], totals: list[int], selected_on: str) -> str:
    listed = ", ".join(f"{int(k)} of {t}" for k, t in zip(kept, totals))
    zeros = sum(k == 0 for k in kept)
    if zeros == len(kept):
        meaning = (f"phase 2 never beat its starting model on the {selected_on}, so the phase-2 model is the phase-1 "
                   "model with identity layers on top: phase 2 did not help")  # fmt: skip
    elif zeros:
        meaning = f"epoch 0 (the starting model: phase 2 did not help) in {zeros} of {len(kept)} runs"
    else:
        meaning = f"a trained epoch in every run: phase 2 improved the {selected_on}"
    return f"Phase 2 kept epoch {listed}: {meaning}."


def _phase1_history(p1: dict[str, Any]) -> list[str]:
    """Phase 1's dev-slice history as Markdown lines: one row per epoch."""
    out = [f"Phase 1 (kept epoch {p1['best_epoch']} of {p1['total_epochs']}):", "",
           "| epoch | train loss | dev loss | dev PPL |", "|---:|---:|---:|---:|"]  # fmt: skip
    for epoch, values in enumerate(zip(p1["train_losses"], p1["dev_losses"], p1["dev_ppls"]), 1):
        out.append("| {} | {:.4f} | {:.4f} | {:.2f} |".format(epoch, *values))
    return out


def phase1_markdown(p1: dict[str, Any], seed: int) -> str:
    """``phase1.md``: what a finished phase 1 measured (validation split), before phase 2 exists."""
    out = [f"# ASHEM seed {seed}: phase 1", "", "Validation split:", "", "| exit | loss | PPL | accuracy |",
           "|---:|---:|---:|---:|"]  # fmt: skip
    for layer, values in p1["per_layer"].items():
        out.append(f"| layer {layer} | {values['loss']:.4f} | {values['ppl']:.2f} | {values['acc']:.2%} |")
    out += ["", f"The model answers from its last layer: PPL {p1['ppl']:.2f}, accuracy {p1['acc']:.2%}.", ""]
    out += _phase1_history(p1) + ["", f"Wall time {p1['seconds']:.1f} s."]
    return "\n".join(out) + "\n"


def results_markdown(results: Sequence[ASHEMResult], command: str = "") -> str:
    """``results.md``: the summary, one row per run, per-exit PPL, per-epoch histories and timings."""
    out = ["# ASHEM results", ""]
    if command:
        out += ["```", command, "```", ""]
    setup = ", ".join(f"{k}={v}" for k, v in results[0].setup.items() if k != "seed")
    out += [f"Setup: {setup}.", "", "## Summary (validation split)", "", summary_table(results), ""]
    out += ["## Runs", "", "| seed | phase-1 PPL | routing PPL | hard PPL before → after | phase-2 kept epoch | wall time (s) |",
            "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        out.append(
            f"| {r.setup['seed']} | {r.phase1['ppl']:.2f} | {r.routing['ppl']:.2f} | {r.hard_before['ppl']:.2f} → "
            f"{r.hard_after['ppl']:.2f} | {r.phase2['best_epoch']} of {r.phase2['total_epochs']} | {sum(r.seconds.values()):.0f} |"
        )
    out += ["", "## PPL per exit", "", "| layer | phase 1 | phase 2 |", "|---:|---:|---:|"]
    n = len(results)
    for layer in results[0].phase2["per_layer"]:
        after = _spread([r.phase2["per_layer"][layer]["ppl"] for r in results])
        before = [r.phase1["per_layer"][layer]["ppl"] for r in results if layer in r.phase1["per_layer"]]
        out.append(f"| {layer} | {_pm(_spread(before), '.2f', n) if before else '–'} | {_pm(after, '.2f', n)} |")
    for r in results:
        out += ["", f"## Seed {r.setup['seed']}: history (dev slice)", ""]
        p1, p2 = r.phase1, r.phase2
        out += _phase1_history(p1)
        selected_on = "validation hard tokens, as the original protocol" if r.config["protocol"] == "original" else "dev slice"
        out += ["", f"Phase 2 (kept epoch {p2['best_epoch']} of {p2['total_epochs']}; epoch 0 is the starting model; "
                f"selected on the {selected_on}):", "",
                "| epoch | train loss | hard-token loss | dev routing loss |", "|---:|---:|---:|---:|"]  # fmt: skip
        for epoch, (dev, routed) in enumerate(zip(p2["dev_losses"], p2["dev_routing_losses"])):
            train = f"{p2['train_losses'][epoch - 1]:.4f}" if epoch else "–"
            out.append(f"| {epoch} | {train} | {dev:.4f} | {'–' if routed is None else f'{routed:.4f}'} |")
    phases = list(results[0].seconds)
    out += ["", "## Wall time (s)", "", "| seed | " + " | ".join(phases) + " |", "|---:|" + "---:|" * len(phases)]
    out += [f"| {r.setup['seed']} | " + " | ".join(f"{r.seconds[p]:.1f}" for p in phases) + " |" for r in results]
    ref = PUBLISHED_REFERENCE
    out += [
        "",
        "## The original implementation's published numbers (for comparison)",
        "",
        f"Phase-1 PPL {ref['phase1_ppl']:.0f}, routing PPL {ref['routing_ppl']:.0f}, hard PPL "
        f"{ref['hard_ppl_before']:.0f} → {ref['hard_ppl_after']:.0f}, compute cost {ref['compute_cost']:.0%} "
        "(WikiText-2, 10K samples; hard tokens mined from and measured on the validation set, phase 2 on single tokens).",
    ]
    return "\n".join(out) + "\n"


def results_json(results: Sequence[ASHEMResult], command: str = "") -> bytes:
    """``results.json``: the command, its seeds, every figure's mean/std/values and each run in full."""
    document = {
        "command": command,
        "seeds": [r.setup["seed"] for r in results],
        "summary": aggregate(results),
        "runs": [r.to_dict() for r in results],
    }
    return json.dumps(document, indent=2, default=float).encode()


def load_results(path: str | Path) -> list[ASHEMResult]:
    """The runs of a ``results.json``."""
    return [ASHEMResult(**run) for run in json.loads(Path(path).read_text())["runs"]]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def render_plots(results: Sequence[ASHEMResult]) -> dict[str, bytes]:
    """Training curves, the confidence histogram with its threshold, and PPL per exit, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    plots = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r, color in zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(results)):
        seed = r.setup["seed"]
        dev1 = r.phase1["dev_losses"]
        axes[0].plot(range(1, len(dev1) + 1), dev1, marker="s", color=color, label=f"seed {seed}")
        axes[0].plot(range(1, len(dev1) + 1), r.phase1["train_losses"], linestyle="--", color=color)
        axes[0].plot(r.phase1["best_epoch"], dev1[r.phase1["best_epoch"] - 1], marker="*", markersize=14, color=color)
        dev2 = r.phase2["dev_losses"]
        axes[1].plot(range(len(dev2)), dev2, marker="s", color=color, label=f"seed {seed}")
        axes[1].plot(r.phase2["best_epoch"], dev2[r.phase2["best_epoch"]], marker="*", markersize=14, color=color)
    axes[0].set(title="phase 1: dev loss (solid), train loss (dashed)", xlabel="epoch", ylabel="loss")
    axes[1].set(title="phase 2: dev hard-token loss (epoch 0 = start)", xlabel="epoch", ylabel="loss")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(title="★ kept epoch", fontsize="small")
    plots["training_curves.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.8))
    first = results[0]
    ax.stairs(first.confidence_histogram["counts"], first.confidence_histogram["edges"], fill=True, alpha=0.6)
    for r in results:
        ax.axvline(r.threshold, color="red", alpha=0.7, label=f"threshold {r.threshold:.3f} (seed {r.setup['seed']})")
    # Tokens below the threshold are the hard ones phase 2 trains on; those above exit at phase 1's depth.
    ax.axvspan(0.0, first.threshold, color="red", alpha=0.08, label="hard: phase 2 trains on these")
    ax.axvspan(first.threshold, 1.0, color="green", alpha=0.08, label="easy: exit after phase 1's layers")
    ax.set(title=f"phase-1 confidence (max softmax probability), seed {first.setup['seed']}", xlabel="confidence", ylabel="tokens")
    ax.legend(fontsize="small")
    plots["confidence_histogram.png"] = _png(fig)
    plt.close(fig)

    fig, (ax, gap) = plt.subplots(1, 2, figsize=(10, 3.8))
    spreads = {}
    for name, label, marker in (("phase1", "phase-1 model", "o"), ("phase2", "phase-2 model", "s")):
        layers = list(results[0].__dict__[name]["per_layer"])
        spreads[name] = {int(k): _spread([r.__dict__[name]["per_layer"][k]["ppl"] for r in results]) for k in layers}
        ax.errorbar(list(spreads[name]), [v["mean"] for v in spreads[name].values()],
                    yerr=[v["std"] for v in spreads[name].values()], marker=marker, capsize=4, label=label)  # fmt: skip
    # Logarithmic: the first exit's PPL is often several times the others', which would flatten
    # the before/after gap on a linear axis; the right panel shows that gap itself.
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    runs = f"mean ± std over {len(results)} seeds" if len(results) > 1 else "one seed"
    ax.set(title=f"validation PPL per exit ({runs}; log scale)", xlabel="layer", ylabel="PPL")
    ax.legend()
    last1 = max(spreads["phase1"])
    change = {k: 100 * (v["mean"] / spreads["phase1"][min(k, last1)]["mean"] - 1) for k, v in spreads["phase2"].items()}
    gap.bar(list(change), list(change.values()), color=["tab:green" if c < 0 else "tab:red" for c in change.values()])
    gap.axhline(0, color="black", linewidth=0.8)
    gap.set(title=f"phase 2 vs phase 1 (deeper exits vs phase 1's layer {last1})", xlabel="layer",
            ylabel="PPL change (%, below 0 = better)")  # fmt: skip
    for axis in (ax, gap):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    plots["ppl_per_exit.png"] = _png(fig)
    plt.close(fig)
    return plots


def write_report(results: Sequence[ASHEMResult], out_dir: str | Path, command: str = "") -> list[Path]:
    """Write ``results.json``, ``results.md`` and the plots into ``out_dir``; return the paths."""
    files = {"results.json": results_json(results, command), "results.md": results_markdown(results, command).encode()}
    return publish(files | render_plots(results), out_dir)
