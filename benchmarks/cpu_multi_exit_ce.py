"""CPU time and peak memory of the multi-exit loss, forward + backward: LASH's torch path vs eager.

Eager is :func:`multi_exit_cross_entropy_reference` (materialised logits + ``F.cross_entropy``).
Time: one fresh subprocess per round runs ``--steps`` forward+backward steps of each provider,
alternating them step by step after a warm-up, so both see the same load on shared cores; the
time ratio is the median of the per-step ratios over all rounds. Memory: each provider runs one
step in its own fresh subprocess, which reports the growth of its peak resident set size
(``ru_maxrss``) over the inputs alone.

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

SETUP = """
import resource, time, torch
torch.set_num_threads({threads})
torch.manual_seed(0)
from lash_kernels import multi_exit_cross_entropy, multi_exit_cross_entropy_reference
hiddens = torch.randn({K}, {N}, {D}, requires_grad=True)
weight = (torch.randn({V}, {D}) / {D} ** 0.5).requires_grad_()
targets = torch.randint(0, {V}, ({N},))
PROVIDERS = {{"eager": multi_exit_cross_entropy_reference, "lash": multi_exit_cross_entropy}}

def step(provider):
    hiddens.grad = weight.grad = None
    start = time.perf_counter()
    PROVIDERS[provider](hiddens, weight, targets, [1.0] * {K}).loss.backward()
    return time.perf_counter() - start
"""

TIME_CHILD = SETUP + """
step("eager"), step("lash")  # warm-up
for _ in range({steps}):
    print(step("eager"), step("lash"))
"""

MEMORY_CHILD = SETUP + """
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step("{provider}")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def child(code: str, args: argparse.Namespace) -> list[str]:
    """Lines printed by ``code`` run in a fresh Python with the torch backend and the thread count."""
    env = os.environ | {"LASH_KERNELS": "torch", "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return done.stdout.strip().splitlines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--N", type=int, default=2048, help="tokens")
    parser.add_argument("--D", type=int, default=512, help="hidden size")
    parser.add_argument("--V", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--K", type=int, default=3, help="exits")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per provider per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (fresh subprocesses)")
    args = parser.parse_args()
    print(
        f"N={args.N} D={args.D} V={args.V} K={args.K} fp32, {args.threads} threads; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    steps = []  # (eager s, lash s) per step
    memory = {"eager": [], "lash": []}  # peak RSS growth in KiB per round
    for _ in range(args.rounds):
        steps += [tuple(map(float, line.split())) for line in child(TIME_CHILD.format(**vars(args)), args)]
        for provider in memory:
            memory[provider].append(int(child(MEMORY_CHILD.format(provider=provider, **vars(args)), args)[-1]))
    for i, provider in enumerate(memory):
        seconds = ", ".join(f"{step[i]:.2f}" for step in steps)
        mib = ", ".join(f"{kib / 1024:.0f}" for kib in memory[provider])
        print(f"{provider:>5}: s/step {seconds}; peak RSS growth MiB {mib}")
    time_ratio = statistics.median(lash / eager for eager, lash in steps)
    memory_ratio = statistics.median(lash / eager for eager, lash in zip(memory["eager"], memory["lash"]))
    print(f"time   lash / eager = {time_ratio:.2f}x (median of {len(steps)} interleaved steps)")
    print(f"memory lash / eager = {memory_ratio:.2f}x (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
