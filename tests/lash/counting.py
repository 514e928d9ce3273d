"""Counting what a call asks of the device, on the CPU: kernels and host reads.

A :class:`OpCounter` records every aten op dispatched inside it, views excluded, and every LASH
op (``lash::…``) as one kernel, whatever it runs inside. Host reads are the ops that make a GPU
wait for the host to see a value: ``_local_scalar_dense`` (``int``/``bool``/``.item()`` of a
tensor), ``nonzero`` and indexing with a boolean mask. Reads made by the input checks are left
out: they read values on the CPU, where that is free, and on a GPU check with
``torch._assert_async`` instead, which does not wait.
"""

import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VIEWS = {"view", "_unsafe_view", "expand", "transpose", "permute", "unsqueeze", "squeeze", "select", "slice",
         "split", "split_with_sizes", "chunk", "unflatten", "t", "detach", "alias", "as_strided", "unbind",
         "reshape", "flatten", "view_as", "_reshape_alias", "lift_fresh"}  # fmt: skip
HOST_READS = {"_local_scalar_dense", "item", "nonzero", "masked_select"}
CPU_ONLY_CHECKS = {"check_token_ids", "validate_inputs", "check_token_weights"}


def _in_a_cpu_only_check() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in CPU_ONLY_CHECKS:
            return True
        frame = frame.f_back
    return False


class OpCounter(TorchDispatchMode):
    """Kernels and host reads of the code run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[str] = []
        self.host_reads: list[str] = []
        self._inside_lash = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, name = func.namespace, func._schema.name.split("::")[-1]
        if namespace == "lash":
            self.kernels.append(f"lash::{name}")
            self._inside_lash += 1
            try:
                return func(*args, **kwargs)
            finally:
                self._inside_lash -= 1
        if not self._inside_lash and name not in VIEWS:
            self.kernels.append(name)
        if name in HOST_READS or (name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) if i is not None
        )):  # fmt: skip
            if not _in_a_cpu_only_check():
                self.host_reads.append(name)
        return func(*args, **kwargs)
