"""A Hugging Face model's RoPE against LASH's drop-in (``lash.hf.use_lash_kernels``), forward + backward.

Three providers on Llama-3-8B's attention shape (32 query heads, 8 key heads, head dim 128) with
per-row ``(B, T, D)`` tables in the activations' dtype, as the model builds them:

- ``hf``: the family's own ``apply_rotary_pos_emb`` (eager torch in bf16, one kernel per operation);
- ``lash-exact``: LASH's drop-in, ``apply_rotary(..., eager_rounding=True)``, bitwise the model's;
- ``lash``: ``apply_rotary`` with fp32 maths and one rounding.

Prints the median time of each (``triton.testing.do_bench`` on CUDA), its ratio to ``hf`` and its
share of the device's copy bandwidth. Needs a CUDA device.

    PYTHONPATH=. python benchmarks/hf_rope.py [--batch 4] [--seq 2048]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # runs from a checkout, lash not installed
import measure  # noqa: E402

from lash_kernels import apply_rotary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not measure.ON_GPU:
        parser.exit(2, "hf_rope.py: error: needs a CUDA device\n")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, t, hq, hk, d, dtype = args.batch, args.seq, 32, 8, 128, torch.bfloat16
    q = torch.randn(b, t, hq, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()  # (B, Hq, T, D)
    k = torch.randn(b, t, hk, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()  # (B, Hk, T, D)
    angles = torch.rand(b, t, d // 2, device="cuda") * 6.3
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    providers = {
        "hf": lambda: apply_rotary_pos_emb(q, k, cos, sin),
        "lash-exact": lambda: apply_rotary(q, k, cos, sin, eager_rounding=True),
        "lash": lambda: apply_rotary(q, k, cos, sin),
    }
    copy = measure.copy_bandwidth_gbps()
    moved = 4 * (q.numel() + k.numel()) * q.element_size()  # forward reads q, k, writes both; backward the same
    results = {"device": measure.device_name(), "versions": measure.environment(), "copy_gbps": copy,
               "shape": {"batch": b, "seq": t, "q_heads": hq, "k_heads": hk, "head_dim": d, "dtype": "bf16"}}  # fmt: skip
    for name, fn in providers.items():
        step = lambda fn=fn: torch.autograd.grad(fn(), (q, k), (dq, dk))  # noqa: E731
        results[name] = measure.median_seconds(step)
    exact = all(torch.equal(a, b) for a, b in zip(providers["hf"](), providers["lash-exact"]()))
    results["lash_exact_bitwise_equal"] = exact
    print(f"{results['device']}; B {b} T {t} Hq {hq} Hk {hk} D {d} bf16, forward + backward; "
          f"lash-exact bitwise equal to hf: {exact}")  # fmt: skip
    for name in providers:
        seconds = results[name]
        print(f"{name:>10}: {seconds * 1e3:7.3f} ms  {results['hf'] / seconds:5.2f}× hf  "
              f"{moved / seconds / 1e9 / copy:5.2f} of copy bandwidth")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
