"""Decoding speed of a trained early-exit model: plain, early exit and self-speculative, by batch.

The model is a :class:`lash.DeepSupervisionTransformer` trained here on the offline corpus with
every exit supervised, so that exits mean something; it is trained once and kept in
``--cache`` (default ``~/.cache/lash/decode_bench``). Each mode decodes ``--new`` tokens after
prompts cut from the validation split, in fp32 on the CPU (``--threads``, default 1) or bf16 on a
GPU. Rows: tokens/s, the speedup against plain decoding timed in the same run, the shallow ratio,
the speculative acceptance rate, the executed-layer ratio, and the bytes ideal: the weight and
KV-cache bytes a token must read under plain decoding over those it must read under the mode
(exited tokens read the first ``exit_layer`` layers and the head; a step that goes deep reads the
deep layers once for all its rows), and the achieved fraction of it. Early exit runs at the
thresholds that make about 50/70/90% of the decoded tokens exit (quantiles of the exit-layer
confidence on the model's own greedy continuations of the prompts), rows exiting independently;
at batch > 1 also at ~70% with the batch rule (a step exits only when every row may);
self-speculative decoding with 2/4/6 drafts.

On CUDA it adds a Hugging Face Llama of about 1B parameters built from a config (random bf16
weights, so plain and early-exit speed only) against ``model.generate`` with a static cache.

    PYTHONPATH=. python benchmarks/decode_bench.py                  # dim 512, 12 layers, exit at 3
    PYTHONPATH=. python benchmarks/decode_bench.py --dry-run        # tiny and fast: checks the script
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import DEVICE, ON_GPU, copy_bandwidth_gbps, device_name, synchronize  # noqa: E402

from lash import DeepSupervisionTransformer, Trainer, TrainingConfig  # noqa: E402
from lash.data import load_dataset  # noqa: E402
from lash.generation import generate  # noqa: E402


def train_or_load(args) -> tuple[DeepSupervisionTransformer, torch.Tensor, int]:
    """The trained model (from the cache when there), validation sequences, and the vocabulary size.

    Training saves a checkpoint every ``--eval-every`` steps next to the model, so a run that is
    stopped (a time box) resumes where it was, exactly, the next time."""
    data = load_dataset("offline", args.train_samples, args.batch_size, args.seq_len, seed=0, max_vocab=args.vocab)
    key = hashlib.sha256(json.dumps([args.dim, args.layers, args.heads, args.vocab, args.train_steps, args.seq_len,
                                     args.train_samples, args.exit_layer, "cosine"]).encode()).hexdigest()[:16]  # fmt: skip
    path = Path(args.cache) / f"model-{key}.pt"
    model = DeepSupervisionTransformer(data.vocab_size, args.dim, args.layers, args.heads,
                                       max_seq_len=args.seq_len + args.new + 8, exit_layer=args.exit_layer)  # fmt: skip
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        print(f"model loaded from {path}")
    else:
        train(model.to(DEVICE), data, args, path.with_suffix(".ckpt"))
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
        path.with_suffix(".ckpt").unlink()
        print(f"model saved to {path}")
    model = model.to(DEVICE, torch.bfloat16 if ON_GPU else torch.float32).eval()  # decoded in bf16 on a GPU
    return model, data.val.inputs, data.vocab_size


def train(model: DeepSupervisionTransformer, data, args, checkpoint: Path) -> None:
    """Every exit supervised, the exit layer weighted most, so that the exits predict well; AdamW
    with a cosine decay over the run, whose last steps bring the deep layers into line with the
    shallow ones (this post-norm model's deep exits lag for the first few hundred steps)."""
    weights = {layer: (2.0 if layer == args.exit_layer else 1.0) for layer in range(1, args.layers + 1)}
    # Not compiled: eager steps start at once, and the run is short next to a compile on the CPU.
    trainer = Trainer(TrainingConfig(layer_weights=weights), data.vocab_size, DEVICE, progress=False,
                      precision="bf16" if ON_GPU else "fp32", compile=False, total_steps=args.train_steps)  # fmt: skip
    optimizer = trainer.create_optimizer(model, 1e-3)
    if checkpoint.is_file():
        trainer.load_checkpoint(checkpoint)
        print(f"resumed at step {trainer.global_step} from {checkpoint}")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    while trainer.global_step < args.train_steps:
        stop = min(trainer.global_step + args.eval_every, args.train_steps)
        trainer.train_epoch(model, data.train, optimizer, max_steps=stop)
        trainer.save_checkpoint(checkpoint)
        print(f"trained {trainer.global_step} steps, {time.perf_counter() - start:.0f} s; {exit_agreement(model, data.val)}", flush=True)


def exit_agreement(model: DeepSupervisionTransformer, val) -> str:
    """Held-out next-token accuracy at the exit layer and the last layer, and how often the two
    agree: the share of drafts that self-speculative decoding can expect to keep."""
    x, y = val.inputs[:64].to(DEVICE), val.targets[:64].to(DEVICE)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        shallow, deep = (model.output_head(h).argmax(-1) for h in model.hidden_states(x, [model.exit_layer, model.num_layers]))
    model.train(was_training)

    def share(same: torch.Tensor) -> str:
        return f"{same.float().mean().item():.1%}"

    return (f"accuracy at layer {model.exit_layer} {share(shallow == y)}, at layer {model.num_layers} {share(deep == y)}, "
            f"agreeing on {share(shallow == deep)}")  # fmt: skip


def thresholds(model, prompts: torch.Tensor, new: int, shares: list[float]) -> dict[float, float]:
    """The exit-layer confidence quantiles at which about ``share`` of the decoded tokens exit.

    Taken on the model's own greedy continuations of ``prompts``, the text that early exit
    decodes: the model is surer there than on held-out text, where the same quantiles let far
    more decoded tokens exit than their share (91% at the held-out 70% quantile, at 1000 steps)."""
    with torch.no_grad():
        text = generate(model, prompts, new)  # (B, T0 + new)
        conf = model.compute_confidence(model.hidden_states(text, [model.exit_layer])[0])
    conf = conf[:, prompts.shape[1] - 1 : -1].flatten().float()  # the confidences that chose each new token
    return {share: float(conf.quantile(1 - share)) for share in shares}


def timed(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Median wall time of each ``fn()`` over ``repeats`` rounds after one warm-up each. The calls
    are interleaved, one of each per round, so that a machine whose speed drifts (a shared CPU)
    moves every mode alike and the ratios between them hold."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def deep_steps(model, fn) -> int:
    """How many calls reach the first deep layer while ``fn()`` decodes (the prefill included);
    ``fn`` must decode eagerly: a graph's replay runs no forward hook."""
    calls = []
    handle = model.layers[model.exit_layer].register_forward_hook(lambda *a: calls.append(1))
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


def bytes_per_token(model, prompt_len: int, new: int, batch: int, exited_share: float, deep_share: float) -> float:
    """Weight and KV-cache bytes one generated token must read: the first ``exit_layer`` layers and
    the head always, the deep layers on the share of steps that go deep (read once for the step's
    rows and spread over the batch); the cache of the layers read, at the mean length."""
    L, e, D = model.num_layers, model.exit_layer, model.dim
    size = model.output_head.weight.element_size()
    layer = sum(p.numel() for p in model.layers[0].parameters()) * size
    head = model.output_head.weight.numel() * size
    cache = 2 * D * (prompt_len + new / 2) * size  # one layer's keys and values, one row
    shallow = (e * layer + head) / batch + e * cache
    deep = (L - e) * (layer / batch + cache)
    return shallow + deep_share * deep


def run(args) -> list[dict]:
    model, val, vocab = train_or_load(args)  # trained on every core
    if not ON_GPU:
        torch.set_num_threads(args.threads)
    rows = []
    levels = thresholds(model, val[: max(args.batches), : args.prompt].to(DEVICE), args.new, [0.5, 0.7, 0.9])
    bandwidth = copy_bandwidth_gbps() * 1e9 if ON_GPU else None  # bytes/s, read + written
    for batch in args.batches:
        prompt = val[:batch, : args.prompt].to(DEVICE)
        modes = [("plain", {})]
        if ON_GPU:  # plain decoding replays CUDA graphs by default; this row shows what they save
            modes += [("plain, no CUDA graphs", {"cuda_graphs": False})]
        modes += [(f"early exit ~{share:.0%}", {"routing_threshold": t}) for share, t in levels.items()]
        if batch > 1:  # the whole batch exits only when every row is confident
            modes += [("early exit ~70%, batch rule", {"routing_threshold": levels[0.7], "exit_batching": "batch"})]
        modes += [(f"speculative, {k} drafts", {"speculative": True, "draft_tokens": k}) for k in (2, 4, 6)]
        calls = {name: (lambda kw=kwargs: generate(model, prompt, args.new, **kw)) for name, kwargs in modes}
        seconds_of = timed(calls, args.repeats)
        plain_time = seconds_of["plain"]
        for name, kwargs in modes:
            seconds = seconds_of[name]
            tokens, stats = generate(model, prompt, args.new, return_stats=True, **kwargs)
            if name == "plain":  # the first mode
                plain_tokens = tokens
            row = {"batch": batch, "mode": name, "tokens_per_s": batch * args.new / seconds,
                   "speedup_vs_plain": plain_time / seconds, **stats}  # fmt: skip
            if kwargs.get("speculative"):  # greedy: the full model's tokens, exactly
                row["same_tokens_as_plain"] = torch.equal(tokens, plain_tokens)
            if bandwidth and name == "plain":  # bytes a step must read, over the time the copy bandwidth needs for them
                step_bytes = batch * bytes_per_token(model, args.prompt, args.new, batch, 0.0, 1.0)
                row["of_roofline"] = step_bytes / bandwidth / (seconds / args.new)
            if "routing_threshold" in kwargs:
                # Counted eagerly: graphs take the same steps (tested) but run no hooks. The prefill is not a step.
                deep_share = (deep_steps(model, lambda: generate(model, prompt, args.new, cuda_graphs=False, **kwargs)) - 1) / args.new
                full = bytes_per_token(model, args.prompt, args.new, batch, 0.0, 1.0)
                routed = bytes_per_token(model, args.prompt, args.new, batch, stats["shallow_ratio"], deep_share)
                row.update(deep_step_share=deep_share, bytes_ideal=full / routed, of_bytes_ideal=row["speedup_vs_plain"] / (full / routed))
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def hf_rows(args) -> list[dict]:
    """On CUDA: a ~1B-parameter Llama from a config (random bf16 weights), LASH's plain and
    early-exit decoding (static cache and CUDA graphs, the default there; plain also without)
    against ``model.generate`` with a static cache (which it compiles), batch 1."""
    import transformers

    from lash.hf import generate as hf_generate

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1024)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(DEVICE):  # initialised where it runs: a second, not the CPU's minute
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 128), device=DEVICE)
    new, exit_layer = args.new, 4
    with torch.no_grad():
        parts = transformers_parts(model)
        h = parts.backbone(prompt, output_hidden_states=True).hidden_states[exit_layer]
        conf = parts.head(parts.norm(h)).float().softmax(-1).amax(-1).flatten()
    modes = {"plain": {}, "plain, dynamic cache, no CUDA graphs": {"cache_implementation": "dynamic"},
             "early exit ~70%": {"routing_threshold": float(conf.quantile(0.3))}}  # fmt: skip
    calls = {name: (lambda kw=kwargs: hf_generate(model, prompt, new, exit_layer=exit_layer, **kw)) for name, kwargs in modes.items()}
    # A token reads every weight but the embedding table (one row of it) and the cache at its mean length.
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    kv = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    cache = 2 * config.num_hidden_layers * kv * (prompt.shape[1] + new / 2) * 2  # bf16 keys and values
    bandwidth = copy_bandwidth_gbps() * 1e9
    seconds_of = timed(calls, args.repeats)
    rows = []
    for name, kwargs in modes.items():  # printed before model.generate compiles, which a time box may cut
        _, stats = hf_generate(model, prompt, new, exit_layer=exit_layer, return_stats=True, **kwargs)
        rows.append({"batch": 1, "mode": f"hf llama-1b {name}", "tokens_per_s": new / seconds_of[name],
                     "speedup_vs_plain": seconds_of["plain"] / seconds_of[name], **stats})  # fmt: skip
        if name == "plain":
            rows[-1]["of_roofline"] = (weights + cache) / bandwidth / (seconds_of[name] / new)
        print(_line(rows[-1]), flush=True)
    # model.generate, compiled on its first call, timed interleaved with LASH's plain decoding again.
    reference = {"plain": calls["plain"], "model.generate": lambda: model.generate(
        prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static")}  # fmt: skip
    against = timed(reference, args.repeats)
    rows.append({"batch": 1, "mode": MODEL_GENERATE, "tokens_per_s": new / against["model.generate"],
                 "speedup_vs_plain": against["plain"] / against["model.generate"],
                 "shallow_ratio": 0.0, "acceptance_rate": 0.0, "executed_layer_ratio": 1.0})  # fmt: skip
    print(_line(rows[-1]), flush=True)
    return rows


MODEL_GENERATE = "hf llama-1b model.generate (static cache, compiled)"


def transformers_parts(model):
    from lash.hf import decoder_parts

    return decoder_parts(model)


def _line(row: dict) -> str:
    ideal = f" | bytes ideal {row['bytes_ideal']:.2f}×, reached {row['of_bytes_ideal']:.2f}" if "bytes_ideal" in row else ""
    ideal += f" | {row['of_roofline']:.2f} of the HBM roofline" if "of_roofline" in row else ""
    return (f"batch {row['batch']:>2} {row['mode']:<27} {row['tokens_per_s']:8.1f} tok/s  {row['speedup_vs_plain']:.2f}× plain"
            f" | shallow {row['shallow_ratio']:.0%} acceptance {row['acceptance_rate']:.0%} layers {row['executed_layer_ratio']:.2f}{ideal}")


def markdown(rows: list[dict], args) -> str:
    lines = [
        f"{device_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {datetime.date.today().isoformat()}; "
        f"dim {args.dim}, {args.layers} layers, exit at {args.exit_layer}, vocab {args.vocab}, prompt {args.prompt}, "
        f"{args.new} new tokens, median of {args.repeats}.",
        "",
        "| batch | mode | tokens/s | vs plain | shallow | acceptance | executed layers | bytes ideal | of ideal |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ideal = (f"{r['bytes_ideal']:.2f}× | {r['of_bytes_ideal']:.2f}" if "bytes_ideal" in r else "– | –")
        lines.append(f"| {r['batch']} | {r['mode']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_plain']:.2f}× | "
                     f"{r['shallow_ratio']:.0%} | {r['acceptance_rate']:.0%} | {r['executed_layer_ratio']:.2f} | {ideal} |")  # fmt: skip
    differ = [f"{r['mode']} at batch {r['batch']}" for r in rows if r.get("same_tokens_as_plain") is False]
    lines += ["", "Speculative tokens equal plain decoding's: " + ("every row." if not differ else "**not** in " + "; ".join(differ) + ".")]
    if differ and ON_GPU:
        lines[-1] += (" In bf16 a verify pass over several rows rounds differently from a one-row step, so a near tie can"
                      " flip a token and all that follow; the exactness bar is fp32's (the tests, and this benchmark on the CPU).")
    reference = [r for r in rows if r["mode"] == MODEL_GENERATE]
    if reference:  # its row's "vs plain" is model.generate's speed over LASH's plain decoding of the Llama
        lines += ["", f"The Hugging Face Llama's rows are against LASH's plain decoding of it; LASH's plain decoding is "
                      f"{1 / reference[0]['speedup_vs_plain']:.2f}× `model.generate` with a compiled static cache (timed interleaved)."]
    roofline = [f"{r['mode']} at batch {r['batch']}: {r['of_roofline']:.2f}" for r in rows if "of_roofline" in r]
    if roofline:
        lines += ["", "Share of the HBM roofline (a step's weight and cache bytes / copy bandwidth): " + "; ".join(roofline) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--exit-layer", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=64, help="training sequence length")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch")
    parser.add_argument("--train-samples", type=int, default=8000)
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=100, help="training steps between checkpoints")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads while decoding (training takes every core)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "lash" / "decode_bench"))
    parser.add_argument("--out", help="write the table (Markdown) and every row (JSON) here, as DIR/decode.{md,json}")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, few steps: checks the script")
    args = parser.parse_args()
    if args.dry_run:
        args.dim, args.layers, args.heads, args.exit_layer, args.train_steps, args.new = 32, 4, 4, 1, 4, 8
        args.train_samples, args.batches, args.repeats = 256, [1, 2], 1
    rows = run(args)
    write(rows, args)
    if ON_GPU and not args.dry_run:  # last: model.generate's compile is the step a time box would cut
        rows += hf_rows(args)
        write(rows, args)


def write(rows: list[dict], args) -> None:
    """Print the table of ``rows`` and write it (and the rows) under ``--out``."""
    table = markdown(rows, args)
    print()
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode.md").write_text(table)
        (out / "decode.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("LASH_KERNELS", "auto")
    main()
