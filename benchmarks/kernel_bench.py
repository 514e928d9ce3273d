"""The kernel benchmarks' providers and calls: RMSNorm, add+RMSNorm, RoPE, the multi-exit loss.

:func:`op_call` and :func:`ce_calls` build a :class:`measure.Rotation` for one provider × mode ×
shape: one no-argument call per input set, every input and every gradient fed to a backward
allocated here, before any timing, so that a timed call allocates only what the op itself does.
The pytest-benchmark files time it with pytest-benchmark, ``gpu_suite.py`` with
:func:`measure.device_timer`, and both compute their ratios against baselines measured in the
same test or function. A provider that cannot run here raises :class:`Unavailable` with the reason.

Providers:

* ``lash``: the public op (Triton on a GPU, the torch path on the CPU);
* ``eager``: its ``*_reference``; ``compile``: ``torch.compile`` of the reference (dynamo reset
  first, see :func:`measure.compiled`);
* ``liger``: Liger-Kernel's functional op with the weight, as its defaults run it (RMSNorm's
  backward writes dX over the incoming gradient: the replays' values drift, not their time); for
  the loss, its fused linear cross-entropy once per exit;
* ``cce``: Cut Cross-Entropy's ``linear_cross_entropy`` once per exit;
* ``matmuls`` (loss only): the bare head matmuls ``h·Wᵀ``, ``g·W``, ``gᵀ·h`` over all exits in the
  same dtype, the practical limit;
* ``lash-compile`` (loss only, not timed): the LASH loss under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from measure import DEVICE, ON_GPU, Rotation, compiled, has_module, input_sets, on_capture_stream
from lash_kernels import (
    add_rms_norm,
    add_rms_norm_reference,
    apply_rotary,
    apply_rotary_reference,
    multi_exit_cross_entropy,
    multi_exit_cross_entropy_reference,
    rms_norm,
    rms_norm_reference,
)

EPS = 1e-6
WHEELS = (
    "not installed on the GPU machine we borrow, so carry them as wheels: "
    "`python3 -m pip download --no-deps -d .whl liger-kernel==0.8.5 cut-cross-entropy`, "
    "then on the GPU machine `python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl "
    "&& export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH`"
)
PACKAGES = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}


class Unavailable(Exception):
    """A provider cannot run here; the message says why."""


def check_available(provider: str) -> None:
    """Raise :class:`Unavailable` if ``provider`` needs a GPU or a package that is missing."""
    if provider in PACKAGES:
        if not has_module(PACKAGES[provider]):
            raise Unavailable(f"{PACKAGES[provider]} is not importable (carry it as a wheel: README, 'Running the GPU suite')")
        if not ON_GPU:
            raise Unavailable(f"{PACKAGES[provider]} runs on CUDA only")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- RMSNorm, add+RMSNorm, RoPE

MEMORY_BOUND_PROVIDERS = ("lash", "eager", "compile", "liger")  # for the norms and RoPE
NORM_MODES = ("forward", "backward")
ROPE_MODES = ("forward", "forward+backward")
# Activation-sized tensors each op must move (q and k count as one tensor each):
_TENSORS_MOVED = {
    "rms_norm": {"forward": 2, "backward": 3},  # x → y; dy, x → dx
    "add_rms_norm": {"forward": 4, "backward": 4},  # x, residual → y, s; dy, ds, s → dx (= dresidual)
    "apply_rotary": {"forward": 4, "backward": 4},  # q, k → q_rot, k_rot; dq_rot, dk_rot → dq, dk
}


def bytes_moved(op: str, size: tuple[int, ...], mode: str, dtype: torch.dtype) -> int:
    """Bytes ``op`` must move in ``mode``: inputs read once, outputs written once (weights excluded)."""
    parts = ("forward", "backward") if mode == "forward+backward" else (mode,)
    tensors = sum(_TENSORS_MOVED[op][part] for part in parts)
    return tensors * math.prod(size) * torch.finfo(dtype).bits // 8


def _liger_op(op: str) -> Callable:
    check_available("liger")
    from liger_kernel.transformers import functional

    if op == "rms_norm":
        return lambda x, weight: functional.liger_rms_norm(x, weight, EPS)
    if op == "add_rms_norm":
        if not hasattr(functional, "liger_fused_add_rms_norm"):
            raise Unavailable("this Liger-Kernel version has no fused add+RMSNorm (0.8.5 has)")
        return lambda x, residual, weight: functional.liger_fused_add_rms_norm(x, residual, weight, EPS)
    return functional.liger_rope


_OPS = {
    "rms_norm": (lambda x, weight: rms_norm(x, weight, EPS), lambda x, weight: rms_norm_reference(x, weight, EPS)),
    "add_rms_norm": (
        lambda x, residual, weight: add_rms_norm(x, residual, weight, EPS),
        lambda x, residual, weight: add_rms_norm_reference(x, residual, weight, EPS),
    ),
    "apply_rotary": (apply_rotary, apply_rotary_reference),
}


def op_fn(op: str, provider: str) -> Callable:
    """``op`` as run by ``provider`` (lash, eager, compile, liger), with LASH's signature."""
    lash_fn, reference = _OPS[op]
    if provider == "lash":
        return lash_fn
    if provider == "eager":
        return reference
    if provider == "compile":
        return compiled(reference)
    if provider == "liger":
        return _liger_op(op)
    raise ValueError(f"unknown provider {provider!r}")


def _inputs(op: str, provider: str, size: tuple[int, ...], dtype: torch.dtype, grad: bool) -> tuple[list, list, list]:
    """``(arguments, the ones to differentiate, the outputs' gradients)`` for one call of ``op`` at ``size``.

    RoPE's tables are built here, as half tables (``[T, D/2]``, standing for ``cat(c, c)``), or
    as the ``[1, T, D]`` full tables Liger-Kernel takes; q and k are ``(B, H, T, D)`` views of
    ``(B, T, H, D)`` storage, as an attention layer's projections give them (Liger-Kernel copies
    any other layout first). Without ``grad`` nothing requires a gradient and the list of
    gradients is empty; the gradients have their tensors' strides.
    """

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=grad)

    def grads(*like):
        return [torch.randn_like(t) for t in like] if grad else []

    if op == "apply_rotary":
        b, h, t, d = size
        angles = torch.rand(t, d // 2, device=DEVICE) * 6.3  # (T, D/2)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # (T, D/2) each
        if provider == "liger":
            cos, sin = (torch.cat((c, c), dim=-1)[None] for c in (cos, sin))  # (1, T, D) each
        q, k = (torch.randn(b, t, h, d, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_(grad) for _ in "qk")
        return [q, k, cos, sin], [q, k], grads(q, k)
    rows, hidden = size
    weight = (torch.rand(hidden, device=DEVICE, dtype=dtype) + 0.5).requires_grad_(grad)
    x = rand(rows, hidden)
    if op == "rms_norm":
        return [x, weight], [x, weight], grads(x)
    residual = rand(rows, hidden)
    return [x, residual, weight], [x, residual, weight], grads(x, residual)


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _forward_backward(fn: Callable, args: list, wrt: list, grads: list) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(_as_tuple(fn(*args)), wrt, grads)


def op_call(op: str, provider: str, size: tuple[int, ...], mode: str, dtype: torch.dtype) -> Rotation:
    """Calls of ``op`` in ``mode`` (forward, backward alone, or forward+backward), one per input set.

    There are enough input sets to pass the L2 cache (:func:`measure.input_sets`). For
    ``backward`` the forward runs here, once per set, on the capture stream (a backward runs on
    its forward's stream, and a graph records only the stream it captures), and each call is one
    ``autograd.grad`` over a retained graph.
    """
    fn = op_fn(op, provider)
    grad = mode != "forward"
    sets = [_inputs(op, provider, size, dtype, grad) for _ in range(input_sets(bytes_moved(op, size, mode, dtype)))]
    if mode == "forward":
        return Rotation(functools.partial(fn, *args) for args, _, _ in sets)
    if mode == "forward+backward":
        return Rotation(functools.partial(_forward_backward, fn, args, wrt, grads) for args, wrt, grads in sets)
    with on_capture_stream():
        outputs = [_as_tuple(fn(*args)) for args, _, _ in sets]
    return Rotation(
        functools.partial(torch.autograd.grad, out, wrt, grads, retain_graph=True)
        for out, (_, wrt, grads) in zip(outputs, sets)
    )


# ---------------------------------------------------------------- multi-exit cross-entropy

CE_PROVIDERS = ("matmuls", "eager", "compile", "liger", "cce", "lash")


def ce_inputs(shape: tuple[int, int, int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hiddens (K, N, D), weight (V, D), targets (N,))`` for ``shape = (N, D, V, K)``."""
    n, d, v, k = shape
    hiddens = torch.randn(k, n, d, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, d, device=DEVICE) / d**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=DEVICE)
    return hiddens, weight, targets


def ce_call(provider: str, hiddens: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> Callable[[], object]:
    """One forward + backward of the K-exit loss (every exit weighing 1) by ``provider``."""
    check_available(provider)
    if provider == "cce" and hiddens.dtype == torch.float32:
        raise Unavailable("Cut Cross-Entropy's backward takes bf16 or fp16 only")
    k, n, d = hiddens.shape
    exit_weights = [1.0] * k
    if provider == "matmuls":
        flat = hiddens.detach().view(k * n, d)  # (K·N, D)
        grad_logits = torch.randn(k * n, weight.shape[0], device=DEVICE, dtype=hiddens.dtype)  # (K·N, V)
        w = weight.detach()
        return lambda: (flat @ w.T, grad_logits @ w, grad_logits.T @ flat)
    if provider in ("eager", "compile", "lash", "lash-compile"):
        if provider == "lash":
            loss_fn = multi_exit_cross_entropy
        elif provider == "lash-compile":
            loss_fn = compiled(multi_exit_cross_entropy, fullgraph=True)
        elif provider == "eager":
            loss_fn = multi_exit_cross_entropy_reference
        else:
            loss_fn = compiled(multi_exit_cross_entropy_reference)
        return lambda: torch.autograd.grad(
            loss_fn(hiddens, weight, targets, exit_weights, validate=False).loss, [hiddens, weight]
        )
    if provider == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as exit_loss
    elif provider == "cce":
        from cut_cross_entropy import linear_cross_entropy as exit_loss
    else:
        raise ValueError(f"unknown provider {provider!r}")

    def per_exit_calls():
        loss = sum(w * exit_loss(hiddens[i], weight, targets) for i, w in enumerate(exit_weights))
        return torch.autograd.grad(loss, [hiddens, weight])

    return per_exit_calls


def ce_calls(provider: str, shape: tuple[int, int, int, int], dtype: torch.dtype) -> Rotation:
    """:func:`ce_call` over enough input sets (:func:`ce_inputs`) that the inputs a round reads pass the L2.

    Every provider reads the hiddens and the head; the bare matmuls also read the logits'
    gradient (K·N·V elements), a set of its own per input set.
    """
    check_available(provider)
    n, _, v, k = shape
    grad_logits = k * n * v * torch.finfo(dtype).bits // 8 if provider == "matmuls" else 0
    read = ce_memory_floor_bytes(shape, dtype) + grad_logits
    return Rotation(ce_call(provider, *ce_inputs(shape, dtype)) for _ in range(input_sets(read)))


def ce_memory_floor_bytes(shape: tuple[int, int, int, int], dtype: torch.dtype) -> int:
    """``(K·N·D + V·D)`` elements of ``dtype``: the gradients' size, what O(N·D + V·D) is stated against."""
    n, d, v, k = shape
    return (k * n * d + v * d) * torch.finfo(dtype).bits // 8


# ---------------------------------------------------------------- host time per eager call


def host_rows(dtype: torch.dtype) -> dict[str, Callable[[], Rotation]]:
    """The host-time rows, label → builder of LASH's calls: inputs so small that a GPU keeps up
    with the host. The GPU suite times them with launches; ``cpu_host_time.py`` without."""
    rows = {}
    for op, size in (("rms_norm", (8, 1024)), ("add_rms_norm", (8, 1024)), ("apply_rotary", (1, 4, 16, 64))):
        for mode in ("forward", "forward+backward"):
            rows[f"{op} {mode} {'×'.join(map(str, size))}"] = functools.partial(op_call, op, "lash", size, mode, dtype)
    n, d, v, k = 256, 64, 2048, 4  # the seed's width D 64, fewer tokens and classes
    rows[f"multi-exit CE forward+backward N{n} D{d} V{v} K{k}"] = functools.partial(
        ce_calls, "lash", (n, d, v, k), dtype)
    return rows
