"""The multi-exit cross-entropy's result type, input checks and eager reference, in pure torch.

The maths are in :mod:`lash_kernels.ops.multi_exit_ce`; the reference materialises each exit's
logits, which is what every other path avoids, and serves tests and benchmarks as the yardstick.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from lash_kernels._launch import check_one_device

IGNORE_INDEX = -100  # the target id that carries no loss (PyTorch's and Hugging Face's convention)


class MultiExitCEOutput(NamedTuple):
    """What :func:`multi_exit_cross_entropy` returns."""

    loss: torch.Tensor  # () fp32, Σ_k w_k · mean CE_k (token-weighted means if asked), differentiable
    per_exit: torch.Tensor  # (K,) fp32, detached unweighted mean CE of every exit
    confidence: torch.Tensor | None  # (K, N) fp32 max softmax probability, or None
    predictions: torch.Tensor | None  # (K, N) int64 argmax, or None
    token_loss: torch.Tensor | None  # (K, N) fp32 detached per-token CE (0 where ignored), or None


# Thread-local, not a ContextVar: torch.compile traces (and guards on) a thread-local attribute,
# where it cannot read a ContextVar in torch 2.11 (a fullgraph compile fails there; 2.14 can).
_STATE = threading.local()


@contextlib.contextmanager
def values_checked() -> Iterator[None]:
    """Inside, token ids, targets, token weights and RoPE positions count as checked by the caller.

    For a caller that checked them on the CPU before moving them to the device (lash's
    ``Trainer`` does, per batch): the ops' own value checks would otherwise launch device work
    (``torch._assert_async`` and the comparisons it needs) on every call. Shapes and dtypes are
    still checked; they cost the device nothing.
    """
    before = getattr(_STATE, "checked", False)
    _STATE.checked = True
    try:
        yield
    finally:
        _STATE.checked = before


def values_need_checking() -> bool:
    """False inside :func:`values_checked`."""
    return not getattr(_STATE, "checked", False)


def exit_weight_floats(exit_weights: Sequence[float]) -> list[float]:
    """``exit_weights`` as Python floats; ``ValueError`` naming them when one is not a number."""
    try:
        return [float(w) for w in exit_weights]
    except (TypeError, ValueError):
        raise ValueError(f"exit_weights must be a sequence of real numbers; got {exit_weights!r}") from None


def validate_inputs(
    hiddens: Sequence[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    exit_weights: list[float],
    ignore_index: int,
    token_weights: torch.Tensor | None = None,
) -> None:
    """Raise ValueError naming the offending shape, device or value; never a host sync.

    Shapes, devices, weights and ``ignore_index`` are checked on the host. Target and
    token-weight values are checked on the host only for CPU tensors outside ``torch.compile``
    (free there); on a GPU, or while compiling, the check is ``torch._assert_async``, which raises
    a RuntimeError with the same message when the device gets to it (at the next sync), so a
    training step never waits for it.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D]; got shape {tuple(weight.shape)}")
    V, D = weight.shape
    if isinstance(hiddens, torch.Tensor):
        if hiddens.dim() != 3:
            raise ValueError(f"stacked hiddens must be [K, N, D]; got shape {tuple(hiddens.shape)}")
        K, exit_shape, exits = hiddens.shape[0], tuple(hiddens.shape[1:]), {"hiddens": hiddens}
    else:
        shapes = [tuple(h.shape) for h in hiddens]
        if any(len(s) != 2 or s != shapes[0] for s in shapes):
            raise ValueError(f"hiddens must be K ≥ 1 tensors of one shape [N, D]; got shapes {shapes}")
        K, exit_shape = len(shapes), shapes[0] if shapes else None
        exits = {f"hiddens[{k}]": h for k, h in enumerate(hiddens)}
    if K < 1:
        raise ValueError(
            f"hiddens hold {K} exits and exit_weights {len(exit_weights)}; the number of exits must be ≥ 1"
        )
    check_one_device(**exits, weight=weight, targets=targets, token_weights=token_weights)
    N = exit_shape[0]
    if exit_shape[1] != D:
        raise ValueError(f"hidden size of hiddens {exit_shape} does not match head weight {tuple(weight.shape)}")
    if tuple(targets.shape) != (N,):
        raise ValueError(f"targets must have shape ({N},) to match hiddens {exit_shape}; got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor; got {targets.dtype}")
    if K != len(exit_weights):
        raise ValueError(f"{K} exits in hiddens but {len(exit_weights)} exit_weights")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index={ignore_index!r} must be an int")
    for k, w in enumerate(exit_weights):
        # Comparisons, not math.isfinite: once dynamo has seen two sets of weights it traces them
        # as symbolic floats, and math.isfinite of one is an error under fullgraph=True.
        if not 0.0 <= w < math.inf:
            raise ValueError(f"exit_weights[{k}] = {w}; must be finite and >= 0")
    if token_weights is not None:
        check_token_weights(token_weights, (N,))
    if N == 0 or not values_need_checking():
        return
    labelled = torch.where(targets == ignore_index, 0, targets)  # (N,)
    allowed = f"[0, {V}) or ignore_index={ignore_index}"
    if _checked_on_device(targets):
        torch._assert_async(((labelled >= 0) & (labelled < V)).all(), f"a target value is outside {allowed}")
        return
    lo, hi = torch.aminmax(labelled)
    bad = int(lo) if lo < 0 else int(hi) if hi >= V else None
    if bad is not None:
        raise ValueError(f"target value {bad} is outside {allowed}")


def check_token_weights(token_weights: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``token_weights`` is a floating-point tensor of ``shape`` with
    finite values ≥ 0; the values are checked as :func:`validate_inputs` checks targets."""
    if tuple(token_weights.shape) != shape:
        raise ValueError(f"token_weights must have shape {shape} to match the targets; got {tuple(token_weights.shape)}")
    if not token_weights.is_floating_point():
        raise ValueError(f"token_weights must be a floating-point tensor; got {token_weights.dtype}")
    if not values_need_checking():
        return
    good = torch.isfinite(token_weights) & (token_weights >= 0)
    if _checked_on_device(token_weights):
        torch._assert_async(good.all(), "a token weight is negative or not finite")
        return
    bad = token_weights[~good]
    if bad.numel():
        raise ValueError(f"token weight {bad[0].item()} is negative or not finite; token weights must be finite and >= 0")


def labelled_token_weights(token_weights: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """The weights ``t_n`` of the weighted mean: ``token_weights`` at ``labelled`` tokens (0 at the
    others) divided by their maximum, in the weights' dtype widened to fp32 at least.

    The mean does not depend on the weights' scale, but an fp32 sum of them does: weights near
    fp32's largest value overflow it, and subnormal ones fall below the clamp that keeps an
    all-zero sum from dividing 0 by 0. Scaled to a maximum of 1 they sum to a value in
    ``[1, N]``, or to 0 when every labelled token weighs 0 (all stay 0). Tensor ops only: no host
    sync.
    """
    wide = torch.promote_types(token_weights.dtype, torch.float32)
    t = torch.where(labelled, token_weights.to(wide), 0.0)  # (N,)
    if t.numel() == 0:
        return t
    peak = t.amax()
    return t / torch.where(peak > 0, peak, 1.0)


def _checked_on_device(values: torch.Tensor) -> bool:
    """Whether a value check must stay on the device: reading a GPU tensor, or one being traced, would sync or break the graph."""
    return values.device.type != "cpu" or torch.compiler.is_compiling()


def multi_exit_cross_entropy_reference(
    hiddens: Sequence[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    exit_weights: Sequence[float],
    ignore_index: int = IGNORE_INDEX,
    return_stats: bool = False,
    validate: bool = True,
    token_weights: torch.Tensor | None = None,
) -> MultiExitCEOutput:
    """Eager reference: materialises each exit's ``[N, V]`` logits and calls ``F.cross_entropy``.

    Same arguments and result as :func:`multi_exit_cross_entropy`. Computes in fp32, or in
    float64 when the inputs are float64 (which is how the tests get an exact yardstick); targets
    of any integer dtype are read as int64.
    """
    weights = exit_weight_floats(exit_weights)
    if validate:
        validate_inputs(hiddens, weight, targets, weights, ignore_index, token_weights)
    ignore_index, targets = operator.index(ignore_index), targets.long()
    dtype = torch.promote_types(torch.promote_types(hiddens[0].dtype, weight.dtype), torch.float32)
    count = (targets != ignore_index).sum().clamp(min=1)
    if token_weights is not None:
        t = labelled_token_weights(token_weights, targets != ignore_index).to(dtype)  # (N,)
        t = t / t.sum().clamp(min=torch.finfo(dtype).tiny)
    per_exit, weighted, confidence, predictions, token_loss = [], [], [], [], []
    for h in hiddens:
        logits = h.to(dtype) @ weight.to(dtype).T  # (N, V)
        ce = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")  # (N,)
        per_exit.append(ce.sum() / count)
        weighted.append(per_exit[-1] if token_weights is None else (t * ce).sum())
        if return_stats:
            confidence.append(torch.exp(logits.amax(-1) - logits.logsumexp(-1)))  # (N,)
            predictions.append(logits.argmax(-1))  # (N,)
            token_loss.append(ce.detach())
    per_exit = torch.stack(per_exit)  # (K,)
    loss = sum(w * ce for w, ce in zip(weights, weighted))  # Python weights: no host-to-device copy
    stats = (torch.stack(confidence), torch.stack(predictions), torch.stack(token_loss)) if return_stats else (None,) * 3
    return MultiExitCEOutput(loss, per_exit.detach(), *stats)
