"""Command line: ``python -m lash train …`` and ``python -m lash ashem …`` (also the ``lash`` script).

``train`` trains one model over LASH's three options and writes ``DIR/metrics.json`` and
``DIR/checkpoint.pt``; it runs the same under ``torchrun --nproc_per_node=N`` (DDP, or FSDP2 with
``--distributed fsdp``), where ``--batch-size`` stays the global batch. ``ashem`` runs the ASHEM
experiment exactly as ``colab2.py`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shlex
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path

import torch

from lash import threads as lash_threads
from lash.ashem import ASHEMResult, run_phase1, run_phase2, split_dev
from lash.ashem_store import ASHEMStore
from lash.config import PROTOCOLS, ASHEMConfig, TrainingConfig, create_standard_config
from lash.data import load_dataset
from lash.distributed import shutdown_distributed
from lash.files import WriteError, check_writable_dir, one_writer, write_atomic
from lash.models import DeepSupervisionTransformer
from lash.report import summary_table, write_report
from lash.parallel import DISTRIBUTED, PRECISIONS
from lash.utils import duration, set_seed
from lash.trainer import NonFiniteLossError, Trainer
from lash.validation import check_device, check_index, check_int, check_real

# --quick: a small ASHEM run that finishes in a few minutes on two CPU cores.
QUICK = {"samples": 1200, "dim": 64, "phase1_max_epochs": 3, "phase2_max_epochs": 3, "max_vocab": 1024}
# Flags a resumed run may change; every other one must match the checkpoint's run. More epochs
# or steps extend a run (under --cosine they move the schedule's end, which the trainer refuses).
RESUME_MAY_CHANGE = {"resume", "out", "stop_at_step", "epochs", "max_steps", "no_progress", "overwrite", "device",
                     "distributed", "compile", "threads", "routing_threshold", "exit_layer"}  # fmt: skip
CHECKPOINT = "checkpoint.pt"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (``lash train: error: …``) and exit status 2, without the usage."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _layer_map(text: str) -> dict[int, float]:
    """``"2:0.5,4:0.5"`` → ``{2: 0.5, 4: 0.5}``; a layer named twice, or nothing named, is an error."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give layer:value pairs like 2:0.5,4:0.5")
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        parsed = [(int(layer), float(value)) for layer, value in pairs]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of layer:value pairs like 2:0.5,4:0.5") from None
    layers = [layer for layer, _ in parsed]
    twice = sorted({layer for layer in layers if layers.count(layer) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{text!r} names layer {twice[0]} more than once")
    return dict(parsed)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in its help, unless there is none to show or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _add_data_args(p: argparse.ArgumentParser, samples: int) -> None:
    p.add_argument("--dataset", default="auto", help="auto (WikiText-2 if the hub answers, else offline), wikitext-2, "
                   "offline (a generated corpus), or a text file or directory")  # fmt: skip
    p.add_argument("--samples", type=int, default=samples, help="training sequences")
    p.add_argument("--val-samples", type=int, default=None, help="validation sequences (default: samples // 5)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size (sequences)")
    p.add_argument("--max-vocab", type=int, default=None, help="vocabulary cap (default: every word of a text; "
                   "the offline corpus: 2048)")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="--compile: torch.compile the training step; --no-compile: run it eagerly (default: on CUDA "
                   "the eager step replayed from CUDA graphs, on the CPU eager)")
    p.add_argument("--seed", type=int, default=42, help="seed of the data, the initialisation and the shuffling")
    p.add_argument("--threads", default="auto",
                   help="CPU threads: a number, or auto (the cores other processes leave free, checked every epoch)")
    p.add_argument("--out", required=False, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _documented_args(cls: type) -> dict[str, str]:
    """``{name: text}`` from the ``Args:`` section of a Google-style docstring (``%`` escaped for argparse)."""
    helps: dict[str, str] = {}
    name = None
    for line in (cls.__doc__ or "").split("Args:", 1)[-1].splitlines():
        match = re.match(r"\s{8}(\w+): (.*)", line)
        if match:
            name, helps[match[1]] = match[1], match[2]
        elif name and line.startswith(" " * 12):
            helps[name] += " " + line.strip()
    return {key: " ".join(text.split()).replace("%", "%%").replace("``", "") for key, text in helps.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lash", description="LASH: layer-wise supervision and early exit")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one model", formatter_class=_HelpFormatter)
    _add_data_args(train, samples=10000)
    train.set_defaults(out="runs/train")
    train.add_argument("--num-layers", type=int, default=4, help="transformer blocks")
    train.add_argument("--dim", type=int, default=64, help="model width")
    train.add_argument("--num-heads", type=int, default=4, help="attention heads")
    train.add_argument("--layer-weights", type=_layer_map, default=None, help="e.g. 2:0.5,4:0.5 (default: last layer only)")
    train.add_argument("--layer-lr-scales", type=_layer_map, default=None, help="e.g. 1:1.0,2:0.5")
    train.add_argument("--routing-threshold", type=float, default=0.0,
                       help="evaluate early exit: a token whose confidence at --exit-layer reaches this exits there (0: off)")
    train.add_argument("--exit-layer", type=int, default=1, help="the early-exit layer, 1-based")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    train.add_argument("--epochs", type=int, default=None, help="epochs (default 1 without --max-steps)")
    train.add_argument("--max-steps", type=int, default=None, help="train for this many optimizer steps")
    train.add_argument("--stop-at-step", type=int, default=None,
                       help="stop (checkpointed) at this step, keeping the schedule of the full run; resume later")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up, in optimizer steps")
    train.add_argument("--cosine", action="store_true", help="cosine decay to 10%% over the run")
    train.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="fp32, or bf16/fp16 autocast")
    train.add_argument("--distributed", choices=DISTRIBUTED, default="ddp", help="engine under torchrun")
    train.add_argument("--resume", default=None, help="checkpoint to continue from (the same flags, see README)")
    train.add_argument("--overwrite", action="store_true", help=f"replace the {CHECKPOINT} of an earlier run in --out")

    ashem = sub.add_parser("ashem", help="the ASHEM experiment", formatter_class=_HelpFormatter)
    _add_data_args(ashem, samples=10000)
    ashem.set_defaults(out="runs/ashem")
    ashem.add_argument("--dim", type=int, default=64, help="model width")
    ashem.add_argument("--num-heads", type=int, default=4, help="attention heads")
    defaults, helps = ASHEMConfig(), _documented_args(ASHEMConfig)
    for f in fields(ASHEMConfig):
        flag, default, text = "--" + f.name.replace("_", "-"), getattr(defaults, f.name), helps.get(f.name)
        if f.name == "protocol":
            ashem.add_argument(flag, choices=PROTOCOLS, default=default, help=text)
        elif f.type in ("bool", bool):
            ashem.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            ashem.add_argument(flag, type=type(default), default=default, help=text)
    ashem.add_argument("--seeds", type=int, default=1, help="runs with seeds --seed, --seed + 1, …; figures as mean ± std")
    ashem.add_argument("--quick", action="store_true", help="a small run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    ashem.add_argument("--resume", action="store_true",
                       help="continue the run kept in --out (rerunning into the same --out continues it too)")
    ashem.add_argument("--overwrite", action="store_true", help="discard the run kept in --out and start afresh")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ashem" and args.quick:
        defaults = parser.parse_args(["ashem"])  # --quick changes only the values left at their default
        for key, value in QUICK.items():
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
    return args


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _check_common_args(args: argparse.Namespace) -> torch.device:
    """Check the data, device and thread flags before any work; ``ValueError`` names the flag."""
    for flag, low in (("samples", 1), ("seq_len", 1), ("batch_size", 1), ("val_samples", 1), ("max_vocab", 2)):
        if getattr(args, flag) is not None:  # None: the flag was left out
            check_int(_flag(flag), getattr(args, flag), low)
    check_index("--seed", args.seed, 0, 2**32 - 1)
    if not str(args.dataset).strip():
        raise ValueError("--dataset is empty: give auto, wikitext-2, offline, or a text file or directory")
    _check_model_flags(args)
    _check_memory(args)
    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) >= 1):
        raise ValueError(f"--threads {args.threads!r} must be auto or a whole number ≥ 1")
    return check_device("--device", args.device)


def _check_model_flags(args: argparse.Namespace) -> None:
    """Depth, width and heads that make a model: whole heads of an even width (RoPE rotates pairs)."""
    for flag in ("num_layers", "dim", "num_heads"):
        if getattr(args, flag, None) is not None:
            check_int(_flag(flag), getattr(args, flag), 1)
    if args.dim % args.num_heads or (args.dim // args.num_heads) % 2:
        raise ValueError(f"--dim {args.dim} / --num-heads {args.num_heads} must give a whole, even head width "
                         f"(rotary embeddings turn pairs of features); e.g. --dim {2 * args.num_heads * max(1, args.dim // (2 * args.num_heads))}")  # fmt: skip


def _check_memory(args: argparse.Namespace) -> None:
    """Refuse sizes this machine cannot hold, with the estimate: the token ids (train and
    validation, int64) and the model with its gradients and AdamW state (4 copies, fp32)."""
    sequences = args.samples + (args.val_samples if args.val_samples is not None else args.samples // 5)
    vocab = args.max_vocab or 2048  # a text's vocabulary is capped by its words; the offline corpus's default
    layers = getattr(args, "num_layers", None) or max(getattr(args, "phase2_layers", 4), getattr(args, "phase1_layers", 2))
    params = 2 * vocab * args.dim + layers * 12 * args.dim**2
    needed = 8 * sequences * (args.seq_len + 1) + 4 * 4 * params
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise ValueError(f"--samples {args.samples}, --seq-len {args.seq_len}, --max-vocab {args.max_vocab}, --dim "
                         f"{args.dim} and {layers} layers need about {needed / 2**30:,.0f} GiB; this machine has "
                         f"{available / 2**30:,.0f} GiB")  # fmt: skip


def _where(device: torch.device, threads: str) -> str:
    """``"device cpu, 2 threads (auto)"``: where the run computes, after applying ``--threads``."""
    count = lash_threads.use(threads)
    if device.type == "cuda":
        return f"device {_device_name(device)}"
    return f"device cpu, {count} thread{'s' if count > 1 else ''}{' (auto)' if threads == 'auto' else ''}"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ashem flags a continued run may change: where and how it runs, not what it computes.
ASHEM_MAY_CHANGE = {"out", "no_progress", "device", "seeds", "resume", "overwrite", "quick", "threads", "command"}


def run_ashem_command(args: argparse.Namespace, command: str) -> int:
    config = ASHEMConfig(**{f.name: getattr(args, f.name) for f in fields(ASHEMConfig)})
    device = _check_common_args(args)
    check_int("--seeds", args.seeds, 1)
    out = check_writable_dir("--out", args.out)
    store = ASHEMStore(out, {name: value for name, value in vars(args).items() if name not in ASHEM_MAY_CHANGE})
    resumed = store.open(overwrite=args.overwrite, resume=args.resume)
    data = load_dataset(args.dataset, args.samples, args.batch_size, args.seq_len, args.seed, args.max_vocab, args.val_samples)
    print(_where(device, args.threads))
    best = f"; entropy rate {data.entropy_rate:.3f} nats (best PPL {torch.tensor(data.entropy_rate).exp():.2f})" if data.entropy_rate else ""
    print(f"data: {data.source}, vocab {data.vocab_size}, {data.train.inputs.shape[0]} train / "
          f"{data.val.inputs.shape[0]} val sequences of {args.seq_len}{best}")  # fmt: skip
    seeds = list(range(args.seed, args.seed + args.seeds))
    if resumed:
        print(f"continuing the run in {out}:\n{store.describe(seeds)}")
    results, paths = [], []
    start = time.perf_counter()
    try:
        for run, seed in enumerate(seeds, 1):
            print(f"run {run} of {args.seeds}: seed {seed}")
            result = _ashem_seed(args, config, data, device, seed, store.seed(seed))
            result.setup.update(dataset=data.source, entropy_rate=data.entropy_rate)
            results.append(result)
            paths = write_report(results, out, command)
            elapsed = time.perf_counter() - start
            left = args.seeds - run
            eta = f"; ETA {duration(elapsed / run * left)} for the {left} run{'s' if left > 1 else ''} left" if left else ""
            print(f"run {run} of {args.seeds} done (elapsed {duration(elapsed)}{eta}); report over {run} run"
                  f"{'s' if run > 1 else ''} in {out / 'results.md'}")  # fmt: skip
    except KeyboardInterrupt:
        print(f"\ninterrupted; kept in {out}:\n{store.describe(seeds)}\nrun the same command again to continue "
              "from there", file=sys.stderr)  # fmt: skip
        return 130
    print()
    print(summary_table(results))
    print()
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0


def _ashem_seed(args: argparse.Namespace, config: ASHEMConfig, data, device: torch.device, seed: int, files) -> ASHEMResult:
    """One seed's run, continued from what ``files`` (a :class:`lash.ashem_store.SeedStore`) kept."""
    done = files.load_result()
    if done is not None:
        print(f"seed {seed} finished earlier: {files.result_file}")
        return done
    train, dev = split_dev(config, data.train, seed)
    phase1 = files.load_phase1(device)
    if phase1 is None:
        phase1 = run_phase1(
            config, train, dev, data.val, data.vocab_size, args.dim, args.num_heads, device, seed,
            progress=not args.no_progress, checkpoint_path=files.phase1_checkpoint, compile=args.compile,
        )  # fmt: skip
        kept = files.save_phase1(phase1, seed)
        print("phase 1 kept: " + ", ".join(str(path) for path in kept))
    else:
        print(f"phase 1 finished earlier: {files.phase1_model}")
    result, model2 = run_phase2(phase1, config, train, dev, data.val, device, args.batch_size, seed,
                                progress=not args.no_progress, checkpoint_path=files.phase2_checkpoint,
                                compile=args.compile)  # fmt: skip
    files.save_result(result, model2)
    return result


def _check_train_args(args: argparse.Namespace) -> None:
    """Check every ``train`` flag before any work; ``ValueError`` names the flag, value and range."""
    _check_common_args(args)
    check_real("--lr", args.lr, 0.0, low_open=True)
    check_real("--weight-decay", args.weight_decay, 0.0)
    check_real("--grad-clip", args.grad_clip, 0.0)
    check_real("--routing-threshold", args.routing_threshold, 0.0, 1.0)
    for flag, low in (("epochs", 1), ("max_steps", 1), ("stop_at_step", 1), ("grad_accum", 1), ("warmup_steps", 0)):
        if getattr(args, flag) is not None:  # None: the flag was left out
            check_int(_flag(flag), getattr(args, flag), low)
    if args.resume is not None and not args.resume.strip():
        raise ValueError("--resume is empty: name the checkpoint file to continue from")
    if args.resume is not None and not Path(args.resume).is_file():
        what = "is a directory, not a checkpoint file" if Path(args.resume).is_dir() else "does not exist"
        raise ValueError(f"--resume {args.resume} {what}: name the checkpoint file to continue from")
    out = check_writable_dir("--out", args.out)
    if (out / CHECKPOINT).exists() and not (args.resume or args.overwrite):
        raise ValueError(
            f"--out {args.out} already holds the {CHECKPOINT} of an earlier run: pass --resume "
            f"{out / CHECKPOINT} to continue it, --overwrite to replace it, or another --out"
        )


def _check_same_run(saved: object, args: argparse.Namespace, path: str) -> None:
    """Refuse to resume with flags that differ from the checkpoint's run (other than RESUME_MAY_CHANGE).

    A checkpoint converted from v1 recorded no flags: only the trainer's own checks apply.
    """
    if saved is None:
        logging.warning("--resume %s: the checkpoint does not record its run's flags (converted from v1?); not compared", path)
        return
    if not isinstance(saved, dict):
        raise ValueError(f"--resume {path}: the checkpoint's record of its run's flags is damaged")
    for name, value in sorted(vars(args).items()):
        if name in RESUME_MAY_CHANGE or name == "command":
            continue
        if saved.get(name) != value:
            raise ValueError(
                f"--resume {path}: {_flag(name)} is {value!r} but the checkpoint's run used {saved.get(name)!r}; "
                f"resume with the same flags (only {', '.join(sorted(_flag(n) for n in RESUME_MAY_CHANGE))} may change)"
            )


def _saved_args(args: argparse.Namespace) -> dict:
    return {name: value for name, value in vars(args).items() if name not in RESUME_MAY_CHANGE and name != "command"}


def run_train_command(args: argparse.Namespace, command: str) -> int:
    _check_train_args(args)
    set_seed(args.seed)
    weights = args.layer_weights or create_standard_config(args.num_layers).layer_weights
    config = TrainingConfig(weights, args.layer_lr_scales, args.routing_threshold, args.exit_layer)
    data = load_dataset(args.dataset, args.samples, args.batch_size, args.seq_len, args.seed, args.max_vocab, args.val_samples)
    epochs = args.epochs if args.epochs is not None else (1 if args.max_steps is None else sys.maxsize)
    steps_per_epoch = -(-len(data.train) // args.grad_accum)
    total = (args.max_steps or steps_per_epoch * epochs) if args.cosine else None
    limits = [n for n in (args.max_steps, args.stop_at_step) if n is not None]
    limit = min(limits) if limits else None
    trainer = Trainer(
        config, data.vocab_size, args.device, progress=not args.no_progress, precision=args.precision,
        compile=args.compile, grad_accum_steps=args.grad_accum, warmup_steps=args.warmup_steps, total_steps=total,
        distributed=args.distributed,
    )  # fmt: skip
    model = DeepSupervisionTransformer(
        data.vocab_size, args.dim, args.num_layers, args.num_heads, max_seq_len=args.seq_len
    ).to(trainer.device)  # fmt: skip
    optimizer = trainer.create_optimizer(model, args.lr, args.weight_decay)
    out = Path(args.out)
    history: list[dict] = []
    if args.resume:
        extra = trainer.load_checkpoint(args.resume)
        _check_same_run(extra.get("args"), args, args.resume)
        history = list(extra.get("history", []))
    if trainer.is_main:
        logging.info("%s, world size %d, %s; %s", _where(trainer.device, args.threads), trainer.world_size, data.source,
                     config.describe())  # fmt: skip
    tokens = 0
    start = time.perf_counter()
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    before = trainer.global_step
    for train_loss, stats in trainer.epochs(model, data.train, data.val, optimizer, args.grad_clip, epochs, limit):
        tokens += (trainer.global_step - before) * args.grad_accum * args.batch_size * args.seq_len
        before = trainer.global_step
        history.append({"epoch": trainer.epochs_trained, "step": trainer.global_step, "train_loss": train_loss} | stats)
        if trainer.is_main:
            logging.info("step %d: train loss %.4f | val loss %.4f ppl %.2f acc %.4f",
                         trainer.global_step, train_loss, stats["loss"], stats["ppl"], stats["acc"])  # fmt: skip
        trainer.save_checkpoint(out / CHECKPOINT, extra={"command": command, "args": _saved_args(args), "history": history})
    seconds = time.perf_counter() - start
    final = history[-1]
    metrics = {
        "command": command,
        "device": _device_name(trainer.device),
        "world_size": trainer.world_size,
        "torch": torch.__version__,
        "final_train_loss": final["train_loss"],
        "final_val_loss": final["loss"],
        "final_val_ppl": final["ppl"],
        "final_val_acc": final["acc"],
        "per_exit": final["per_layer"],
        "shallow_ratio": final["shallow_ratio"],
        "compute_cost": final["compute_cost"],
        "global_step": trainer.global_step,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(trainer.device) if trainer.device.type == "cuda" else None,
        "history": history,
    }
    if trainer.is_main:
        write_atomic(out / "metrics.json", json.dumps(_strict_json(metrics), indent=2, allow_nan=False).encode())
        print(_final_line(metrics, config))
        print(f"wrote {out / 'metrics.json'} and {out / CHECKPOINT}")
    return 0


def _strict_json(value):
    """``value`` with every NaN or infinite float as ``None`` (``null``): JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


def _final_line(metrics: dict, config: TrainingConfig) -> str:
    """The run's outcome in one line: the model's answer on validation, and early exit when evaluated."""
    line = (f"done after {metrics['global_step']} steps: train loss {metrics['final_train_loss']:.4f} | val loss "
            f"{metrics['final_val_loss']:.4f} ppl {metrics['final_val_ppl']:.2f} acc {metrics['final_val_acc']:.2%}")  # fmt: skip
    if config.has_routing:
        line += (f" | early exit at layer {config.exit_layer} (threshold {config.routing_threshold}): "
                 f"{metrics['shallow_ratio']:.1%} of tokens exited, compute cost {metrics['compute_cost']:.1%}")  # fmt: skip
    return line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.formatwarning = _one_line_warning
    command = "python -m lash " + shlex.join(argv)
    try:
        with _one_writer(args):
            if args.command == "ashem":
                return run_ashem_command(args, command)
            return run_train_command(args, command)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except WriteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except NonFiniteLossError as error:
        print(f"error: {error}; the last checkpoint in --out is kept (try a lower --lr or --grad-clip)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = Path(args.out) / CHECKPOINT
        where = f"the last finished epoch is kept in {kept}: continue with --resume {kept}" if kept.is_file() else "nothing was kept"
        print(f"interrupted; {where}", file=sys.stderr)
        return 130
    finally:
        shutdown_distributed()


def _one_writer(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The lock of ``--out`` for the process that writes there (rank 0 under torchrun)."""
    if args.out is None or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return one_writer("--out", args.out)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as ``warning: message``: a user of the command needs no source line of LASH's."""
    return f"warning: {message}\n"


def ashem_main(argv: list[str] | None = None) -> int:
    """``colab2.py``: the ``ashem`` command with its flags."""
    return main(["ashem", *(sys.argv[1:] if argv is None else argv)])
