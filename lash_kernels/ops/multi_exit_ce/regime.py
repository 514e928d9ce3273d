"""Which regime a multi-exit cross-entropy call takes, and the fused kernels' tile tables.

Pure Python, importable without Triton: :func:`fused_regime` is the rule the public function
and the static check share, and the tables it reads are the ones the fused launchers
(:mod:`.fused`) take their tiles from.
"""

from __future__ import annotations

import torch

from lash_kernels.dispatch import interpreting

FUSED_MAX_HIDDEN = 256  # widest head the fused kernels take (their dW/dH tiles live in registers)

# (BLOCK_N, BLOCK_V, num_warps, num_stages) of the fused kernels by (operand kind, padded D):
# the largest tiles whose compile for sm_80/89/90 (triton 3.8, 2026-12-06) shows no register
# spills and fits the L4's 99 KiB of shared memory. The grad kernel holds dW [BLOCK_V, D] and
# dH [BLOCK_N, D] fp32 tiles plus the head tile in registers, hence its fewer rows; its
# BLOCK_V sets the atomic adds per dH element (V / BLOCK_V): 4× fewer than 64-wide tiles at
# D = 64 in 16-bit, 2× at 128 and 256. fp32 at D = 64 keeps 64: 128 spills on sm_89.
FORWARD_TILES = {
    ("16-bit", 64): (64, 128, 8, 3), ("16-bit", 128): (64, 64, 8, 3), ("16-bit", 256): (32, 64, 8, 3),
    ("fp32", 64): (32, 64, 8, 2),
}  # fmt: skip
GRAD_TILES = {
    ("16-bit", 64): (16, 256, 8, 2), ("16-bit", 128): (16, 128, 8, 2), ("16-bit", 256): (16, 64, 16, 2),
    ("fp32", 64): (16, 64, 8, 2),
}  # fmt: skip


def fused_regime(hidden: int, dtype: torch.dtype, tensor_cores: bool) -> bool:
    """The regime rule: fused Triton kernels for narrow heads where ``tl.dot`` has tensor cores
    and tiles exist for the dtype, the chunked cuBLAS path otherwise (see :mod:`.fused`)."""
    return hidden <= FUSED_MAX_HIDDEN and tensor_cores and fused_takes(hidden, dtype)


def tile_key(D: int, dtype: torch.dtype) -> tuple[str, int]:
    """The key of ``FORWARD_TILES`` and ``GRAD_TILES`` for heads ``D`` wide in ``dtype``: the
    operand kind and the padded width, the next power of two ≥ D and at least 64. ``int(D)``:
    under ``torch.compile`` with dynamic shapes D arrives as a SymInt (this specialises it)."""
    return "fp32" if dtype == torch.float32 else "16-bit", max(64, 1 << (int(D) - 1).bit_length())


def fused_takes(D: int, dtype: torch.dtype) -> bool:
    """Whether the fused kernels have tiles for ``D`` in ``dtype`` (else the chunked regime runs).

    fp32 operands take three TF32 products per dot and twice the shared memory, so past
    D = 64 their tiles spill or overflow the L4's shared memory: cuBLAS does better there.
    """
    return interpreting() or tile_key(D, dtype) in GRAD_TILES
