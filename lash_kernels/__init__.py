"""Fused Triton kernels for LASH: RMSNorm, RoPE and the multi-exit shared-head cross-entropy.

Every op has a pure-torch ``*_reference`` with identical semantics; :func:`backend` picks
between them (``LASH_KERNELS=auto|triton|torch``).
"""

from lash_kernels.backend import backend

__all__ = ["backend"]
