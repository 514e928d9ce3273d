"""Fused Triton kernels for LASH: RMSNorm, RoPE, SwiGLU and the multi-exit shared-head cross-entropy.

Every op has a pure-torch ``*_reference`` with identical semantics; :func:`backend` (in
:mod:`lash_kernels.dispatch`) picks between them (``LASH_KERNELS=auto|triton|torch``). Beside the
ops: the activation dtypes the kernels take (``KERNEL_DTYPES``) and the value checks a caller
shares with them (:func:`values_checked`, :func:`values_need_checking`, :func:`check_token_weights`),
and :func:`compile_ahead`, which compiles the kernels a function launches in parallel before it runs.
"""

from lash_kernels._launch import KERNEL_DTYPES
from lash_kernels.parallel_compile import compile_ahead
from lash_kernels.dispatch import backend
from lash_kernels.ops.multi_exit_ce import (
    MultiExitCEOutput,
    multi_exit_cross_entropy,
    multi_exit_cross_entropy_reference,
)
from lash_kernels.ops.multi_exit_ce.reference import IGNORE_INDEX, check_token_weights, values_checked, values_need_checking
from lash_kernels.ops.rms_norm import RMSNorm, add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from lash_kernels.ops.rotary import apply_rotary, apply_rotary_reference
from lash_kernels.ops.swiglu import swiglu, swiglu_reference

__all__ = [
    "IGNORE_INDEX",
    "KERNEL_DTYPES",
    "MultiExitCEOutput",
    "RMSNorm",
    "add_rms_norm",
    "add_rms_norm_reference",
    "apply_rotary",
    "apply_rotary_reference",
    "backend",
    "check_token_weights",
    "compile_ahead",
    "multi_exit_cross_entropy",
    "multi_exit_cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
    "values_checked",
    "values_need_checking",
]
