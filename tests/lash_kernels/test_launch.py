"""The launchers' host helpers: plan caching, Triton's size arithmetic at a plain function's cost,
and the device copies of an op's float arguments."""

import collections

import pytest
import torch
import triton
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from lash_kernels import _launch


def test_launch_plans_are_cached_but_symbolic_sizes_are_planned_afresh():
    """A persistent grid's plan is memoised per size and arch; ``torch.compile`` with dynamic
    shapes passes SymInts, which cannot be hashed: those are planned each time."""
    planned = []
    plan = _launch.cached_plan(lambda m, n: planned.append(m) or m + n)
    assert plan(3, 4) == plan(3, 4) == 7 and planned == [3]
    rows = ShapeEnv().create_unbacked_symint()
    plan(rows, 4)
    plan(rows, 4)
    assert len(planned) == 3


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 64, 100, 1024, 1025])
def test_host_cdiv_and_next_power_of_2_agree_with_tritons(n):
    assert _launch.next_power_of_2(n) == triton.next_power_of_2(n)
    assert _launch.cdiv(n, 7) == triton.cdiv(n, 7) and _launch.cdiv(n, 64) == triton.cdiv(n, 64)


def test_device_floats_are_copied_once_and_do_not_pile_up(monkeypatch):
    """Values that change every call (a schedule of exit weights) keep only the most recently
    used sets; a set read while a CUDA graph was captured is never freed, since every replay
    reads it; a set used again is the same tensor."""
    monkeypatch.setattr(_launch, "_DEVICE_FLOATS", collections.OrderedDict())
    monkeypatch.setattr(_launch, "DEVICE_FLOATS_KEPT", 3)
    like = torch.zeros(1)
    capturing = False
    monkeypatch.setattr(_launch, "_capturing", lambda t: capturing)
    first = _launch.device_floats([0.5, 1.0], like)
    capturing = True
    in_graph = _launch.device_floats([0.25, 1.0], like)
    capturing = False
    for step in range(10):
        weight = (step + 0.5) / 16  # exact in fp32
        out = _launch.device_floats([weight, 1.0], like)
        assert out.dtype == torch.float32 and out.tolist() == [weight, 1.0]
    assert _launch.device_floats([9.5 / 16, 1.0], like) is out  # the latest set, copied once
    kept = {values for values, _ in _launch._DEVICE_FLOATS}
    assert kept == {(0.25, 1.0), (7.5 / 16, 1.0), (8.5 / 16, 1.0), (9.5 / 16, 1.0)}
    assert _launch.device_floats([0.25, 1.0], like) is in_graph
    assert _launch.device_floats([0.5, 1.0], like) is not first  # freed, copied again
