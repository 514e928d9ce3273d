"""The one place that decides whether an op runs its Triton kernels or its torch reference.

``LASH_KERNELS`` selects the backend:

* ``auto`` (default): Triton for CUDA tensors, torch for everything else;
* ``triton``: always Triton. On the CPU this needs the Triton interpreter
  (``TRITON_INTERPRET=1`` set before ``lash_kernels`` is imported), which is how the kernels are
  tested without a GPU;
* ``torch``: always the pure-torch reference implementations.

Per-arch rule: :func:`tensor_core_dots` says whether Triton's ``tl.dot`` gets tensor cores on a
device (sm ≥ 80); ops whose fused kernels live on ``tl.dot`` take a cuBLAS-based path elsewhere.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")

HAS_TRITON = importlib.util.find_spec("triton") is not None


_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``), as read
    when ``lash_kernels`` was imported: ``triton.jit`` reads it as it decorates the kernels, so a
    later change would not switch them; and an eager call asks several times (an environment
    read costs the host about half a microsecond)."""
    return _INTERPRETING


def backend(device: torch.device | str | None = None) -> str:
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device``.

    Args:
        device: where the op's inputs live; ``None`` means the default CUDA device if there is
            one, else the CPU.

    Raises:
        ValueError: ``LASH_KERNELS`` holds something other than auto/triton/torch.
        RuntimeError: Triton was asked for but cannot run here (not installed, or CPU tensors
            without the interpreter).
    """
    choice = os.environ.get("LASH_KERNELS", "auto")
    if choice not in BACKENDS:  # every eager op call asks: the usual spellings skip the normalising
        choice = choice.strip().lower()
        if choice not in BACKENDS:
            raise ValueError(f"LASH_KERNELS={choice!r}; allowed values are {', '.join(BACKENDS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = (device if isinstance(device, torch.device) else torch.device(device)).type == "cuda"
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if HAS_TRITON and on_cuda else "torch"
    if not HAS_TRITON:
        raise RuntimeError("LASH_KERNELS=triton but the triton package is not installed")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            f"LASH_KERNELS=triton with tensors on {device}: Triton runs on CUDA, or on the CPU "
            "through its interpreter (set TRITON_INTERPRET=1 before importing lash_kernels)"
        )
    return "triton"


def tensor_core_dots(device: torch.device | str) -> bool:
    """Whether ``tl.dot`` runs on tensor cores on ``device``.

    Triton emits no mma instructions below sm_80 (a T4 is sm_75), so there its dots run on FMA
    units, far below cuBLAS. The interpreter counts as True so that CI runs the fused kernels.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return interpreting()
    major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
    return arch_has_tensor_core_dots(10 * major + minor)


def arch_has_tensor_core_dots(arch: int) -> bool:
    """:func:`tensor_core_dots` for a CUDA arch number (75 for sm_75), for checks without a GPU."""
    return arch >= 80


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
