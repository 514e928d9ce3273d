"""The GPU suite's table: its rows, how a measurement becomes one, and its Markdown.

A :class:`Suite` collects the rows (:class:`Row`: bar, measured, target, PASS/FAIL/INFO/DRY/
SKIPPED/ERROR, note) and the raw measurements behind them. :func:`side_by_side` times a row's providers together
(``measure.device_timer`` and ``measure.interleaved``) and stores each one's median, spread,
timings and method; :func:`ratio_row` turns two of them into a judged row, or into a SKIPPED or
ERROR row that carries the reason a provider did not run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass

import torch

import kernel_bench
import measure


@dataclass
class Row:
    """One line of the bars table."""

    bar: str
    measured: str
    target: str
    status: str  # PASS, FAIL, INFO, DRY (dry run: not judged), SKIPPED, ERROR
    note: str = ""


class Suite:
    """Collects rows and raw measurements; ``dry`` marks every judged row DRY instead of PASS/FAIL.

    ``on_row`` runs after every row is added: the suite saves its files there, so a run that its
    time box stops keeps every row it finished, not only its finished sections."""

    def __init__(self, dry: bool, quick: bool, on_row: Callable[[], None] = lambda: None) -> None:
        self.dry, self.quick, self.on_row = dry, quick, on_row
        self.rows: list[Row] = []
        self.measurements: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}  # per section, so gpu_all.sh's time box can be checked

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.on_row()

    def judge(self, bar: str, value: float, target: str, passes: Callable[[float], bool] | None, unit: str = "",
              note: str = "") -> None:
        """Add a row for ``value`` against ``target``: ``passes`` decides PASS/FAIL; None makes it INFO."""
        if passes is None:
            status = "INFO"
        else:
            status = "DRY" if self.dry else ("PASS" if passes(value) else "FAIL")
        self.add(Row(bar, f"{value:.3g}{unit}", target, status, note))

    def info(self, bar: str, measured: str, note: str = "") -> None:
        self.add(Row(bar, measured, "–", "INFO", note))

    def skip(self, bar: str, target: str, reason: str) -> None:
        self.add(Row(bar, "–", target, "SKIPPED", reason))

    def section(self, name: str, fn: Callable[[], None]) -> None:
        """Run one subject; an exception becomes an ERROR row instead of ending the run."""
        start = time.perf_counter()
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - one broken subject must not lose the others
            self.add(Row(name, "–", "–", "ERROR", measure.describe(error)))
        self.seconds[name] = time.perf_counter() - start
        print(f"[{self.seconds[name]:6.1f} s] {name}", file=sys.stderr, flush=True)


def attempt(fn: Callable[[], object]) -> object:
    """``fn()``, or why it failed as a string: "skipped: …" (Unavailable, out of memory) or "error: …"."""
    try:
        return fn()
    except kernel_bench.Unavailable as why:
        return f"skipped: {why}"
    except torch.OutOfMemoryError:
        return "skipped: out of memory"
    except Exception as error:  # noqa: BLE001 - recorded and shown, the other providers still run
        return f"error: {measure.describe(error)}"


def store(record: dict, name: str, fn: Callable[[], float]) -> None:
    """Store ``fn()`` as ``record[name]``, or why it failed."""
    record[name] = attempt(fn)


def dry_compile(suite: Suite, record: dict, provider: str) -> bool:
    """In a dry run, record a compile provider as skipped (compiling would take most of the run)."""
    if suite.dry and "compile" in provider:
        record[f"{provider}_s"] = "skipped: dry run: torch.compile is timed on a GPU only"
    return suite.dry and "compile" in provider


def side_by_side(suite: Suite, record: dict, builders: dict[str, Callable[[], Callable[[], object]]],
                 eager: tuple[str, ...] = ()) -> None:
    """Time the calls each builder makes, interleaved (:func:`measure.interleaved`), into ``record``.

    Every provider's timer is built first (inputs, warm-up, graph capture), then timed; the
    providers named in ``eager`` by eager calls, never graphed. Per provider ``p``: ``p_s`` the
    median seconds per call (or why it did not run), ``p_spread``, ``p_times_s`` and ``p_method``.
    """
    timers: dict[str, Callable[[], float]] = {}
    for name, build in builders.items():
        if dry_compile(suite, record, name):
            continue
        built = attempt(lambda build=build, name=name: measure.device_timer(build(), eager=name in eager))
        if isinstance(built, str):
            record[f"{name}_s"] = built
        else:
            timers[name], record[f"{name}_method"] = built
    results = attempt(lambda: measure.interleaved(timers))
    for name in timers:
        if isinstance(results, str):
            record[f"{name}_s"] = results
            continue
        record[f"{name}_s"], record[f"{name}_spread"] = results[name]["median_s"], results[name]["spread"]
        record[f"{name}_times_s"] = results[name]["times_s"]


def spreads(record: dict, *providers: str) -> str:
    """The spreads of ``providers`` over the repeats, for a row's note."""
    parts = [f"{p} {record[f'{p}_spread']:.1%}" for p in providers if f"{p}_spread" in record]
    return f"spread over {measure.REPEATS} repeats: {', '.join(parts)}" if parts else ""


def ratio_row(suite: Suite, bar: str, num: float | str, den: float | str, target: str,
              passes: Callable[[float], bool] | None, note: str = "") -> float | None:
    """A row for ``num / den`` or, if either side is a reason string, SKIPPED/ERROR with that reason.

    Returns the ratio, None when there is none.
    """
    for side in (num, den):
        if isinstance(side, str):
            status = "ERROR" if side.startswith("error") else "SKIPPED"
            suite.add(Row(bar, "–", target, status, side.split(": ", 1)[1]))
            return None
    suite.judge(bar, num / den, target, passes, "×", note)
    return num / den


def markdown(env: dict, rows: list[Row], mode: str, seconds: float) -> str:
    """The header (device, versions, date, mode) and the bars table, then what was skipped and why."""
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda", "liger_kernel", "cut_cross_entropy")
                         if env.get(k))
    if mode.startswith("dry-run"):
        mode += " (CPU, tiny shapes, torch paths: numbers check the machinery, not the bars)"
    lines = [
        "# LASH GPU suite: DESIGN.md's performance bars",
        "",
        f"Device {env['device']}; {versions}; {env['date']}; mode {mode}; {seconds:.0f} s.",
        "",
        "| bar | measured | target | status | note |",
        "|---|---:|---:|---|---|",
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in astuple(r)) + " |" for r in rows),
    ]
    skipped = [r for r in rows if r.status in ("SKIPPED", "ERROR")]
    if skipped:
        lines += ["", "Skipped or failed to run:", "", *(f"- {r.bar}: {r.status} — {r.note}" for r in skipped)]
    if any("not importable" in r.note for r in rows):
        lines += ["", f"Liger-Kernel and Cut Cross-Entropy: {kernel_bench.WHEELS}."]
    return "\n".join(lines) + "\n"
