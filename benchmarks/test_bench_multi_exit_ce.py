"""Multi-exit shared-head cross-entropy, forward + backward, against what else one could run.

Providers (``kernel_bench.CE_PROVIDERS``), per config (K exits × N tokens through a [V, D] head)
and dtype (fp32, bf16, fp16 on a GPU): the bare head matmuls ``h·Wᵀ``, ``g·W``, ``gᵀ·h`` over all
exits (the practical limit), the eager reference, ``torch.compile`` of it, Liger-Kernel's fused
linear cross-entropy and Cut Cross-Entropy once per exit (skipped with the reason when not
installed), and ``lash``. The ``lash`` cases time every other provider in the same test and record
``speedup_vs_<provider>`` (DESIGN.md's bars: at the LLM size lash within 1.08× of the matmuls
and ``speedup_vs_liger`` ≥ 1.12; at D 64 within 1.5× of the matmuls in bf16 and 1.0× in fp32, and
``speedup_vs_cce`` ≥ 2), plus the peak memory over ``(K·N·D + V·D)`` elements (bar: ≤ 2.5 at the
LLM size). The LLM-sized configs shrink on a GPU under 40 GiB (an L4).
On the CPU only a tiny fp32 config runs, so the file finishes in well under a minute.
"""

from __future__ import annotations

import pytest
import torch

from conftest import record_speedups, run_benchmark
from kernel_bench import CE_PROVIDERS, Unavailable, ce_call, ce_inputs, ce_memory_floor_bytes, dtype_name
from measure import ON_GPU, compile_counts, large_device, peak_memory_bytes

if ON_GPU:
    SEED = [(2048, 64, v, k) for v in (16384, 65536) for k in (1, 4)]  # N, D, V, K
    CASES = [(shape, dtype) for shape in SEED for dtype in ("float32", "bfloat16", "float16")]
    if large_device():
        LLM = [(8192, d, v, k) for d in (2048, 4096) for v in (32768, 131072) for k in (1, 4)]
    else:  # an L4's 24 GB
        LLM = [(4096, 2048, 32768, k) for k in (1, 4)]
    CASES += [(shape, "bfloat16") for shape in LLM]
else:
    # CPU bf16 matmuls are emulated and would only measure that.
    CASES = [((512, 64, 4096, k), "float32") for k in (1, 3)]


def _id(case) -> str:
    (n, d, v, k), dtype = case
    return f"N{n}-D{d}-V{v}-K{k}-{dtype}"


@pytest.mark.parametrize("provider", CE_PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_multi_exit_ce_fwd_bwd(benchmark, case, provider):
    shape, dtype_key = case
    n, d, v, k = shape
    dtype = getattr(torch, dtype_key)
    hiddens, weight, targets = ce_inputs(shape, dtype)
    try:
        step = ce_call(provider, hiddens, weight, targets)
        peak = peak_memory_bytes(step)
    except Unavailable as why:
        pytest.skip(str(why))
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} runs out of memory at N={n} D={d} V={v} K={k}")
    run_benchmark(benchmark, step, provider=provider, K=k, N=n, D=d, V=v, dtype=dtype_name(dtype), peak_memory_bytes=peak)
    benchmark.extra_info["tokens_per_s"] = n / benchmark.stats.stats.median  # tokens through all K exits
    if provider == "compile":
        benchmark.extra_info.update(compile_counts())
    if provider == "lash":
        if peak is not None:
            benchmark.extra_info["peak_over_grad_bytes"] = peak / ce_memory_floor_bytes(shape, dtype)
        others = [p for p in CE_PROVIDERS if p != "lash"]
        record_speedups(benchmark, step, {p: lambda p=p: ce_call(p, hiddens, weight, targets) for p in others})
