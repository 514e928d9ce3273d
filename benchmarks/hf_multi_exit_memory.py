"""A K-exit loss at a Hugging Face LLM's size: one fused call against K materialised logits and K fused calls.

The three ways to train K exits of one shared head (forward + backward of Σ_k w_k · CE_k):

- ``materialised``: ``F.cross_entropy(head(h_k), y)`` per exit, K fp32 logit tensors held for the
  backward (what torchtune's ``early_exit_loss`` and TRL's LayerSkip example do);
- ``k-fused``: K single-exit fused calls, one per exit (how a one-hidden-state fused loss such as
  Liger's or Cut Cross-Entropy's serves K exits);
- ``lash``: one ``multi_exit_cross_entropy`` call over all K exits.

Each provider runs in a fresh subprocess. On the CPU it reports the growth of the peak resident
set size over the inputs; with ``--device cuda`` the peak allocated memory over the inputs and
the median time (``triton.testing.do_bench``). Default shape: Llama-3.2-1B's width and a 32K
vocabulary (D 2048, V 32000), N = 1024 tokens, K = 4 exits.

    PYTHONPATH=. python benchmarks/hf_multi_exit_memory.py [--device cuda] [--tokens N] [--vocab V]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PROVIDERS = ("materialised", "k-fused", "lash")

CHILD = """
import json, resource, sys, torch
import torch.nn.functional as F
from lash_kernels import multi_exit_cross_entropy
provider, device, N, D, V, K = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
dtype = torch.bfloat16 if device == "cuda" else torch.float32
torch.manual_seed(0)
hiddens = torch.randn(K, N, D, device=device, dtype=dtype, requires_grad=True)
head = (torch.randn(V, D, device=device) / D ** 0.5).to(dtype).requires_grad_()
targets = torch.randint(0, V, (N,), device=device)
weights = [1.0 / K] * K

def step():
    if provider == "materialised":
        loss = sum(w * F.cross_entropy((hiddens[k] @ head.T).float(), targets) for k, w in enumerate(weights))
    elif provider == "k-fused":
        loss = sum(multi_exit_cross_entropy([hiddens[k]], head, targets, [w]).loss for k, w in enumerate(weights))
    else:
        loss = multi_exit_cross_entropy(hiddens, head, targets, weights).loss
    loss.backward()
    hiddens.grad = head.grad = None

if device == "cuda":
    import triton.testing
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(step)
else:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    peak, ms = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, None
print(json.dumps({"peak_bytes": peak, "ms": ms}))
"""


def measure(provider: str, device: str, tokens: int, dim: int, vocab: int, exits: int) -> dict:
    env = os.environ | ({"OMP_NUM_THREADS": "1"} if device == "cpu" else {})
    args = [provider, device, str(tokens), str(dim), str(vocab), str(exits)]
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.split("\n")[-2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--exits", type=int, default=4)
    args = parser.parse_args()
    shape = (args.tokens, args.dim, args.vocab, args.exits)
    logits = args.exits * args.tokens * args.vocab * 4 / 2**20
    print(f"N={args.tokens} D={args.dim} V={args.vocab} K={args.exits} on {args.device}; "
          f"all exits' fp32 logits = {logits:.0f} MiB")  # fmt: skip
    results = {provider: measure(provider, args.device, *shape) for provider in PROVIDERS}
    lash = results["lash"]
    for provider, r in results.items():
        ratio = r["peak_bytes"] / lash["peak_bytes"] if lash["peak_bytes"] else float("nan")
        time = "" if r["ms"] is None else f", {r['ms']:.2f} ms ({r['ms'] / lash['ms']:.2f}× lash)"
        print(f"{provider:>13}: peak memory {r['peak_bytes'] / 2**20:8.0f} MiB ({ratio:.2f}× lash){time}")


if __name__ == "__main__":
    main()
