"""pytest-benchmark glue: machine info, a synchronised timed call, ratios measured in the same test.

Run with ``pytest benchmarks/ --benchmark-only``; add ``--benchmark-json=PATH`` to keep the
results. The JSON's ``machine_info`` carries the device name, torch/triton versions and the date,
so every number in it can be quoted with where and when it was taken. How things are measured
(device timing, peak memory, ceilings) lives in ``measure.py``, shared with ``gpu_suite.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kernel_bench import Unavailable, bytes_moved, dtype_name, op_call
from measure import (
    ON_GPU,
    compile_counts,
    copy_bandwidth_gbps,
    describe,
    device_name,
    environment,
    median_seconds,
    peak_memory_bytes,
    same_size_copy,
    synchronize,
)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lash"] = environment()


def timed(fn: Callable[[], object]) -> Callable[[], object]:
    """Wrap ``fn`` so the device is synchronised inside the timed call."""

    def call():
        out = fn()
        synchronize()
        return out

    return call


def run_benchmark(benchmark, fn: Callable[[], object], **extra_info) -> None:
    """Time ``fn`` (synchronised) and record the device plus ``extra_info`` with the result.

    A few warm-up calls run first so compilation and autotuning stay out of the timings.
    """
    call = timed(fn)
    for _ in range(3):
        call()
    benchmark.extra_info.update(device=device_name(), **extra_info)
    benchmark.pedantic(call, rounds=10 if ON_GPU else 3, iterations=1, warmup_rounds=1)


def record_speedups(benchmark, fn: Callable[[], object], baselines: dict[str, Callable[[], Callable[[], object]]]) -> None:
    """Time ``fn`` and each baseline on the device, here and now, and record the ratios.

    ``speedup_vs_<name>`` = the baseline's median time / ``fn``'s (> 1: ``fn`` is faster). Each
    baseline is a factory returning the call to time; one that raises is recorded as the reason
    (``speedup_vs_<name>: "skipped: …"``), so a missing optional package never hides the others.
    """
    seconds = median_seconds(fn)
    benchmark.extra_info["device_median_s"] = seconds
    for name, factory in baselines.items():
        try:
            ratio: float | str = median_seconds(factory()) / seconds
        except Exception as error:  # noqa: BLE001 - recorded with the result
            ratio = f"skipped: {describe(error)}"
        benchmark.extra_info[f"speedup_vs_{name}"] = ratio


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write bytes) of a 1 GiB copy, for reference."""
    return copy_bandwidth_gbps()


def bench_memory_bound_op(benchmark, copy_bandwidth: float, op: str, size: tuple, mode: str, provider: str, dtype) -> None:
    """One norm or RoPE case: time it, record GB/s over the bytes the op must move
    (``kernel_bench.bytes_moved``) and that as a fraction of a copy of the same bytes timed here
    (``measure.same_size_copy``, the ceiling); the ``lash`` case also times eager and Liger-Kernel
    here and records ``speedup_vs_*``."""
    try:
        call = op_call(op, provider, size, mode, dtype)
    except Unavailable as why:
        pytest.skip(str(why))
    moved = bytes_moved(op, size, mode, dtype)
    info = dict(op=op, provider=provider, mode=mode, size=list(size), dtype=dtype_name(dtype), bytes_moved=moved)
    run_benchmark(benchmark, call, **info, peak_memory_bytes=peak_memory_bytes(call), copy_bandwidth_gbps=copy_bandwidth)
    gbps = moved / median_seconds(call) / 1e9
    copy_gbps = moved / median_seconds(same_size_copy(moved, dtype)) / 1e9
    benchmark.extra_info.update(gbps=gbps, same_size_copy_gbps=copy_gbps, fraction_of_copy=gbps / copy_gbps)
    if provider == "compile":
        benchmark.extra_info.update(compile_counts())
    if provider == "lash":
        record_speedups(benchmark, call, {p: lambda p=p: op_call(op, p, size, mode, dtype) for p in ("eager", "liger")})
