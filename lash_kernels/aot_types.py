"""The types an op's ``static_variants`` builds for :mod:`lash_kernels.tools.aot_check`.

Op modules import them from here, and the check imports the op modules by name, so neither side
imports the other: the GPUs checked, the problem shape, one launch config, and the pointer names.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Arch:
    """What one NVIDIA GPU gives a block: the limits the compiled kernels are held against."""

    sm: int  # compute capability × 10
    gpu: str  # the product LASH's users have with that arch
    sms: int  # streaming multiprocessors
    smem_per_block: int  # bytes of shared memory one block may opt in to
    smem_per_sm: int  # bytes of shared memory per SM, for occupancy
    max_threads_per_sm: int
    max_blocks_per_sm: int
    regs_per_sm: int = 65536


ARCHS = {
    75: Arch(75, "T4", 40, 64 * 1024, 64 * 1024, 1024, 16),
    80: Arch(80, "A100", 108, 163 * 1024, 164 * 1024, 2048, 32),
    89: Arch(89, "L4", 58, 99 * 1024, 100 * 1024, 1536, 24),
    90: Arch(90, "H100", 132, 227 * 1024, 228 * 1024, 2048, 32),
}


@dataclasses.dataclass(frozen=True)
class StaticShape:
    """A representative problem size that every op reads the dimensions it needs from."""

    name: str  # key in SHAPES
    tokens: int  # N = batch · seq
    hidden: int  # D
    vocab: int  # V
    exits: int  # K
    batch: int
    seq: int
    heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class KernelVariant:
    """One launch config of one kernel at one shape: what ``triton.compile`` needs, plus the grid."""

    kernel: str  # "<op>.<kernel>", e.g. "rms_norm.forward"
    fn: object  # the @triton.jit JITFunction (an autotuner's ``.fn``)
    signature: dict[str, str]  # every argument: "*fp32", "*bf16", "*i64", "i32", "fp32" or "constexpr"
    constexprs: dict[str, object]  # values of the constexpr arguments
    num_warps: int
    num_stages: int
    programs: int  # grid size (all axes multiplied) at this shape
    int_values: dict[str, int] = dataclasses.field(default_factory=dict)  # known integer arguments
    # Memory-bound kernels say how many bytes one program has loading at once (0: not memory-bound,
    # no occupancy rule) and how many the whole launch moves (the rule needs a launch big enough).
    bytes_in_flight: int = 0
    bytes_moved: int = 0


# What a launch that names no num_stages gets from Triton's CUDA backend.
LAUNCH_STAGES = 3


def pointer(dtype: torch.dtype) -> str:
    """Triton's signature string for a pointer to ``dtype``."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32"}
    return "*" + names[dtype]


def config_variant(
    kernel: str, fn: object, signature: dict, config: dict, flags: dict, programs: int, ints: dict
) -> KernelVariant:
    """A variant from a launcher's config dict (upper-case keys are constexprs, plus ``num_warps``
    and ``num_stages``) and its constexpr ``flags``; they join the ``signature`` as constexprs."""
    const = {k: v for k, v in config.items() if k.isupper()} | flags
    signature = signature | dict.fromkeys(const, "constexpr")
    return KernelVariant(kernel, fn, signature, const, config["num_warps"], config["num_stages"], programs, ints)
