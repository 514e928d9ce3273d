"""CPU threads for training: as many as the cores that other processes leave free.

Torch runs CPU ops on a team of one OpenMP thread per core, and at the end of every parallel
region the team's threads spin for a while before they sleep. When another process keeps a core
busy, every one of the hundreds of small parallel regions of a training step waits for the team
member that shares its core with that process, and the spinning takes CPU from both. On a 2-core
machine with one other CPU-bound process, two threads made LASH's training step (ASHEM's phase-1
model) 3.5× slower than on an idle machine, and one thread made it no slower at all
(``benchmarks/cpu_threads.py``; the README has the table). So the ``auto`` policy measures, at the
start and before every epoch, how many cores other processes kept busy since the last look
(``/proc/stat`` less this process's own CPU time) and gives torch the rest, at least one.

Only a program that opts in (:func:`use`, as the CLI does) has its threads changed; the
:class:`lash.trainer.Trainer` calls :func:`refresh` at each epoch, which does nothing otherwise.
"""

from __future__ import annotations

import os
import time

import torch

_auto = False
_last: tuple[float, float, float] | None = None  # (wall s, busy CPU s of the machine, CPU s of this process)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _snapshot() -> tuple[float, float, float] | None:
    """Wall time, the whole machine's busy CPU seconds and this process's CPU seconds; ``None`` off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user … steal; guest time is inside user
    return time.monotonic(), busy, time.process_time()


def others_busy_cores(since: tuple[float, float, float], now: tuple[float, float, float]) -> float:
    """Cores other processes kept busy between two snapshots, on average."""
    wall = now[0] - since[0]
    if wall <= 0:
        return 0.0
    return max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / wall


def free_threads(others: float, cores: int) -> int:
    """Threads for the cores that others leave free: a core counts as taken from half a core of load."""
    return max(1, min(cores, cores - int(others + 0.5)))


def use(threads: str | int) -> int:
    """Set this process's torch threads: a count, or ``"auto"`` to follow the free cores from now on.

    Returns the thread count now in use.

    Raises:
        ValueError: ``threads`` is neither ``"auto"`` nor a whole number ≥ 1.
    """
    global _auto, _last
    if threads == "auto":
        _auto, _last = True, None
        first = _snapshot()
        if first is not None:
            time.sleep(0.1)  # a first look at the load before this process adds its own
            _last = first
        refresh()
        return torch.get_num_threads()
    try:
        count = int(threads)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or str(count) != str(threads).strip():
        raise ValueError(f"threads={threads!r} must be 'auto' or a whole number ≥ 1")
    _auto = False
    torch.set_num_threads(count)
    return count


def refresh() -> None:
    """Under ``auto``, give torch the cores other processes left free since the last call."""
    global _last
    if not _auto:
        return
    now = _snapshot()
    if now is None:
        return
    if _last is not None:
        wanted = free_threads(others_busy_cores(_last, now), _cores())
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
    _last = now
