"""The ASHEM experiment end to end: data, phase 1, hard-token mining, phase 2, routing, report.

    python colab2.py                      # defaults: WikiText-2 (offline corpus without the hub)
    python colab2.py --quick --out DIR    # a few minutes on a laptop CPU
    python colab2.py --protocol reference # the seed's own protocol, for a like-for-like comparison

Writes DIR/results.json, DIR/results.md and PNG plots (training curves, the phase-1 confidence
histogram with the threshold, PPL per exit before and after phase 2).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields

import torch

from lash import ASHEMConfig, load_dataset
from lash.ashem import run_ashem
from lash.config import PROTOCOLS
from lash.report import summary_table, write_report

# --quick: a small run that finishes in a few minutes on two CPU cores.
QUICK = {"samples": 1200, "dim": 64, "phase1_max_epochs": 3, "phase2_max_epochs": 3, "max_vocab": 1024}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="auto", help="auto, wikitext-2, offline, or a path to text")
    p.add_argument("--samples", type=int, default=10000, help="training sequences")
    p.add_argument("--val-samples", type=int, default=None, help="validation sequences (default samples // 5)")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-vocab", type=int, default=None, help="vocabulary cap (offline corpus: its size, default 2048)")
    defaults = ASHEMConfig()
    for f in fields(ASHEMConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "protocol":
            p.add_argument(flag, choices=PROTOCOLS, default=defaults.protocol)
        elif f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, f.name))
        else:
            p.add_argument(flag, type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--quick", action="store_true", help="a small run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--out", default="runs/ashem", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = ASHEMConfig(**{f.name: getattr(args, f.name) for f in fields(ASHEMConfig)})
        data = load_dataset(args.dataset, args.samples, args.batch_size, args.seq_len, args.seed, args.max_vocab, args.val_samples)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(
        f"data: {data.source}, vocab {data.vocab_size}, {data.train.inputs.shape[0]} train / "
        f"{data.val.inputs.shape[0]} val sequences of {args.seq_len}"
        + (f"; entropy rate {data.entropy_rate:.3f} nats (best PPL {torch.tensor(data.entropy_rate).exp():.2f})" if data.entropy_rate else "")
    )
    result = run_ashem(
        config, data.train, data.val, data.vocab_size, args.dim, args.heads, device, args.batch_size, args.seed, progress=not args.no_progress
    )
    result.setup.update(dataset=data.source, entropy_rate=data.entropy_rate)
    command = "python colab2.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    paths = write_report(result, args.out, command.strip())
    print()
    print(summary_table(result))
    print()
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
