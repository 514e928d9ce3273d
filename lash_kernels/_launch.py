"""Launcher helpers shared by the ops: how a kernel is launched, on which dtypes, over how many SMs."""

from __future__ import annotations

import functools

import torch

from lash_kernels.dispatch import HAS_TRITON, interpreting

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activations the Triton kernels take


def check_kernel_dtypes(op: str, **tensors: torch.Tensor) -> None:
    """Raise ValueError naming the first argument whose dtype the Triton ``op`` does not take."""
    for name, x in tensors.items():
        if x.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} is not supported by the Triton {op}; use fp32, bf16 or fp16")


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill on CUDA; when interpreting, programs run one by one, so few."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


if HAS_TRITON:  # optional off Linux: the torch paths still work there
    from torch.library import wrap_triton

    def launch(kernel):
        """The kernel as ``torch.compile`` can trace it; the interpreter runs it as it is."""
        return kernel if interpreting() else wrap_triton(kernel)
