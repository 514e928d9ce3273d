"""pytest-benchmark glue: machine info, a synchronised timed call, ratios measured in the same test.

Run with ``pytest benchmarks/ --benchmark-only``; add ``--benchmark-json=PATH`` to keep the
results. The JSON's ``machine_info`` carries the device name, torch/triton versions and the date,
so every number in it can be quoted with where and when it was taken. How things are measured
(device timing, peak memory, ceilings) lives in ``measure.py``, shared with ``gpu_suite.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from measure import ON_GPU, copy_bandwidth_gbps, describe, device_name, environment, median_seconds, synchronize


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
    """Measured device-to-device copy bandwidth in GB/s (read + write bytes), the memory ceiling."""
    return copy_bandwidth_gbps()
