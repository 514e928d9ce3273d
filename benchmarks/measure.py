"""How the benchmarks measure: the device, device and host time, peak memory, the ceilings.

Plain functions, shared by the pytest-benchmark files and ``benchmarks/gpu_suite.py``:

* :class:`Rotation`: one call per input set, every set allocated before any timing, enough sets
  (:func:`input_sets`) that a set's inputs have left the L2 cache when its turn comes again;
* :func:`device_timer` times a call on the device. On CUDA it warms up on a side stream, captures
  one CUDA graph that runs the call once per input set (in a private memory pool, so every
  output and gradient the calls allocate is allocated at capture), and each timing replays the
  graph between two CUDA events, a number of replays sized to take about 20 ms, divided by
  replays × sets. A call that cannot be captured (one that reads a value back to the host) is
  timed between CUDA events over its eager calls, one input set after another, as few calls as
  20 ms allow, and the method it got is returned beside the timer.
  On the CPU each timing is :func:`median_seconds`;
* :func:`interleaved` takes one timing of each provider in turn, ``REPEATS`` times, so that
  drift in clocks or temperature hits all providers alike, and gives each provider's median and
  spread ((max - min) / median) over the repeats;
* :func:`same_size_copy`: the ceiling of a memory-bound kernel, a device copy that reads and
  writes as many bytes as the kernel must move, over rotating buffers like the kernel's inputs;
* :func:`host_timer`: seconds per eager call as the host issues them: back-to-back calls
  without a sync between them, one sync after (on tiny inputs the device keeps up, so this is
  the host's cost of the call);
* :func:`median_seconds`: ``triton.testing.do_bench`` on CUDA (CUDA events, the L2 cache cleared
  before each call, median) for calls that are not graphed; on the CPU the wall-clock median of
  a few calls;
* :func:`peak_memory_bytes`: ``torch.cuda.max_memory_allocated`` above what was live before;
* :func:`copy_bandwidth_gbps` and :func:`matmul_tflops`: the device's copy bandwidth and bf16
  matmul throughput at one large size, reported beside the results;
* :func:`compiled`: ``torch.compile`` with dynamo reset first and a hit recompile limit made an
  error, so a compiled provider never quietly runs eager; :func:`compile_counts` reports it.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import importlib.util
import itertools
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # On the CPU the torch paths are timed; the Triton interpreter would only measure Python.
    os.environ.setdefault("LASH_KERNELS", "torch")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
# Below this much device memory (an L4 has 24 GB) the benchmarks pick their smaller configs.
LARGE_DEVICE_BYTES = 40 * 2**30
# Input sets are rotated until a round of them moves this much, several times an H100's or
# H200's 50 MiB L2, so no call finds its inputs in the cache.
L2_FLUSH_BYTES = 256 * 2**20
MAX_INPUT_SETS = 64
REPEATS = 5  # timings per provider, interleaved with the other providers'
TIMING_S = 0.02  # device time one timing replays
EAGER_METHOD = "CUDA events around eager calls"  # how device_timer times a call it cannot or may not graph
HOST_CALLS = 200  # eager calls per host timing


def has_module(name: str) -> bool:
    """Whether ``name`` can be imported (a missing parent package counts as missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def device_name() -> str:
    """Human-readable name of the benchmark device."""
    if ON_GPU:
        return torch.cuda.get_device_name(DEVICE)
    return f"cpu ({os.cpu_count()} cores)"


def large_device() -> bool:
    """True on a GPU with at least 40 GiB (A100-80GB, H100); False on an L4, a T4 or the CPU."""
    return ON_GPU and torch.cuda.get_device_properties(DEVICE).total_memory >= LARGE_DEVICE_BYTES


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, str | None]:
    """Where and when: device, torch/triton/CUDA and baseline-library versions, date (UTC)."""
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if has_module("triton") else None,
        "cuda": torch.version.cuda,
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
    }


def describe(error: BaseException) -> str:
    """One line for a failed measurement: the exception's type and the first line of its message."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize(DEVICE)


def median_seconds(fn: Callable[[], object], cpu_rounds: int = 3) -> float:
    """Median time of one call of ``fn``, measured on the device after warm-up.

    On CUDA, ``triton.testing.do_bench`` (CUDA events; it clears the L2 cache before each call).
    On the CPU, ``cpu_rounds`` wall-clock calls after one warm-up call.
    """
    if ON_GPU:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(cpu_rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def input_sets(nbytes: int) -> int:
    """How many input sets a call moving ``nbytes`` rotates through on CUDA to pass the L2 (1 on the CPU)."""
    return max(1, min(MAX_INPUT_SETS, math.ceil(L2_FLUSH_BYTES / nbytes))) if ON_GPU else 1


class Rotation:
    """Calls of one op, one per input set, the sets allocated up front; calling it runs the next one."""

    def __init__(self, calls: Iterable[Callable[[], object]]) -> None:
        self.calls = tuple(calls)
        self._next = itertools.cycle(self.calls)

    def __call__(self) -> object:
        return next(self._next)()


def same_size_copy(nbytes: int, dtype: torch.dtype) -> Rotation:
    """Device copies that read ``nbytes / 2`` and write ``nbytes / 2``: the ceiling of a kernel moving ``nbytes``.

    The buffers are ``dtype`` (the kernel's activations' type) and rotate like the kernel's inputs.
    """
    element = torch.finfo(dtype).bits // 8
    assert nbytes % (2 * element) == 0, f"{nbytes} bytes do not split into two halves of {dtype} elements"
    numel = nbytes // 2 // element
    pairs = [(torch.randn(numel, device=DEVICE, dtype=dtype), torch.empty(numel, device=DEVICE, dtype=dtype))
             for _ in range(input_sets(nbytes))]
    return Rotation(lambda src=src, dst=dst: dst.copy_(src) for src, dst in pairs)


_STREAM: torch.cuda.Stream | None = None


def _capture_stream() -> torch.cuda.Stream:
    """The one side stream graphs are warmed up and captured on (created on first use)."""
    global _STREAM
    if _STREAM is None:
        _STREAM = torch.cuda.Stream(DEVICE)
    return _STREAM


@contextlib.contextmanager
def on_capture_stream() -> Iterator[None]:
    """Run the block on the capture stream, ordered after the work queued before it and before the work after.

    A backward runs on the stream of its forward, so a forward whose backward will be captured
    alone runs here. On the CPU it does nothing.
    """
    if not ON_GPU:
        yield
        return
    stream = _capture_stream()
    stream.wait_stream(torch.cuda.current_stream(DEVICE))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(DEVICE).wait_stream(stream)


def _event_timer(run: Callable[[], object], calls_per_run: int) -> Callable[[], float]:
    """Seconds per call: ``run`` (``calls_per_run`` calls) repeated between two CUDA events, ``TIMING_S`` in all."""

    def elapsed(runs: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(runs):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    runs = max(1, math.ceil(TIMING_S / max(elapsed(1), 1e-6)))
    return lambda: elapsed(runs) / (runs * calls_per_run)


def device_timer(fn: Callable[[], object], eager: bool = False) -> tuple[Callable[[], float], str]:
    """A timing function for ``fn`` (seconds per call, on the device) and how it times.

    ``fn`` is a :class:`Rotation` or one call. On CUDA: warm-up calls of the first input set on
    the capture stream (compilation, autotuning, lazy initialisation stay out of the graph), the
    last of them under :func:`host_syncs`, and one call of every other set; then one graph of a
    call per set, captured in its own memory pool, which a timing replays. A call that
    synchronises with the host cannot be captured; it is timed by eager calls, one set after
    another, as few as :data:`TIMING_S` allows: such a call is host-bound (Liger-Kernel's loss
    takes over 0.1 s at the seed's width), and a timing of every set would outlast the suite's
    time box. ``eager`` times any call that way: the like-for-like peer of one that syncs. On
    the CPU a timing is :func:`median_seconds`.
    """
    if not ON_GPU:
        return (lambda: median_seconds(fn)), "wall clock, median of 3 calls"
    calls = fn.calls if isinstance(fn, Rotation) else (fn,)

    def run_all() -> None:
        for call in calls:
            call()

    with on_capture_stream():
        syncs = host_syncs(calls[0], warmup=2)
        if syncs or eager:
            why = f"host syncs at {', '.join(syncs)}" if syncs else "no host sync"
            return _event_timer(Rotation(calls), 1), f"{EAGER_METHOD} ({why})"
        for call in calls[1:]:
            call()
    graph = torch.cuda.CUDAGraph()
    # The outer context restores the caller's stream even if the capture fails part-way.
    with torch.cuda.stream(_capture_stream()), torch.cuda.graph(graph, stream=_capture_stream()):
        run_all()
    graph.replay()  # the first replay uploads the graph
    return _event_timer(graph.replay, len(calls)), f"CUDA graph replay, {len(calls)} input sets"


def summary(times: list[float]) -> dict[str, float | list[float]]:
    """Median, spread ((max - min) / median) and every timing of one provider."""
    median = statistics.median(times)
    return {"median_s": median, "spread": (max(times) - min(times)) / median, "times_s": times}


def interleaved(timers: dict[str, Callable[[], float]], repeats: int = REPEATS) -> dict[str, dict]:
    """Each provider's :func:`summary` over ``repeats`` rounds, each round one timing of every provider in turn."""
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            times[name].append(timer())
    return {name: summary(values) for name, values in times.items()}


def host_timer(fn: Callable[[], object], calls: int = HOST_CALLS) -> Callable[[], float]:
    """A timing function: seconds per call of ``calls`` back-to-back eager calls of ``fn``, synchronised once after.

    ``fn`` runs ten times first (compilation, caches). With inputs small enough that the device
    finishes each call before the host has issued the next, a timing is the host's time per call.
    """
    for _ in range(10):
        fn()

    def seconds() -> float:
        synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize()
        return (time.perf_counter() - start) / calls

    return seconds


def device_kernels(fn: Callable[[], object]) -> int | None:
    """Device activities (kernels, copies, fills) of one call of ``fn``, from the profiler, after
    a warm-up call; None on the CPU."""
    if not ON_GPU:
        return None
    fn()
    synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        synchronize()
    return sum(1 for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def sync_warnings(step: Callable[[], object], warmup: int = 3) -> list[warnings.WarningMessage]:
    """One warning for every time ``step`` synchronises with the host, after ``warmup`` calls.

    One call runs under ``torch.cuda.set_sync_debug_mode("warn")``; every synchronising CUDA
    operation (``.item()``, ``bool(tensor)``, a device-to-host copy, ``nonzero`` …) then warns from
    the Python line that issued it.
    """
    for _ in range(warmup):
        step()
    synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    synchronize()
    return [w for w in caught if "called a synchronizing" in str(w.message)]  # not the "prototype feature" notice


def host_syncs(step: Callable[[], object], warmup: int = 3) -> list[str]:
    """The places where ``step`` synchronises with the host (:func:`sync_warnings`): the distinct
    ``dir/file:line`` places, in the order first hit; empty when there were none."""
    places = [f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}" for w in sync_warnings(step, warmup)]
    return list(dict.fromkeys(places))


def peak_memory_bytes(fn: Callable[[], object]) -> int | None:
    """Peak device memory allocated while ``fn`` runs, above what was live before (GPU only)."""
    if not ON_GPU:
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    before = torch.cuda.memory_allocated(DEVICE)
    fn()
    synchronize()
    return torch.cuda.max_memory_allocated(DEVICE) - before


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written) of one 1 GiB fp32 copy (32 MiB on the CPU)."""
    numel = (1024 if ON_GPU else 32) * 2**20 // 4
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / median_seconds(lambda: dst.copy_(src)) / 1e9


def matmul_tflops() -> float:
    """Dense matmul throughput in TFLOP/s: bf16 8192³ on a GPU (fp32 1024³ on the CPU)."""
    n, dtype = (8192, torch.bfloat16) if ON_GPU else (1024, torch.float32)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b) / 1e12


def compiled(fn: Callable, fullgraph: bool = False) -> Callable:
    """``torch.compile(fn, fullgraph=fullgraph)`` after resetting dynamo, with a hit recompile limit raised as an error.

    Resetting first keeps earlier shapes' graphs from counting against the limit; failing on the
    limit keeps a "compile" provider from silently falling back to eager. ``fullgraph`` makes a
    graph break an error.
    """
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(fn, fullgraph=fullgraph)


def compile_counts() -> dict[str, int]:
    """Graphs compiled and graph breaks since the last :func:`compiled` (1 and 0: compiled once)."""
    import torch._dynamo

    counters = torch._dynamo.utils.counters
    return {
        "compiled_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }
