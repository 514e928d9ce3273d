"""A kernel planted to overflow shared memory: the static check must fail on it."""

import torch
import triton
import triton.language as tl

from lash_kernels.aot_types import KernelVariant, pointer


@triton.jit
def _overflow_kernel(
    a_ptr,  # [M, K] row-major
    b_ptr,  # [K, M] row-major
    c_ptr,  # [M, M] fp32 out
    K,  # inner size, a multiple of BLOCK_K
    BLOCK: tl.constexpr,  # output tile side
    BLOCK_K: tl.constexpr,  # inner tile; four pipelined stages of both operands exceed every arch
):
    rows = tl.arange(0, BLOCK)
    inner = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rows[:, None] * K + (k0 + inner)[None, :])
        b = tl.load(b_ptr + (k0 + inner)[:, None] * BLOCK + rows[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rows[:, None] * BLOCK + rows[None, :], acc)


def static_variants(shape, dtype, arch):
    signature = dict(a_ptr=pointer(dtype), b_ptr=pointer(dtype), c_ptr=pointer(torch.float32), K="i32",
                     BLOCK="constexpr", BLOCK_K="constexpr")
    return [KernelVariant("planted.overflow", _overflow_kernel, signature, dict(BLOCK=128, BLOCK_K=128), 8, 4, 1,
                          dict(K=4096))]
