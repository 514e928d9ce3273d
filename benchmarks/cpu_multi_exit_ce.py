"""CPU time and peak memory of the multi-exit loss, forward + backward: LASH's torch path vs eager.

Eager is :func:`multi_exit_cross_entropy_reference` (materialised logits + ``F.cross_entropy``).
Each provider runs in its own fresh subprocess, repeated ``--rounds`` times alternating the
providers; a subprocess times ``--steps`` forward+backward steps after one warm-up step and
reports their median and the growth of its peak resident set size (``ru_maxrss``) over the inputs
alone. The printed ratios are medians over rounds (the cores may be shared, so rounds vary).

    PYTHONPATH=. python benchmarks/cpu_multi_exit_ce.py            # N 2048, D 512, V 32000, K 3
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone

import torch

CHILD = """
import resource, statistics, sys, time, torch
torch.set_num_threads({threads})
torch.manual_seed(0)
from lash_kernels import multi_exit_cross_entropy, multi_exit_cross_entropy_reference
hiddens = torch.randn({K}, {N}, {D}, requires_grad=True)
weight = (torch.randn({V}, {D}) / {D} ** 0.5).requires_grad_()
targets = torch.randint(0, {V}, ({N},))
fn = multi_exit_cross_entropy if "{provider}" == "lash" else multi_exit_cross_entropy_reference
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for step in range({steps} + 1):
    hiddens.grad = weight.grad = None
    start = time.perf_counter()
    fn(hiddens, weight, targets, [1.0] * {K}).loss.backward()
    times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(statistics.median(times[1:]), peak)
"""


def run(provider: str, args: argparse.Namespace) -> tuple[float, int]:
    """(median seconds per forward+backward, peak RSS growth in KiB) of one fresh subprocess."""
    code = CHILD.format(provider=provider, **vars(args))
    env = os.environ | {"LASH_KERNELS": "torch", "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    seconds, peak = done.stdout.split()[-2:]
    return float(seconds), int(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--N", type=int, default=2048, help="tokens")
    parser.add_argument("--D", type=int, default=512, help="hidden size")
    parser.add_argument("--V", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--K", type=int, default=3, help="exits")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per subprocess")
    parser.add_argument("--rounds", type=int, default=3, help="subprocesses per provider")
    args = parser.parse_args()
    print(
        f"N={args.N} D={args.D} V={args.V} K={args.K} fp32, {args.threads} threads; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    results = {"eager": [], "lash": []}
    for _ in range(args.rounds):
        for provider in results:
            results[provider].append(run(provider, args))
    time_ratios = [lash[0] / eager[0] for eager, lash in zip(results["eager"], results["lash"])]
    memory_ratios = [lash[1] / eager[1] for eager, lash in zip(results["eager"], results["lash"])]
    for provider, runs in results.items():
        seconds = ", ".join(f"{s:.2f}" for s, _ in runs)
        mib = ", ".join(f"{p / 1024:.0f}" for _, p in runs)
        print(f"{provider:>5}: s/step {seconds}; peak RSS growth MiB {mib}")
    print(f"time   lash / eager = {statistics.median(time_ratios):.2f}x (median of {args.rounds} rounds)")
    print(f"memory lash / eager = {statistics.median(memory_ratios):.2f}x (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
