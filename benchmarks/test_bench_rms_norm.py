"""RMSNorm and add+RMSNorm: LASH vs eager reference vs torch.compile vs Liger-Kernel.

Providers × modes × sizes, from the seed's 2048 rows × 64 hidden to LLM sizes on a GPU, each
timed forward and backward alone (the backward over a retained graph). Each result carries its
bandwidth in GB/s and that as a fraction of a copy of the same bytes timed in the same test, the
ceiling of DESIGN.md's bars (≥ 0.90 forward, ≥ 0.80 backward); the ``lash`` cases record
``speedup_vs_eager`` / ``speedup_vs_liger`` (bar: ≥ 1 against Liger). On the CPU only small
sizes run, with the torch backend (``measure.py`` sets ``LASH_KERNELS=torch``).

    pytest benchmarks/test_bench_rms_norm.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from conftest import bench_memory_bound_op
from kernel_bench import MEMORY_BOUND_PROVIDERS, NORM_MODES
from measure import ON_GPU

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SIZES = [(2048, 64), (16384, 1024), (16384, 4096), (65536, 1024), (32768, 8192)] if ON_GPU else [(2048, 64), (4096, 1024)]


@pytest.mark.parametrize("provider", MEMORY_BOUND_PROVIDERS)
@pytest.mark.parametrize("mode", NORM_MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))  # (rows, hidden)
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_norm(benchmark, copy_bandwidth, op, size, mode, provider):
    bench_memory_bound_op(benchmark, copy_bandwidth, op, size, mode, provider, DTYPE)
