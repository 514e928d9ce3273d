"""The launchers' host helpers: plan caching and Triton's size arithmetic at a plain function's cost."""

import pytest
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
