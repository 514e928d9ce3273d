"""RMSNorm, add+RMSNorm and RoPE: LASH vs eager reference vs torch.compile vs Liger-Kernel.

Providers × modes (forward, forward+backward) × sizes, from the seed's (2048 rows × 64 hidden;
batch 64 × 4 heads × 32 positions × head_dim 16) to LLM sizes on a GPU. Each result carries the
bandwidth in GB/s over the bytes the op must move (every input read once, every output written
once; the tiny weight and tables left out) and that bandwidth as a fraction of the measured copy
bandwidth, the ceiling the DESIGN's performance bar is stated against.

On the CPU only small sizes run, and ``lash`` is the torch backend (benchmarks/conftest.py sets
``LASH_KERNELS=torch``): the interpreter would time Python, not kernels.

    pytest benchmarks/test_bench_norm_rope.py --benchmark-only
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import pytest
import torch

from conftest import DEVICE, ON_GPU, has_module, peak_memory_bytes, run_benchmark
from lash_kernels.rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from lash_kernels.rotary import apply_rotary, apply_rotary_reference

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
EPS = 1e-6
PROVIDERS = ["lash", "eager", "compile", "liger"]
MODES = ["forward", "forward+backward"]
# (rows, hidden)
NORM_SIZES = [(2048, 64), (16384, 1024), (16384, 4096), (65536, 1024), (32768, 8192)]
NORM_SIZES = NORM_SIZES if ON_GPU else [(2048, 64), (4096, 1024)]
# (B, H, T, D)
ROPE_SIZES = [(64, 4, 32, 16), (8, 32, 2048, 128), (4, 32, 4096, 128)]
ROPE_SIZES = ROPE_SIZES if ON_GPU else [(64, 4, 32, 16), (2, 8, 512, 64)]
# Inputs smaller than this are cycled through several copies so the timings are not L2 hits.
L2_FLUSH_BYTES = 256 * 2**20


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn)


def _liger(op: str, hidden: int) -> Callable:
    """Liger-Kernel's counterpart of ``op`` with the same call signature as LASH's, or skip."""
    if not ON_GPU or not has_module("liger_kernel"):
        pytest.skip("Liger-Kernel is not installed (or there is no GPU)")
    if op == "apply_rotary":
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        return lambda q, k, cos, sin: liger_rotary_pos_emb(q, k, cos[None], sin[None])
    if op == "rms_norm":
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        module = LigerRMSNorm(hidden, eps=EPS).to(DEVICE, DTYPE)
        return lambda x, weight: module(x)
    if not has_module("liger_kernel.transformers.fused_add_rms_norm"):
        pytest.skip("this Liger-Kernel version has no fused add+RMSNorm")
    from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm

    module = LigerFusedAddRMSNorm(hidden, eps=EPS).to(DEVICE, DTYPE)
    return lambda x, residual, weight: module(x, residual)


OPS = {
    "rms_norm": (
        lambda x, weight: rms_norm(x, weight, EPS),
        lambda x, weight: rms_norm_reference(x, weight, EPS),
    ),
    "add_rms_norm": (
        lambda x, residual, weight: add_rms_norm(x, residual, weight, EPS),
        lambda x, residual, weight: add_rms_norm_reference(x, residual, weight, EPS),
    ),
    "apply_rotary": (apply_rotary, apply_rotary_reference),
}


def _provider_fn(op: str, provider: str, hidden: int) -> Callable:
    lash_fn, reference = OPS[op]
    if provider == "lash":
        return lash_fn
    if provider == "eager":
        return reference
    if provider == "compile":
        return _compiled(reference)
    return _liger(op, hidden)


def _inputs(op: str, size: tuple[int, ...], grad: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(arguments, the ones to differentiate)`` for one call of ``op`` at ``size``."""

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=DTYPE, requires_grad=grad)

    if op == "apply_rotary":
        b, h, t, d = size
        angles = torch.rand(t, d // 2, device=DEVICE) * 6.3  # (T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, D)
        q, k = rand(b, h, t, d), rand(b, h, t, d)
        return [q, k, angles.cos().to(DTYPE), angles.sin().to(DTYPE)], [q, k]
    rows, hidden = size
    weight = (torch.rand(hidden, device=DEVICE, dtype=DTYPE) + 0.5).requires_grad_(grad)
    x = rand(rows, hidden)
    if op == "rms_norm":
        return [x, weight], [x, weight]
    residual = rand(rows, hidden)
    return [x, residual, weight], [x, residual, weight]


def _bytes_moved(op: str, size: tuple[int, ...], mode: str) -> int:
    """Bytes the op must move: inputs read once, outputs written once (weights/tables excluded)."""
    element = torch.finfo(DTYPE).bits // 8
    # Activation-sized tensors moved (q and k have the same size here):
    tensors_fwd, tensors_bwd = {
        "apply_rotary": (4, 4),  # q, k → q_rot, k_rot; dq_rot, dk_rot → dq, dk
        "rms_norm": (2, 3),  # x → y; dy, x → dx
        "add_rms_norm": (4, 4),  # x, residual → y, s; dy, ds, s → dx (= dresidual)
    }[op]
    tensors = tensors_fwd + (tensors_bwd if mode == "forward+backward" else 0)
    return tensors * math.prod(size) * element


def _call(fn: Callable, op: str, size: tuple[int, ...], mode: str) -> Callable[[], object]:
    """A no-argument call cycling through enough input copies to defeat the L2 cache."""
    grad = mode == "forward+backward"
    copies = max(1, min(64, math.ceil(L2_FLUSH_BYTES / _bytes_moved(op, size, mode)))) if ON_GPU else 1
    sets = itertools.cycle([_inputs(op, size, grad) for _ in range(copies)])

    def forward():
        args, _ = next(sets)
        with torch.no_grad():
            return fn(*args)

    def forward_backward():
        args, wrt = next(sets)
        outputs = fn(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        grads = [torch.ones_like(o) for o in outputs]
        return torch.autograd.grad(outputs, wrt, grads)

    return forward_backward if grad else forward


def _bench(benchmark, copy_bandwidth, op, size, mode, provider):
    fn = _provider_fn(op, provider, size[-1])
    call = _call(fn, op, size, mode)
    moved = _bytes_moved(op, size, mode)
    run_benchmark(
        benchmark,
        call,
        op=op,
        provider=provider,
        mode=mode,
        size=list(size),
        dtype=str(DTYPE),
        bytes_moved=moved,
        peak_memory_bytes=peak_memory_bytes(call),
        copy_bandwidth_gbps=copy_bandwidth,
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        gbps = moved / stats.stats.median / 1e9
        benchmark.extra_info.update(gbps=gbps, fraction_of_copy=gbps / copy_bandwidth)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", NORM_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_norm(benchmark, copy_bandwidth, op, size, mode, provider):
    _bench(benchmark, copy_bandwidth, op, size, mode, provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", ROPE_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_rotary(benchmark, copy_bandwidth, size, mode, provider):
    _bench(benchmark, copy_bandwidth, "apply_rotary", size, mode, provider)
