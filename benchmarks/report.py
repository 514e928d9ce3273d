"""Turn pytest-benchmark JSON into the README's Markdown tables.

    pytest benchmarks/ --benchmark-only --benchmark-json=results.json
    python benchmarks/report.py results.json [more.json ...] > results.md

Each JSON gets a header with where and when it ran (``machine_info["lash"]``, written by
``benchmarks/conftest.py``: device, torch/triton/CUDA versions, date), then one table per
benchmark file: the case, its median and mean time, and every ``extra_info`` field except the
device (ratios such as ``speedup_vs_ideal`` included).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

_SKIPPED_INFO = {"device"}


def _cell(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def header(data: dict) -> str:
    """One line: device, versions, date of the run."""
    lash = data.get("machine_info", {}).get("lash", {})
    parts = [f"device {lash.get('device', 'unknown')}", f"torch {lash.get('torch', '?')}"]
    parts += [f"{name} {lash[name]}" for name in ("triton", "cuda") if lash.get(name)]
    parts.append(f"date {lash.get('date', data.get('datetime', '?')[:10])}")
    return "; ".join(parts)


def tables(data: dict) -> list[str]:
    """One Markdown table per benchmark file, cases in run order."""
    by_file: dict[str, list[dict]] = defaultdict(list)
    for bench in data.get("benchmarks", []):
        by_file[bench["fullname"].split("::")[0]].append(bench)
    out = []
    for path, benches in by_file.items():
        keys: list[str] = []
        for bench in benches:
            keys += [k for k in bench.get("extra_info", {}) if k not in _SKIPPED_INFO and k not in keys]
        lines = [
            f"### {Path(path).stem}",
            "",
            "| case | median (ms) | mean (ms) | " + " | ".join(keys) + " |",
            "|---|---:|---:|" + "---:|" * len(keys),
        ]
        for bench in benches:
            stats, info = bench["stats"], bench.get("extra_info", {})
            cells = [bench["name"], f"{stats['median'] * 1e3:.3f}", f"{stats['mean'] * 1e3:.3f}"]
            cells += [_cell(info.get(k)) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return out


def report(paths: list[Path]) -> str:
    """The Markdown for every JSON file given."""
    sections = []
    for path in paths:
        data = json.loads(path.read_text())
        sections.append("\n\n".join([f"## {path.name}", header(data), *tables(data)]))
    return "\n\n".join(sections) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Markdown tables from pytest-benchmark JSON files.")
    parser.add_argument("results", nargs="+", type=Path, help="pytest-benchmark --benchmark-json outputs")
    print(report(parser.parse_args().results), end="")


if __name__ == "__main__":
    main()
