"""RoPE on q and k: LASH vs eager reference vs torch.compile vs Liger-Kernel.

Providers × modes (forward, forward+backward) × sizes, from the seed's batch 64 × 4 heads × 32
positions × head_dim 16 to LLM sizes on a GPU. Each result carries its bandwidth in GB/s and that
as a fraction of a copy of the same bytes timed in the same test (DESIGN.md's bar: ≥ 0.85 for
forward+backward); the ``lash`` cases record ``speedup_vs_eager`` / ``speedup_vs_liger``. On the
CPU only small sizes run, with the torch backend.

    pytest benchmarks/test_bench_rotary.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from conftest import bench_memory_bound_op
from kernel_bench import MEMORY_BOUND_PROVIDERS, ROPE_MODES
from measure import ON_GPU

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SIZES = [(64, 4, 32, 16), (8, 32, 2048, 128), (4, 32, 4096, 128)] if ON_GPU else [(64, 4, 32, 16), (2, 8, 512, 64)]


@pytest.mark.parametrize("provider", MEMORY_BOUND_PROVIDERS)
@pytest.mark.parametrize("mode", ROPE_MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))  # (B, H, T, D)
def test_rotary(benchmark, copy_bandwidth, size, mode, provider):
    bench_memory_bound_op(benchmark, copy_bandwidth, "apply_rotary", size, mode, provider, DTYPE)
