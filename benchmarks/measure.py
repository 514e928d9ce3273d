"""How the benchmarks measure: the device, device-side timing, peak memory, the two ceilings.

Plain functions, shared by the pytest-benchmark files and ``benchmarks/gpu_suite.py``:

* :func:`median_seconds` times on the device: ``triton.testing.do_bench`` on CUDA (CUDA events,
  warm-up, the L2 cache cleared before every call, median); on the CPU the wall-clock median of
  a few synchronised calls;
* :func:`peak_memory_bytes`: ``torch.cuda.max_memory_allocated`` above what was live before;
* :func:`copy_bandwidth_gbps` and :func:`matmul_tflops`: the ceilings every other number is
  stated against, measured in the same run;
* :func:`compiled`: ``torch.compile`` with dynamo reset first and a hit recompile limit made an
  error, so a compiled provider never quietly runs eager; :func:`compile_counts` reports it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os
import statistics
import time
from collections.abc import Callable

import torch

if not torch.cuda.is_available():
    # On the CPU the torch paths are timed; the Triton interpreter would only measure Python.
    os.environ.setdefault("LASH_KERNELS", "torch")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
# Below this much device memory (an L4 has 24 GB) the benchmarks pick their smaller configs.
LARGE_DEVICE_BYTES = 40 * 2**30


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
    """Device-to-device copy bandwidth in GB/s (bytes read + written), the memory ceiling."""
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


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` after resetting dynamo, with a hit recompile limit raised as an error.

    Resetting first keeps earlier shapes' graphs from counting against the limit; failing on the
    limit keeps a "compile" provider from silently falling back to eager.
    """
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(fn)


def compile_counts() -> dict[str, int]:
    """Graphs compiled and graph breaks since the last :func:`compiled` (1 and 0: compiled once)."""
    import torch._dynamo

    counters = torch._dynamo.utils.counters
    return {
        "compiled_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }
