"""Real early exit (CALM state propagation) vs the seed's selection-only routing: PPL and accuracy.

Trains a small deep-supervision model on the offline corpus, calibrates thresholds for 30/50/70%
shallow tokens on the validation split, and prints a Markdown table comparing
``Trainer.evaluate`` (every layer runs; a confident token takes the exit layer's prediction) with
``lash.routing.early_exit_forward`` (exited tokens keep their exit state; deeper layers see it).

    PYTHONPATH=. python benchmarks/routing_quality.py
"""

import math

import torch
import torch.nn.functional as F

from lash import DeepSupervisionTransformer, Trainer, TrainingConfig, calibrate_threshold, load_dataset
from lash.routing import early_exit_forward

LAYERS, EXIT = 4, 2


@torch.no_grad()
def early_exit_metrics(model, batches, threshold):
    nll = hits = shallow = tokens = 0.0
    for x, y in batches:
        logits, stats = early_exit_forward(model, x, threshold, EXIT)  # (B, T, V)
        nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        hits += (logits.argmax(-1) == y).sum().item()
        shallow += stats["shallow_ratio"] * y.numel()
        tokens += y.numel()
    ratio = shallow / tokens
    return ratio, (ratio * EXIT + (1 - ratio) * LAYERS) / LAYERS, math.exp(nll / tokens), hits / tokens


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_dataset("offline", num_samples=2000, batch_size=32, seq_len=32, seed=0, val_samples=400)
    model = DeepSupervisionTransformer(data.vocab_size, 64, LAYERS, 4, max_seq_len=32, exit_layer=EXIT)
    config = TrainingConfig(layer_weights={layer: 1.0 / LAYERS for layer in range(1, LAYERS + 1)})
    trainer = Trainer(config, data.vocab_size, progress=False)
    optimizer = trainer.create_optimizer(model, 3e-3)
    for _ in range(4):
        trainer.train_epoch(model, data.train, optimizer)
    model.eval()
    val = list(data.val)
    full = trainer.evaluate(model, val)
    print(f"full model: PPL {full['ppl']:.3f}, acc {full['acc']:.2%}; layer {EXIT} alone: "
          f"PPL {full['per_layer'][EXIT]['ppl']:.3f}, acc {full['per_layer'][EXIT]['acc']:.2%}\n")  # fmt: skip
    print("| target shallow | threshold | routing | shallow | compute_cost | PPL | acc |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for target in (0.3, 0.5, 0.7):
        threshold = calibrate_threshold(model, val, EXIT, target_shallow_ratio=target)
        routed = TrainingConfig(config.layer_weights, routing_threshold=min(threshold, 1.0), exit_layer=EXIT)
        sel = Trainer(routed, data.vocab_size, progress=False).evaluate(model, val)
        print(f"| {target:.0%} | {threshold:.4f} | selection | {sel['shallow_ratio']:.1%} | "
              f"{sel['compute_cost']:.3f} | {sel['ppl']:.3f} | {sel['acc']:.2%} |")  # fmt: skip
        ratio, cost, ppl, acc = early_exit_metrics(model, val, threshold)
        print(f"| {target:.0%} | {threshold:.4f} | early exit | {ratio:.1%} | {cost:.3f} | {ppl:.3f} | {acc:.2%} |")


if __name__ == "__main__":
    main()
