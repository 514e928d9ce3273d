"""A short ASHEM experiment end to end: LASH's default path against a plain eager loop.

Both sides run the same experiment on the same data: phase 1 (a ``--phase1-layers`` model, every
epoch measured on a dev slice), mining the hard tokens by the phase-1 model's confidence, phase
2 (``--phase2-layers``, the new layers trained on the hard tokens, the rest frozen, the dev slice
measured each epoch), then the validation split at full depth. LASH runs it through
:func:`lash.ashem.run_ashem` with no flags: whatever the :class:`lash.Trainer` does by default on
this device (on CUDA, each step's forward and backward replayed from a CUDA graph and the fused
AdamW; each evaluation and mining batch replayed from a graph too). The baseline is the model of the
original description (:class:`lash.original.OriginalModel`) in a plain loop, as users hand-roll
it: every layer's logits through the head, ``F.cross_entropy`` on the trained one, AdamW.

Wall time counts everything, capturing and compiling included; the seconds LASH logs for the
steps that captured or compiled are shown beside it.
"Phase 2" is mining and phase-2 training. LASH's total also holds the evaluation its report
needs (per-layer, routing and hard-token figures), which the eager loop skips, so the total ratio
leans towards the eager side. The eager model starts from the original description's own
initialisation, so the validation perplexities are not a quality comparison.

    python benchmarks/e2e_ashem.py --device cuda --json OUT.json

Prints per phase seconds and training tokens/s, and the ratio it exists for: eager wall time / LASH's.
Each path runs in a fresh Python process, so each pays its own start-up (cuBLAS handles, and for
LASH Triton's kernels; the CUDA context is made before the clock starts). On CUDA LASH's default
runs twice: first with Triton's and Inductor's caches empty, as on a fresh machine (a new Colab
session), where Triton compiles LASH's kernels (the bar is judged on this run), then with them
filled, as every later run on that machine. LASH also runs with ``compile=False`` (the same
kernels launched eagerly: what the graphs save) and ``compile=True`` (``torch.compile``, Inductor's
cache empty: whether a run this short earns its compile back).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lash import ASHEMConfig
from lash.ashem import run_ashem, split_dev
from lash.data import load_dataset
from lash.original import OriginalModel


class _CompileLog(logging.Handler):
    """Collects the seconds of every "first … took X s" line LASH logs (a step's, an evaluation or a
    mining batch's capture, or a compile)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"took ([\d.]+) s", record.getMessage())
        if found:
            self.seconds.append(float(found.group(1)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_lash(config: ASHEMConfig, data, args, device: torch.device, compile: bool | None = None) -> dict:
    handler = _CompileLog()
    logger = logging.getLogger("lash")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    start = time.perf_counter()
    result = run_ashem(config, data.train, data.val, data.vocab_size, args.dim, args.heads, device, seed=args.seed,
                       progress=False, verbose=False, compile=compile)  # fmt: skip
    _sync(device)
    total = time.perf_counter() - start
    logger.removeHandler(handler)
    tokens = _train_tokens(config, data, args.seed)
    return dict(total=total, compile=sum(handler.seconds), phase1=result.seconds["phase1"],
                phase2=result.seconds["mining"] + result.seconds["phase2"], phase1_tokens=tokens * result.phase1["total_epochs"],
                phase2_tokens=tokens * result.phase2["total_epochs"], val_ppl=result.phase2["ppl"])  # fmt: skip


def _train_tokens(config: ASHEMConfig, data, seed: int) -> int:
    train, _ = split_dev(config, data.train, seed)
    return train.inputs.numel()


def _eager_epoch(model, layer: int, batches, device, optimizer=None, mask_of=None) -> float:
    """One pass: train (with an optimizer) or measure the mean CE of ``layer``'s logits."""
    total, count = torch.zeros((), device=device), 0
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        with torch.set_grad_enabled(optimizer is not None):
            logits = model.all_logits(x)[layer - 1]
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            mask = mask_of(i, x) if mask_of else torch.ones_like(ce)
            loss = (ce * mask).sum() / mask.sum().clamp(min=1)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        total += loss.detach()
        count += 1
    return (total / max(count, 1)).item()


def run_eager(config: ASHEMConfig, data, args, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    train, dev = split_dev(config, data.train, args.seed)
    seq_len = train.inputs.shape[1]
    start = time.perf_counter()
    model1 = OriginalModel(data.vocab_size, args.dim, config.phase1_layers, args.heads, max_len=seq_len).to(device)
    optimizer = torch.optim.AdamW(model1.parameters(), lr=config.phase1_lr)
    for _ in range(config.phase1_max_epochs):
        _eager_epoch(model1, config.phase1_layers, train, device, optimizer)
        _eager_epoch(model1, config.phase1_layers, dev, device)
    _sync(device)
    phase1 = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():  # mining: the phase-1 model's confidence on every training token
        confidence = [model1.all_logits(x.to(device))[-1].softmax(-1).amax(-1) for x, _ in train]
    threshold = torch.cat([c.flatten() for c in confidence]).float().quantile(config.hard_example_ratio).item()
    hard = [(c < threshold).float().flatten() for c in confidence]
    model2 = OriginalModel(data.vocab_size, args.dim, config.phase2_layers, args.heads, max_len=seq_len).to(device)
    model2.load_state_dict(model1.state_dict(), strict=False)  # the phase-1 layers, embedding and head
    frozen = [model2.embedding, *model2.layers[: config.phase1_layers]]
    for p in (p for module in frozen for p in module.parameters()):
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=config.phase2_lr)
    for _ in range(config.phase2_max_epochs):
        _eager_epoch(model2, config.phase2_layers, train, device, optimizer, mask_of=lambda i, x: hard[i])
        _eager_epoch(model2, config.phase2_layers, dev, device)
    val = _eager_epoch(model2, config.phase2_layers, data.val, device)
    _sync(device)
    phase2 = time.perf_counter() - start
    tokens = train.inputs.numel()
    return dict(total=phase1 + phase2, compile=0.0, phase1=phase1, phase2=phase2,
                phase1_tokens=tokens * config.phase1_max_epochs, phase2_tokens=tokens * config.phase2_max_epochs,
                val_ppl=float(torch.tensor(val).exp()))  # fmt: skip


# Each path: its row's name and how LASH runs (compile, None for the eager loop). On CUDA the
# default runs twice: first with Triton's and Inductor's caches empty (a fresh machine, where
# Triton compiles LASH's kernels), then with them filled (every later run on that machine).
PATHS = {
    "eager": ("eager (lash.original, plain loop)", None),
    "lash-first": ("LASH default path, first run (empty Triton and Inductor caches)", None),
    "lash": ("LASH default path", None),
    "lash-eager": ("LASH, compile=False", False),
    "lash-compile": ("LASH, compile=True", True),
}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dataset", default="offline", help="offline, wikitext-2 or a text file")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per phase")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--path", choices=PATHS, default=None, help=argparse.SUPPRESS)  # a child process's one path
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # where the child writes its row
    return parser.parse_args()


def run_path(args: argparse.Namespace) -> dict:
    """One path of the experiment in this process: the data, the device's context, then the timed run."""
    device = torch.device(args.device)
    data = load_dataset(args.dataset, args.samples, seed=args.seed)
    # Patience above the epoch count: both sides train every epoch.
    config = ASHEMConfig(phase1_max_epochs=args.epochs, phase2_max_epochs=args.epochs,
                         phase1_patience=args.epochs + 1, phase2_patience=args.epochs + 1)  # fmt: skip
    torch.zeros(1, device=device)  # the CUDA context, which every process pays before it trains
    _sync(device)
    if args.path == "eager":
        return run_eager(config, data, args, device) | {"source": data.source}
    return run_lash(config, data, args, device, compile=PATHS[args.path][1]) | {"source": data.source}


def _in_a_process(path: str, caches: Path) -> dict:
    """Run ``path`` in a fresh Python process, so that none pays for another's start-up: each
    makes its own CUDA context, cuBLAS handles and Triton kernels (from ``caches``)."""
    env = os.environ | {"TRITON_CACHE_DIR": str(caches / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor")}
    row = caches / f"{path}.json"
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--path", path, "--row", str(row)], env=env, check=True)
    return json.loads(row.read_text())


def main() -> None:
    args = _arguments()
    if args.path is not None:
        Path(args.row).write_text(json.dumps(run_path(args)))
        return
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; {args.samples} sequences, {args.epochs} epochs per phase; each path in a "
          "fresh process")  # fmt: skip
    print("| path | total s | speed vs eager | capture/compile s | phase 1 s | phase 1 tokens/s | phase 2 s | phase 2 tokens/s "
          "| val PPL |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    # On the CPU LASH's kernels are torch code, so a first run is a later one, and the default never compiles.
    paths = ["eager", "lash-first", "lash", "lash-eager", "lash-compile"] if device.type == "cuda" else ["eager", "lash"]
    rows = {}
    with tempfile.TemporaryDirectory() as caches:
        for path in paths:  # each row printed when done, with its ratio: a time box keeps them
            label = PATHS[path][0]
            rows[label] = r = _in_a_process(path, Path(caches))
            r["speed_vs_eager"] = rows[PATHS["eager"][0]]["total"] / r["total"]
            print(f"| {label} | {r['total']:.1f} | {r['speed_vs_eager']:.2f}× | {r['compile']:.1f} | {r['phase1']:.1f} "
                  f"| {r['phase1_tokens'] / r['phase1']:,.0f} | {r['phase2']:.1f} | {r['phase2_tokens'] / r['phase2']:,.0f} "
                  f"| {r['val_ppl']:.1f} |", flush=True)  # fmt: skip
    judged = PATHS["lash-first" if device.type == "cuda" else "lash"][0]
    print(f"data: {rows[PATHS['eager'][0]]['source']}")
    print(f"end to end, capturing and compiling included: LASH {rows[judged]['speed_vs_eager']:.2f}× the eager loop's "
          f"speed ({judged}; bar ≥ 3× on a GPU)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
