"""One Markdown table comparing ASHEM runs: a row per ``results.json`` directory, mean ± std over its seeds.

    python benchmarks/ashem_compare.py runs/held-out runs/original --names "held-out" "original"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lash.report import aggregate, load_results

COLUMNS = (
    "run", "phase-1 PPL", "phase-2 full-depth PPL", "routing PPL", "routing vs phase 1", "compute cost",
    "hard PPL before → after", "hard vs phase 1", "kept phase-2 epochs", "minutes per run",
)  # fmt: skip


def _pm(stats: dict, fmt: str) -> str:
    return f"{format(stats['mean'], fmt)} ± {format(stats['std'], fmt)}"


def _signed(stats: dict) -> str:
    return f"{stats['mean']:+.1%} ± {stats['std']:.1%}"


def row(name: str, directory: Path) -> str:
    s = aggregate(load_results(directory / "results.json"))
    cells = (
        name,
        _pm(s["phase1_ppl"], ".1f"),
        _pm(s["phase2_ppl"], ".1f"),
        _pm(s["routing_ppl"], ".1f"),
        _signed(s["routing_ppl_change"]),
        _pm(s["compute_cost"], ".1%"),
        f"{_pm(s['hard_ppl_before'], '.1f')} → {_pm(s['hard_ppl_after'], '.1f')}",
        _signed(s["hard_ppl_change"]),
        ", ".join(str(int(k)) for k in s["phase2_kept_epoch"]["values"]),
        f"{s['seconds']['mean'] / 60:.1f}",
    )
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="directories holding a results.json")
    parser.add_argument("--names", nargs="+", help="row names (default: the directory names)")
    args = parser.parse_args()
    names = args.names or [d.name for d in args.dirs]
    if len(names) != len(args.dirs):
        parser.error(f"{len(args.dirs)} directories but {len(names)} names")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---:|" * (len(COLUMNS) - 1))
    for name, directory in zip(names, args.dirs):
        print(row(name, directory))


if __name__ == "__main__":
    main()
