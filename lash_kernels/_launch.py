"""Launcher helpers shared by the ops: how a kernel is launched, on which dtypes and devices, over how many SMs."""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from lash_kernels.aot_types import ARCHS, Arch
from lash_kernels.dispatch import interpreting
from lash_kernels.parallel_compile import compiling_only

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activations the Triton kernels take


def check_kernel_dtypes(op: str, **tensors: torch.Tensor) -> None:
    """Raise ValueError naming the first argument whose dtype the Triton ``op`` does not take."""
    for name, x in tensors.items():
        if x.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} is not supported by the Triton {op}; use fp32, bf16 or fp16")


def check_one_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the first argument that is not on the first argument's device
    (``None``, an absent optional input, is skipped): an op's tensor inputs share one device, a
    CPU or CUDA one (a ``meta`` tensor holds no values to compute with)."""
    first = None
    for name, x in tensors.items():
        if x is None:
            continue
        if first is None:
            first = name, x.device
        elif x.device != first[1]:
            raise ValueError(f"{name} is on {x.device} but {first[0]} is on {first[1]}; they must be on one device")
    if first is not None and first[1].type not in ("cpu", "cuda"):
        raise ValueError(f"{first[0]} is on {first[1]}; LASH's ops compute on CPU or CUDA tensors")


_DEVICE_FLOATS: collections.OrderedDict = collections.OrderedDict()  # (values, device) → [fp32 tensor, in a graph]
DEVICE_FLOATS_KEPT = 64  # sets kept that no CUDA graph reads, the most recently used


def _capturing(like: torch.Tensor) -> bool:
    return like.is_cuda and torch.cuda.is_current_stream_capturing()


def device_floats(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """``values`` as an fp32 tensor on ``like``'s device, copied there once per set of values (a
    copy per call would make the host wait). While tracing (fake tensors, ``torch.compile``) it
    is built afresh and becomes a constant of the graph.

    A set read while a CUDA graph is captured stays for good, since the graph reads its memory at
    every replay; of the others, the ``DEVICE_FLOATS_KEPT`` most recently used stay, so values
    that change every call (a schedule of exit weights) do not pile up on the device."""
    if torch.compiler.is_compiling() or is_fake(like):
        return torch.tensor(values, dtype=torch.float32, device=like.device)
    key = (tuple(values), like.device)
    entry = _DEVICE_FLOATS.get(key)
    if entry is None:
        entry = _DEVICE_FLOATS[key] = [torch.tensor(values, dtype=torch.float32, device=like.device), False]
        unread = [k for k, (_, in_graph) in _DEVICE_FLOATS.items() if not in_graph]
        for stale in unread[: max(0, len(unread) - DEVICE_FLOATS_KEPT)]:
            del _DEVICE_FLOATS[stale]
    else:
        _DEVICE_FLOATS.move_to_end(key)
    if _capturing(like):
        entry[1] = True
    return entry[0]


def cdiv(a: int, b: int) -> int:
    """``⌈a / b⌉`` for launchers' host code: ``triton.cdiv`` is a constexpr function there, whose
    wrapper costs the host microseconds a call (Triton 3.9); this one works on SymInts too."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The least power of two ≥ ``n`` (0 for 0), as ``triton.next_power_of_2`` but at a plain
    function's cost; ``n`` is made an int (a SymInt is specialised: it sizes a tile)."""
    n = int(n)
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cached_plan(plan: Callable) -> Callable:
    """``plan`` (a launch plan from sizes and an arch, all hashable) memoised: a persistent grid's
    plan weighs occupancy for several pipeline depths, tens of µs of host time a call. Sizes
    that are SymInts (``torch.compile`` with dynamic shapes) bypass the cache."""
    cached = functools.lru_cache(maxsize=256)(plan)

    @functools.wraps(plan)
    def lookup(*args):
        if torch.SymInt in map(type, args):  # a third of a generator's host cost
            return plan(*args)
        return cached(*args)

    lookup.cache_clear = cached.cache_clear  # for tests that change the constants a plan reads
    return lookup


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill on CUDA; when interpreting, programs run one by one, so few."""
    return device_arch(device).sms


@functools.cache
def device_arch(device: torch.device) -> Arch:
    """The limits of ``device``'s SMs, for launchers that size persistent grids to what stays
    resident; when interpreting, an H100's limits over 4 SMs (programs run one by one)."""
    if device.type != "cuda":
        return dataclasses.replace(ARCHS[90], sms=4)
    props = torch.cuda.get_device_properties(device)
    sm = props.major * 10 + props.minor
    known = ARCHS.get(sm)  # per-block opt-in and block limits torch does not report; 16 blocks is the least since sm_75
    smem_per_sm = props.shared_memory_per_multiprocessor
    per_block = known.smem_per_block if known else smem_per_sm - RESERVED_SMEM
    return Arch(sm, props.name, props.multi_processor_count, per_block, smem_per_sm,
                props.max_threads_per_multi_processor, known.max_blocks_per_sm if known else 16)  # fmt: skip


RESERVED_SMEM = 1024  # shared memory the CUDA runtime keeps per block on sm_80 and newer


def resident_programs(arch: Arch, num_warps: int, shared_bytes: int, regs: int) -> int:
    """Programs of ``num_warps`` warps, ``shared_bytes`` of shared memory and ``regs`` registers
    per thread that one SM holds at once (at least 1)."""
    threads, regs = 32 * num_warps, -(-max(regs, 1) // 8) * 8  # registers are granted 8 per thread at a time
    return max(1, min(arch.max_blocks_per_sm, arch.max_threads_per_sm // threads, arch.regs_per_sm // (regs * threads),
                      arch.smem_per_sm // (shared_bytes + RESERVED_SMEM)))  # fmt: skip


def twin_function(forward: Callable, setup_context: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """The ``autograd.Function`` twin of a ``lash::`` triton_op: the op's body, ``setup_context``
    and backward, called without the op's dispatch, which costs the host about three times as
    much per call (a custom op's Python dispatch against a Function's).

    The body and ``setup_context`` run in one ``forward(ctx, *args)``: a Function that defines
    ``setup_context`` has ``apply`` bind its arguments through ``inspect.signature`` on every
    call, about 40 µs of host time on a 2-core CPU, more than the rest of the call."""

    def forward_with_ctx(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    def call(cls, *args):
        """``apply``, or the bare body when no gradient can flow (no grad mode, or no input
        that requires one): autograd's bookkeeping then records nothing and costs the host
        about as much as the body."""
        if torch.is_grad_enabled():
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    return cls.apply(*args)
        return forward(*args)

    methods = dict(forward=staticmethod(forward_with_ctx), backward=staticmethod(backward), call=classmethod(call))
    return type(f"{forward.__name__.strip('_')}_function", (torch.autograd.Function,), methods)


def through_op() -> bool:
    """Whether a kernel call takes its registered op rather than the op's twin function: while
    ``torch.compile`` traces (so it sees the kernels) and under the interpreter (where host cost
    does not matter and one op per call keeps the launches countable); eager CUDA calls take the twin."""
    return torch.compiler.is_compiling() or interpreting()


_direct = threading.local()  # .on: this thread is inside an eager call_op, whose launches go straight to Triton


def call_op(op: Callable, eager: Callable, *args):
    """``op(*args)`` or ``eager(*args)`` (its twin's ``call``, or the bare launcher of an op without
    autograd), as :func:`through_op` decides.

    The eager call launches its kernels directly, as a ``triton_op`` does for real tensors: through
    ``wrap_triton``, each launch would go through torch's higher-order op, which costs the host
    about a millisecond and keeps every launch's constant arguments for the life of the process.
    A thread-local flag tells :func:`launch` so (torch's ``set_wrap_triton_enabled`` does the
    same as a context manager at about five times the host cost). A twin's backward, which
    autograd may run on another thread, launches through ``call_op`` too, so it runs the same way."""
    if through_op():
        return op(*args)
    outer = getattr(_direct, "on", False)
    _direct.on = True
    try:
        return eager(*args)
    finally:
        _direct.on = outer


def launch(kernel):
    """The kernel as ``torch.compile`` can trace it, or as it is inside an eager :func:`call_op`
    and under the interpreter; during a :func:`lash_kernels.parallel_compile.compile_ahead` pass,
    a launch compiles it instead."""
    if interpreting():
        return kernel
    return compiling_only(kernel) or (kernel if getattr(_direct, "on", False) else wrap_triton(kernel))
