"""RMSNorm, add+RMSNorm and RoPE: LASH vs eager reference vs torch.compile vs Liger-Kernel.

Providers × modes × sizes, from the seed's (2048 rows × 64 hidden; batch 64 × 4 heads × 32
positions × head_dim 16) to LLM sizes on a GPU. Norms are timed forward and backward alone (the
backward over a retained graph); RoPE forward and forward+backward. Each result carries the
bandwidth in GB/s over the bytes the op must move (``kernel_bench.bytes_moved``) and that
bandwidth as a fraction of the copy bandwidth measured in the same session, the ceiling of
DESIGN.md's bars (norms ≥ 0.85 forward, ≥ 0.70 backward; RoPE ≥ 0.80). The ``lash`` cases also
time eager and Liger-Kernel in the same test and record ``speedup_vs_eager`` / ``speedup_vs_liger``
(bar: ≥ 1 against Liger).

On the CPU only small sizes run, and ``lash`` is the torch backend (``measure.py`` sets
``LASH_KERNELS=torch``): the interpreter would time Python, not kernels.

    pytest benchmarks/test_bench_norm_rope.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from conftest import record_speedups, run_benchmark
from kernel_bench import NORM_MODES, ROPE_MODES, Unavailable, bytes_moved, dtype_name, op_call
from measure import ON_GPU, compile_counts, median_seconds, peak_memory_bytes

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
PROVIDERS = ["lash", "eager", "compile", "liger"]
# (rows, hidden)
NORM_SIZES = [(2048, 64), (16384, 1024), (16384, 4096), (65536, 1024), (32768, 8192)]
NORM_SIZES = NORM_SIZES if ON_GPU else [(2048, 64), (4096, 1024)]
# (B, H, T, D)
ROPE_SIZES = [(64, 4, 32, 16), (8, 32, 2048, 128), (4, 32, 4096, 128)]
ROPE_SIZES = ROPE_SIZES if ON_GPU else [(64, 4, 32, 16), (2, 8, 512, 64)]


def _bench(benchmark, copy_bandwidth, op, size, mode, provider):
    try:
        call = op_call(op, provider, size, mode, DTYPE)
    except Unavailable as why:
        pytest.skip(str(why))
    moved = bytes_moved(op, size, mode, DTYPE)
    info = dict(op=op, provider=provider, mode=mode, size=list(size), dtype=dtype_name(DTYPE), bytes_moved=moved)
    run_benchmark(benchmark, call, **info, peak_memory_bytes=peak_memory_bytes(call), copy_bandwidth_gbps=copy_bandwidth)
    gbps = moved / median_seconds(call) / 1e9
    benchmark.extra_info.update(gbps=gbps, fraction_of_copy=gbps / copy_bandwidth)
    if provider == "compile":
        benchmark.extra_info.update(compile_counts())
    if provider == "lash":
        record_speedups(benchmark, call, {p: lambda p=p: op_call(op, p, size, mode, DTYPE) for p in ("eager", "liger")})


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", NORM_MODES)
@pytest.mark.parametrize("size", NORM_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_norm(benchmark, copy_bandwidth, op, size, mode, provider):
    _bench(benchmark, copy_bandwidth, op, size, mode, provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ROPE_MODES)
@pytest.mark.parametrize("size", ROPE_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_rotary(benchmark, copy_bandwidth, size, mode, provider):
    _bench(benchmark, copy_bandwidth, "apply_rotary", size, mode, provider)
