"""Host time per eager call of each LASH op, Triton launches left out: what the GPU suite's host rows pay around their launches, measured on the CPU.

On a GPU a small op's eager call is bound by the host: the Python around its kernels (input checks,
the autograd Function, launch plans, output allocation) and Triton's launches. This script times
the first part without a GPU. Each op runs on CPU tensors along the path an eager CUDA call takes
(the twin ``autograd.Function``, :func:`lash_kernels._launch.call_op`), with every Triton launch
replaced by a no-op: ``TRITON_INTERPRET=1`` only lets the ops take CPU tensors. The shapes are
the GPU suite's host rows (``benchmarks/gpu_suite.py``, ``host_time``) in fp32.
"Forward" calls take inputs that need no gradient; "forward+backward" adds a sum and
``backward()``, as the suite's rows do. Each figure is the fastest of several interleaved rounds,
µs per call. For scale, two rows of torch alone: one allocation, and autograd's round trip
through one multiply (forward, sum, ``backward()``), which every forward+backward row pays too.

    PYTHONPATH=. python benchmarks/cpu_host_time.py [--rounds 12] [--calls 300]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

os.environ["LASH_KERNELS"] = "triton"
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402 - after the environment the ops read at import

from lash_kernels import (  # noqa: E402
    _launch,
    add_rms_norm,
    apply_rotary,
    multi_exit_cross_entropy,
    rms_norm,
)


class _NoLaunch:
    """A launcher whose launches do nothing."""

    def __init__(self, kernel: object) -> None:
        self.kernel = kernel

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def stub_launches() -> None:
    """Every op module's launches become no-ops, and calls take the eager twin path."""
    for name, module in list(sys.modules.items()):
        if name.startswith("lash_kernels.ops") and getattr(module, "launch", None) is _launch.launch:
            module.launch = _NoLaunch
    _launch.interpreting = lambda: False


def forward_backward(call: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        call().sum().backward()

    return run


def calls() -> dict[str, Callable[[], object]]:
    """The suite's host rows (``gpu_suite.host_time``), fp32."""
    x, r, w = torch.randn(8, 1024), torch.randn(8, 1024), torch.rand(1024) + 0.5
    xg, rg, wg = (t.clone().requires_grad_() for t in (x, r, w))
    q, k = torch.randn(1, 4, 16, 64), torch.randn(1, 4, 16, 64)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    angles = torch.arange(16)[:, None] * torch.rand(32)[None, :]
    cos, sin = angles.cos(), angles.sin()
    n, d, v, exits = 256, 64, 2048, 4
    hiddens = torch.randn(exits, n, d, requires_grad=True)
    head = (torch.randn(v, d) / d**0.5).requires_grad_()
    targets = torch.randint(0, v, (n,))
    return {
        "one torch.empty": lambda: torch.empty(8, 1024),
        "torch x·w forward+backward 8×1024": forward_backward(lambda: xg * wg),
        "rms_norm forward 8×1024": lambda: rms_norm(x, w),
        "rms_norm forward+backward 8×1024": forward_backward(lambda: rms_norm(xg, wg)),
        "add_rms_norm forward 8×1024": lambda: add_rms_norm(x, r, w),
        "add_rms_norm forward+backward 8×1024": forward_backward(lambda: add_rms_norm(xg, rg, wg)[0]),
        "apply_rotary forward 1×4×16×64": lambda: apply_rotary(q, k, cos, sin),
        "apply_rotary forward+backward 1×4×16×64": forward_backward(lambda: apply_rotary(qg, kg, cos, sin)[0]),
        f"multi-exit CE forward+backward N{n} D{d} V{v} K{exits}": lambda: multi_exit_cross_entropy(
            hiddens, head, targets, [1.0] * exits, validate=False
        ).loss.backward(),
    }


def measure(rounds: int, per_round: int) -> dict[str, float]:
    """µs per call of every row: the fastest round, rows interleaved within each round."""
    rows = calls()
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(rounds):
        for name, call in rows.items():
            call()
            started = time.perf_counter()
            for _ in range(per_round):
                call()
            best[name] = min(best[name], (time.perf_counter() - started) / per_round * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=300, help="calls per row and round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stub_launches()
    print(f"host time per eager call, launches left out; {platform.machine()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, fastest of {args.rounds} rounds")  # fmt: skip
    for name, us in measure(args.rounds, args.calls).items():
        print(f"{name:48s} {us:8.1f} µs")


if __name__ == "__main__":
    main()
