"""Peak CPU memory of the multi-exit loss, forward + backward: LASH's chunked torch path vs eager.

Each provider runs in a fresh subprocess and reports the growth of its peak resident set size
(``ru_maxrss``) over the inputs alone, so the numbers do not mix. Seed configuration with all
four exits: N = 64 × 32 tokens, D = 64, V = 16384, K = 4.

    PYTHONPATH=. python benchmarks/cpu_peak_memory.py
"""

import os
import subprocess
import sys

N, D, V, K = 2048, 64, 16384, 4

CHILD = f"""
import resource, torch
torch.manual_seed(0)
from lash_kernels import multi_exit_cross_entropy, multi_exit_cross_entropy_reference
hiddens = torch.randn({K}, {N}, {D}, requires_grad=True)
weight = (torch.randn({V}, {D}) / {D} ** 0.5).requires_grad_()
targets = torch.randint(0, {V}, ({N},))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fn = multi_exit_cross_entropy if "{{provider}}" == "lash" else multi_exit_cross_entropy_reference
fn(hiddens, weight, targets, [1.0] * {K}).loss.backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def peak_kib(provider: str) -> int:
    code = CHILD.replace("{provider}", provider)
    env = os.environ | {"LASH_KERNELS": "torch", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(done.stdout.split()[-1])


def main() -> None:
    logits_mib = K * N * V * 4 / 2**20
    print(f"N={N} D={D} V={V} K={K}; one copy of all exits' fp32 logits = {logits_mib:.0f} MiB")
    eager, lash = peak_kib("eager"), peak_kib("lash")
    print(f"peak RSS growth: eager {eager / 1024:.0f} MiB, lash {lash / 1024:.0f} MiB ({lash / eager:.1%} of eager)")


if __name__ == "__main__":
    main()
