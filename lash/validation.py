"""Argument checks shared by every LASH entry point: each error names the field, the value and
the allowed range."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from lash_kernels import values_need_checking


def check_int(name: str, value: object, low: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32


def check_real(
    name: str, value: object, low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number in the interval from ``low`` to
    ``high``, within float32's range (every such number ends up in a tensor)."""
    high_open = high_open or not math.isfinite(high)
    allowed = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number in {allowed}")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name}={value!r} is beyond float32's range (±{FLOAT32_MAX:.3g}); allowed: {allowed}")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        raise ValueError(f"{name}={value} is outside {allowed}")


def check_index(name: str, value: object, low: int, high: int, note: str = "") -> int:
    """Return ``value`` if it is an int (not a bool) in ``[low, high]``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} is outside [{low}, {high}]{note}")
    return int(value)


def check_layer_index(name: str, layer: object, num_layers: int | None = None) -> None:
    """Raise ``ValueError``, naming ``name``, unless ``layer`` is an int in ``[1, num_layers]``
    (no upper bound when ``num_layers`` is ``None``)."""
    upper = "num_layers" if num_layers is None else str(num_layers)
    if isinstance(layer, bool) or not isinstance(layer, Integral):
        raise ValueError(f"{name}: layer index {layer!r} must be an int in [1, {upper}]")
    if layer < 1 or (num_layers is not None and layer > num_layers):
        raise ValueError(f"{name}: layer index {layer} is outside [1, {upper}]")


def check_optional_int(name: str, value: object, low: int) -> None:
    """Like :func:`check_int`, and ``None`` is allowed too."""
    if value is not None:
        try:
            check_int(name, value, low)
        except ValueError:
            raise ValueError(f"{name}={value!r} must be None or an int >= {low}") from None


def check_bool(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False`` (a string like ``"no"`` is not)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")


def check_device(name: str, value: object) -> torch.device:
    """The ``torch.device`` for ``value`` if it names one this machine has, else ``ValueError``."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}={value!r} is not a device: use cpu, cuda, cuda:N, mps, ...") from None
    if device.type in ("cpu", "meta"):
        return device
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if device.type == "mps":
        available = torch.backends.mps.is_available
    if available is None or not available():
        raise ValueError(f"{name}={value!r}: this machine has no {device.type} device (use cpu)")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ValueError(f"{name}={value!r} is outside the {device.type} devices 0..{count() - 1}")
    return device


def check_token_ids(ids: torch.Tensor, vocab_size: int, name: str = "token id", ignore_index: int | None = None) -> None:
    """Raise ``ValueError`` if ``ids`` is not an integer tensor (any integer dtype) or any id is
    outside ``[0, vocab_size)`` (``ignore_index`` allowed).

    On the CPU the check reads the ids directly. On a GPU reading them back would stall the step
    until the device catches up (a host sync), so there the check is ``torch._assert_async``,
    which fails the next synchronising call with this message; the Trainer checks its batches
    on the CPU before moving them, so training gets the ``ValueError``, and runs its step inside
    :func:`lash_kernels.values_checked`, where the values are not checked again. Skipped while
    ``torch.compile`` traces, where it would break the graph.
    """
    if torch.compiler.is_compiling():
        return
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name}s must be an integer tensor (such as torch.long), got dtype {ids.dtype}")
    if not values_need_checking():  # the caller checked them (lash_kernels.values_checked)
        return
    ids = ids.long()  # compared in int64: a narrower dtype would wrap a vocabulary size it cannot hold
    bad = (ids < 0) | (ids >= vocab_size)
    if ignore_index is not None:
        bad &= ids != ignore_index
    allowed = f"[0, {vocab_size})" + ("" if ignore_index is None else f" or {ignore_index}")
    if ids.device.type != "cpu":
        torch._assert_async(~bad.any(), f"a {name} is outside {allowed}")
    elif bool(bad.any()):
        raise ValueError(f"{name} {int(ids[bad][0])} is outside {allowed}")


def check_batch_ids(x: torch.Tensor, y: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """:func:`check_token_ids` of a batch's input ids ``x`` and its targets ``y`` (which may also
    be ``ignore_index``)."""
    check_token_ids(x, vocab_size)
    check_token_ids(y, vocab_size, "target value", ignore_index)


def check_threshold(threshold: object) -> float | None:
    """Return ``threshold`` (``None``: routing off; else a float in [0, 1]), or raise ``ValueError``.

    A token exits when its confidence is ``>= threshold``: 0 sends every token out early, 1 only
    the fully confident ones.
    """
    if threshold is None:
        return None
    check_real("routing_threshold", threshold, 0.0, 1.0)
    return float(threshold)


def check_exit_layer(exit_layer: object, num_layers: int) -> int:
    """Return ``exit_layer`` if it is an int in ``[1, num_layers - 1]`` (shallower than the answering layer)."""
    if num_layers == 1:
        raise ValueError(f"exit_layer={exit_layer!r}: a model of num_layers=1 has no shallower layer to exit at")
    return check_index("exit_layer", exit_layer, 1, num_layers - 1, f" (a layer shallower than layer {num_layers})")
