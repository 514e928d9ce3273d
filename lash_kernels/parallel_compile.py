"""Compiling the kernels a function launches ahead of its first run, all at once.

Triton compiles a kernel the first time it is launched with a new specialization, one kernel after
another as a step reaches them. On a fresh machine (a new Colab session, an empty Triton cache)
the seed model's training step compiles 14 kernels: 8.7 s for sm_90 on a 2-core CPU (timed with
:mod:`lash_kernels.aot_check`'s compiler calls, 2026-12-07). :func:`compile_ahead` runs a function
once with every LASH launch turned into a compile on a thread pool. Triton's compiler leaves the
GIL for most of its work (two threads compiled those 14 kernels 1.9× as fast as one on the same
2 cores), so the first step waits about as long as its slowest kernel takes, not as long as all
of them; its launches then find their kernels compiled, and Triton's disk cache holds them too.

Nothing is launched during the pass: what the kernels would have written is left as allocated
(``torch.empty``), and the function's torch ops compute on it. So the function must not index,
size or branch on a kernel's output: a training step's forward and backward qualify (the loss
reads nothing back, and the ids it indexes with are its inputs). The launches of one kernel
compile one after another (a kernel launched once per layer compiles once, the others find it
in Triton's cache), those of different kernels in parallel.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

MAX_WORKERS = 16
_lock = threading.Lock()
# The pass under way, process-wide: autograd launches the backward's kernels from its own thread.
_active: _Pass | None = None


class _Pass:
    """One :func:`compile_ahead` pass: a compile queue per kernel, drained on a thread pool."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="lash-compile")
        self.queues: dict[object, list[Callable[[], None]]] = {}  # kernel → its compiles still to run
        self.errors: list[BaseException] = []

    def submit(self, kernel, grid, args: tuple, kwargs: dict) -> None:
        device = torch.cuda.current_device() if torch.cuda.is_available() else None

        def compile_one() -> None:
            with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
                kernel.warmup(*args, grid=grid, **kwargs)

        with _lock:
            queue = self.queues.get(kernel)
            if queue is not None:
                queue.append(compile_one)
                return
            self.queues[kernel] = [compile_one]
        self.pool.submit(self._drain, kernel)

    def _drain(self, kernel) -> None:
        while True:
            with _lock:
                queue = self.queues[kernel]
                if not queue:
                    del self.queues[kernel]
                    return
                compile_one = queue[0]
            try:
                compile_one()
            except Exception as error:  # noqa: BLE001 - raised by compile_ahead once the pass is over
                self.errors.append(error)
            with _lock:
                queue.pop(0)


class _CompileOnly:
    """A kernel whose launches compile it on the pass's threads instead of running it."""

    def __init__(self, kernel, active: _Pass) -> None:
        self.kernel, self.active = kernel, active

    def __getitem__(self, grid) -> Callable[..., None]:
        return lambda *args, **kwargs: self.active.submit(self.kernel, grid, args, kwargs)


def compiling_only(kernel) -> _CompileOnly | None:
    """``kernel`` as a pass under way compiles it (:func:`lash_kernels._launch.launch` asks), or None."""
    active = _active
    return None if active is None else _CompileOnly(kernel, active)


def compile_ahead(fn: Callable[[], object], workers: int | None = None) -> None:
    """Run ``fn`` once, compiling instead of launching every LASH kernel it reaches, ``workers``
    threads at a time (default: the CPU's cores, at most :data:`MAX_WORKERS`); return when every
    kernel is compiled. A compiler error is raised here, as the launch would have raised it."""
    global _active
    with _lock:
        if _active is not None:
            raise RuntimeError("compile_ahead is already running in this process")
        _active = active = _Pass(workers or min(MAX_WORKERS, os.cpu_count() or 1))
    try:
        fn()
    finally:
        with _lock:
            _active = None
        active.pool.shutdown(wait=True)
    if active.errors:
        raise active.errors[0]
