"""Shared pieces of the benchmark suites: the device, synchronised timing, ceilings, metadata.

Run with ``pytest benchmarks/ --benchmark-only``; add ``--benchmark-json=PATH`` to keep the
results. The JSON's ``machine_info`` carries the device name, torch/triton versions and the date,
so every number in it can be quoted with where and when it was taken.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import time
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    # Benchmarks on the CPU time the torch paths; the interpreter would only measure Python.
    os.environ.setdefault("LASH_KERNELS", "torch")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def device_name() -> str:
    """Human-readable name of the benchmark device."""
    if ON_GPU:
        return torch.cuda.get_device_name(DEVICE)
    return f"cpu ({os.cpu_count()} cores)"


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize(DEVICE)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lash"] = {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if has_module("triton") else None,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
    }


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


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write bytes), the memory ceiling."""
    numel = (256 if ON_GPU else 32) * 2**20 // 4
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize()
    reps = 20 if ON_GPU else 5
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    synchronize()
    seconds = (time.perf_counter() - start) / reps
    return 2 * src.numel() * src.element_size() / seconds / 1e9
