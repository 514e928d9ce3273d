"""Host time per eager call of each LASH op, Triton launches left out: what the GPU suite's host rows pay around their launches, measured on the CPU.

On a GPU a small op's eager call is bound by the host: the Python around its kernels (input checks,
the autograd Function, launch plans, output allocation) and Triton's launches. This script times
the first part without a GPU. Each op runs on CPU tensors along the path an eager CUDA call takes
(the twin ``autograd.Function``, :func:`lash_kernels._launch.call_op`), with every Triton launch
replaced by a no-op: ``TRITON_INTERPRET=1`` only lets the ops take CPU tensors. The calls are the
GPU suite's host rows themselves (``kernel_bench.host_rows``, which ``gpu_suite.host_time`` times
with launches), in fp32: "forward" calls take inputs that need no gradient; "forward+backward"
is one ``torch.autograd.grad`` from the outputs, with dense gradients, to the inputs. Each figure
is the fastest of several interleaved rounds, µs per call. For scale, two rows of torch alone:
one allocation, and autograd's round trip through one multiply (forward, then
``torch.autograd.grad`` as above), which every forward+backward row pays too.

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

import kernel_bench  # noqa: E402
from lash_kernels import _launch  # noqa: E402


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


def calls() -> dict[str, Callable[[], object]]:
    """Torch's two rows, then the suite's host rows (``kernel_bench.host_rows``) in fp32."""
    x, w = torch.randn(8, 1024, requires_grad=True), torch.rand(1024, requires_grad=True)
    gy = torch.randn(8, 1024)
    rows = {
        "one torch.empty": lambda: torch.empty(8, 1024),
        "torch x·w forward+backward 8×1024": lambda: torch.autograd.grad(x * w, [x, w], gy),
    }
    return rows | {label: build() for label, build in kernel_bench.host_rows(torch.float32).items()}


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
