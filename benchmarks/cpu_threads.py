"""Training speed on a CPU shared with other work: LASH and the original implementation, by thread count.

Each setting runs in a fresh process: ``--steps`` training steps of ASHEM's phase-1 model
(dim 64, 2 layers, 4 heads, batch 64 × 32, the loss on the last layer, AdamW) through
``lash.Trainer.train_epoch`` (which, under ``auto``, re-checks the free cores at each call), alternated block by block with the same steps of the original
implementation's eager model (:class:`lash.original.OriginalModel`, ``F.cross_entropy`` on its
last layer's logits), so both see the same load. Settings: torch threads (``--threads``: a count, torch's default, or LASH's ``auto``), an
idle machine or one other CPU-bound process running (``load``), and how OpenMP's idle
threads wait (``--wait``: by default they spin for a while at the end of a parallel region;
``OMP_WAIT_POLICY=PASSIVE`` makes them sleep at once, ``GOMP_SPINCOUNT`` bounds the spin). Reported:
milliseconds per step (median), and each one's slowdown against its own idle figure.

    PYTHONPATH=. python benchmarks/cpu_threads.py                   # auto, 1, 2, default × idle/busy × wait
    PYTHONPATH=. python benchmarks/cpu_threads.py --json out.json   # every figure, with the machine and versions
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone

import torch

CHILD = """
import statistics, time, torch
import torch.nn.functional as F
from lash import DeepSupervisionTransformer, Trainer, create_standard_config
from lash.data import TokenBatches
from lash.original import OriginalModel
{set_threads}
V, D, L, H, B, T = 2048, 64, 2, 4, 64, 32
g = torch.Generator().manual_seed(0)
seq = torch.randint(0, V, ({steps} * B, T + 1), generator=g)
batches = TokenBatches(seq[:, :-1], seq[:, 1:], B)
torch.manual_seed(0)
lash_model = DeepSupervisionTransformer(V, D, L, H, max_seq_len=T)
trainer = Trainer(create_standard_config(L), V, progress=False)
lash_opt = trainer.create_optimizer(lash_model, 1e-3)
original = OriginalModel(V, D, L, H, max_len=T)
original_opt = torch.optim.AdamW(original.parameters(), lr=1e-3)

def lash_block():
    start = time.perf_counter()
    trainer.train_epoch(lash_model, batches, lash_opt)
    return (time.perf_counter() - start) / {steps}

def original_block():
    start = time.perf_counter()
    for x, y in batches:
        original_opt.zero_grad(set_to_none=True)
        F.cross_entropy(original.all_logits(x)[-1].reshape(-1, V), y.reshape(-1)).backward()
        original_opt.step()
    return (time.perf_counter() - start) / {steps}

lash_block(), original_block()  # warm-up
times = {{"lash": [], "original": []}}
for _ in range({rounds}):
    times["lash"].append(lash_block())
    times["original"].append(original_block())
print(statistics.median(times["lash"]), statistics.median(times["original"]), torch.get_num_threads())
"""

BUSY = "while True: pass"


def run_setting(threads: str, busy: bool, wait: str, steps: int, rounds: int) -> dict:
    """One fresh process at this setting; returns seconds per step of both models."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["LASH_KERNELS"] = "torch"
    if wait != "default":
        name, _, value = wait.partition("=")
        env[name] = value
    set_threads = {"default": "", "auto": "from lash import threads; threads.use('auto')"}.get(
        threads, f"torch.set_num_threads({threads})"
    )
    code = CHILD.format(set_threads=set_threads, steps=steps, rounds=rounds)
    hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    lash, original, used = done.stdout.split()
    return {"threads": threads, "used_threads": int(used), "busy": busy, "wait": wait,
            "lash_s": float(lash), "original_s": float(original)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="auto,1,2,default",
                        help="comma-separated: thread counts, 'default' (torch's own) or 'auto' (LASH's --threads auto)")
    parser.add_argument("--wait", default="default,OMP_WAIT_POLICY=PASSIVE",
                        help="comma-separated OpenMP wait settings: default or NAME=VALUE of the environment")
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed block")
    parser.add_argument("--rounds", type=int, default=3, help="timed blocks per model (median taken)")
    parser.add_argument("--json", help="also write every figure here")
    args = parser.parse_args()
    rows = []
    for threads in args.threads.split(","):
        for wait in args.wait.split(","):
            for busy in (False, True):
                rows.append(run_setting(threads.strip(), busy, wait, args.steps, args.rounds))
                r = rows[-1]
                print(f"threads {r['threads']:>7} ({r['used_threads']}) {wait} "
                      f"{'busy' if busy else 'idle'}: lash {1e3 * r['lash_s']:7.1f} ms/step, "
                      f"original {1e3 * r['original_s']:7.1f} ms/step", flush=True)  # fmt: skip
    print()
    print("| threads | OpenMP wait | LASH idle → busy (ms/step) | slowdown | original idle → busy | slowdown | LASH / original, busy |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for idle, busy in zip(rows[::2], rows[1::2]):
        print(f"| {idle['threads']} ({idle['used_threads']}) | {idle['wait']} | "
              f"{1e3 * idle['lash_s']:.1f} → {1e3 * busy['lash_s']:.1f} | {busy['lash_s'] / idle['lash_s']:.2f}× | "
              f"{1e3 * idle['original_s']:.1f} → {1e3 * busy['original_s']:.1f} | "
              f"{busy['original_s'] / idle['original_s']:.2f}× | {busy['lash_s'] / busy['original_s']:.2f}× |")  # fmt: skip
    if args.json:
        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
                "machine": platform.machine(), "torch": torch.__version__}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
