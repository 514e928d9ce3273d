"""A copy kernel planted to starve the memory system: the static check's occupancy rule must fail it."""

import torch
import triton
import triton.language as tl

from lash_kernels.aot_types import KernelVariant, pointer


@triton.jit
def _narrow_copy_kernel(
    x_ptr,  # input, read every `stride`-th element: no two lanes' elements are adjacent
    y_ptr,  # output, same layout
    stride,  # elements between the elements copied (a runtime value: no vector loads)
    BLOCK: tl.constexpr,  # elements per program: 32 lanes, one each
):
    offsets = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * stride
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets))


def static_variants(shape, dtype, arch):
    signature = {"x_ptr": pointer(dtype), "y_ptr": pointer(dtype), "stride": "i32", "BLOCK": "constexpr"}
    programs = 1 << 20
    itemsize = torch.empty((), dtype=dtype).element_size()
    return [KernelVariant("planted.narrow", _narrow_copy_kernel, signature, {"BLOCK": 32}, 1, 1, programs,
                          {"stride": 3}, bytes_in_flight=32 * itemsize, bytes_moved=2 * 32 * itemsize * programs)]
