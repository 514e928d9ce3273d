"""ASHEM: Adaptive Supervision via Hard Example Mining, done on held-out data.

Phase 1 trains a shallow model on all training data. Its confidence (max softmax probability)
on every training token gives a threshold, the ``hard_example_ratio`` quantile; tokens below it
are hard. Phase 2 copies the embedding, the phase-1 layers and the shared head into a deeper
model, freezes what the config says, and trains on full training sequences with the loss masked
to the hard tokens, so attention still sees the whole context. At inference a token the
phase-1 layers are confident about exits there (two-stage routing); the rest go deeper.

Everything reported is measured on the validation split. ``protocol="original"`` instead
repeats the original description's protocol (hard tokens mined from the validation set, phase 2 trained and
measured on them as single-token sequences) so its published table can be compared like for like.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from lash.config import ASHEMConfig, TrainingConfig, create_standard_config
from lash.data import TokenBatches
from lash.evaluation import evaluate
from lash.files import write_atomic
from lash.losses import exit_statistics
from lash.models import DeepSupervisionTransformer
from lash.trainer import Trainer

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
IGNORE_INDEX = -100


class HardExamples(NamedTuple):
    """Sequences with a per-token mask of the tokens called hard."""

    inputs: torch.Tensor  # (n, T) token ids
    targets: torch.Tensor  # (n, T) next-token ids
    hard: torch.Tensor  # (n, T) bool

    @property
    def ratio(self) -> float:
        """Fraction of tokens that are hard."""
        return self.hard.float().mean().item()

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> TokenBatches:
        """Full sequences whose targets are ``IGNORE_INDEX`` except at hard tokens."""
        return TokenBatches(self.inputs, self.targets.masked_fill(~self.hard, IGNORE_INDEX), batch_size, shuffle, seed)

    def single_tokens(self) -> HardExamples:
        """Each hard token alone as a length-1 sequence: the original description's phase-2 data (no context)."""
        x, y = self.inputs[self.hard][:, None], self.targets[self.hard][:, None]  # (m, 1)
        return HardExamples(x, y, torch.ones_like(x, dtype=torch.bool))


@torch.no_grad()
def _token_confidence(
    model: DeepSupervisionTransformer, batches: Batches, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and the output layer's confidence of every token ``(n, T)``, over ``batches``."""
    model.eval()
    xs, ys, confs = [], [], []
    for x, y in batches:
        h = model.hidden_states(x.to(device), [model.num_layers])
        confs.append(exit_statistics(h, model.output_head.weight, y.to(device)).confidence[0].view_as(x).cpu())
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys), torch.cat(confs)


def last_layer_confidence(model: DeepSupervisionTransformer, batches: Batches, device: str | torch.device = "cpu") -> torch.Tensor:
    """Max softmax probability of the model's last layer for every token: ``(n, T)``."""
    return _token_confidence(model, batches, torch.device(device))[2]


def compute_confidence_threshold(confidence: torch.Tensor, hard_example_ratio: float) -> float:
    """The confidence below which ``hard_example_ratio`` of the tokens fall (their quantile)."""
    if not 0.0 < hard_example_ratio < 1.0:
        raise ValueError(f"hard_example_ratio={hard_example_ratio} is outside (0, 1)")
    ordered = confidence.flatten().sort().values
    return ordered[min(int(hard_example_ratio * ordered.numel()), ordered.numel() - 1)].item()


def collect_hard_examples(
    model: DeepSupervisionTransformer, batches: Batches, threshold: float, device: str | torch.device = "cpu"
) -> HardExamples:
    """Every sequence of ``batches`` with the mask of tokens whose confidence is below ``threshold``."""
    inputs, targets, confidence = _token_confidence(model, batches, torch.device(device))
    return HardExamples(inputs, targets, confidence < threshold)


def extend_model(model: DeepSupervisionTransformer, phase2_layers: int) -> DeepSupervisionTransformer:
    """A ``phase2_layers`` model holding a copy of ``model``'s embedding, layers and head.

    The new layers start as near-identities, so the deeper model starts where the phase-1 model
    is: their residual branches' output projections (``attn.o_proj``, ``ffn.w2``) are zero, so a
    new post-norm block computes ``norm2(norm1(h))`` = ``h / rms(h) · g2`` with ``norm1`` at ones.
    ``h`` is the phase-1 output ``u · w`` (``u`` of unit RMS, ``w`` the last phase-1 norm gain),
    so a gain ``g2 = rms(w)`` gives back ``h`` up to the per-token factor ``rms(w) / rms(u · w)``,
    which is close to 1 and never changes a prediction. With fully random new layers the
    phase-2 model starts far worse than phase 1, and with unit gains the logits start rescaled
    by ``1 / rms(w)``; either way the original description's small phase-2 learning rate spends its epochs
    undoing the start. ``exit_layer`` is the last copied layer.
    """
    if phase2_layers <= model.num_layers:
        raise ValueError(f"phase2_layers={phase2_layers} must be greater than the model's {model.num_layers} layers")
    deeper = DeepSupervisionTransformer(
        model.vocab_size,
        model.dim,
        phase2_layers,
        model.num_heads,
        ffn_dim=model.layers[0].ffn.w1.out_features,
        max_seq_len=model.max_seq_len,
        exit_layer=model.num_layers,
    ).to(model.output_head.weight.device)
    deeper.embedding.load_state_dict(model.embedding.state_dict())
    deeper.output_head.load_state_dict(model.output_head.state_dict())
    for old, new in zip(model.layers, deeper.layers):
        new.load_state_dict(old.state_dict())
    gain = model.layers[-1].norm2.weight.detach().pow(2).mean().sqrt()  # rms(w)
    for block in deeper.layers[model.num_layers :]:
        nn.init.zeros_(block.attn.o_proj.weight)
        nn.init.zeros_(block.ffn.w2.weight)
        nn.init.ones_(block.norm1.weight)
        with torch.no_grad():
            block.norm2.weight.fill_(gain)
    return deeper


def freeze_lower_layers(
    model: DeepSupervisionTransformer, num_layers: int, embedding: bool = True, layers: bool = True, head: bool = False
) -> None:
    """Stop gradients to the embedding, the first ``num_layers`` layers and/or the shared head."""
    parts = ([model.embedding] if embedding else []) + (list(model.layers[:num_layers]) if layers else [])
    parts += [model.output_head] if head else []
    for part in parts:
        part.requires_grad_(False)


def evaluate_on_hard_examples(
    model: DeepSupervisionTransformer, examples: HardExamples, batch_size: int = 64, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Loss, perplexity and accuracy of the model's last layer on the hard tokens only."""
    config = create_standard_config(model.num_layers)
    stats = evaluate(model, examples.batches(batch_size), config, torch.device(device), IGNORE_INDEX)
    return {key: stats[key] for key in ("loss", "ppl", "acc", "tokens")}


def train_phase2(
    model: DeepSupervisionTransformer,
    train_examples: HardExamples,
    val_examples: HardExamples,
    config: ASHEMConfig,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train the phase-2 model's last layer loss on the hard tokens, with early stopping.

    The loss is masked to the hard tokens, while every sequence keeps its full context.
    """
    trainer = Trainer(create_standard_config(model.num_layers), model.vocab_size, device, IGNORE_INDEX, progress)
    optimizer = trainer.create_optimizer(model, config.phase2_lr)
    return trainer.train_with_early_stopping(
        model,
        train_examples.batches(batch_size, shuffle=True, seed=seed),
        val_examples.batches(batch_size),
        optimizer,
        max_epochs=config.phase2_max_epochs,
        patience=config.phase2_patience,
        verbose=verbose,
    )


@dataclasses.dataclass
class ASHEMResult:
    """Everything one ASHEM run measured; ``save_json`` writes it atomically."""

    config: dict[str, Any]
    setup: dict[str, Any]  # data and model sizes, device, seed
    phase1: dict[str, Any]  # val loss/ppl/acc, per_layer, history, epochs, seconds
    threshold: float
    hard_ratio_mined: float  # achieved on the tokens the threshold was mined from (setup["mined_from"])
    hard_ratio_val: float
    hard_before: dict[str, float]  # phase-1 model on the validation hard tokens
    hard_after: dict[str, float]  # phase-2 model on the same tokens
    phase2: dict[str, Any]  # full-depth val metrics, per_layer, history, epochs, seconds
    routing: dict[str, Any]  # two-stage routing on validation: ppl, acc, shallow_ratio, compute_cost
    confidence_histogram: dict[str, list[float]]  # phase-1 confidences the threshold came from
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, default=float).encode()

    def save_json(self, path: str | Path) -> None:
        """Write the result as JSON through a temporary file, so a failure never leaves half a file."""
        write_atomic(Path(path), self.to_json())

    @classmethod
    def load_json(cls, path: str | Path) -> ASHEMResult:
        return cls(**json.loads(Path(path).read_text()))


def _history(result: dict[str, Any], seconds: float) -> dict[str, Any]:
    keys = ("train_losses", "val_losses", "val_ppls", "val_accs", "best_epoch", "total_epochs", "stopped_early")
    return {key: result[key] for key in keys} | {"seconds": seconds}


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    # String layer keys, as JSON stores them, so a loaded result reads like a fresh one.
    per_layer = {str(layer): values for layer, values in stats["per_layer"].items()}
    return {key: stats[key] for key in ("loss", "ppl", "acc")} | {"per_layer": per_layer}


def run_ashem(
    config: ASHEMConfig,
    train_batches: TokenBatches,
    val_batches: TokenBatches,
    vocab_size: int,
    dim: int = 64,
    num_heads: int = 4,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    verbose: bool = True,
) -> ASHEMResult:
    """Run both phases and the evaluation.

    Args:
        config: the ASHEM settings (depths, learning rates, patience, freezing, protocol).
        train_batches: training ``(x, y)`` batches.
        val_batches: validation batches; every reported number is measured on them.
        vocab_size: vocabulary size.
        dim: model width.
        num_heads: attention heads.
        device: where to train.
        batch_size: batch size of the phase-2 data (default: ``train_batches.batch_size``).
        seed: seed of the initialisation and the shuffling.
        progress: tqdm bars.
        verbose: one line per epoch.
    """
    device = torch.device(device)
    batch_size = batch_size or train_batches.batch_size
    seq_len = train_batches.inputs.shape[1]
    torch.manual_seed(seed)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    model1 = DeepSupervisionTransformer(vocab_size, dim, config.phase1_layers, num_heads, max_seq_len=seq_len).to(device)
    trainer1 = Trainer(create_standard_config(config.phase1_layers), vocab_size, device, progress=progress)
    history1 = trainer1.train_with_early_stopping(
        model1,
        train_batches,
        val_batches,
        trainer1.create_optimizer(model1, config.phase1_lr),
        max_epochs=config.phase1_max_epochs,
        patience=config.phase1_patience,
        verbose=verbose,
    )
    seconds["phase1"] = time.perf_counter() - start
    phase1_stats = evaluate(model1, val_batches, trainer1.config, device)

    start = time.perf_counter()
    mine_from = val_batches if config.protocol == "original" else train_batches
    mined_conf = last_layer_confidence(model1, mine_from, device)
    threshold = compute_confidence_threshold(mined_conf, config.hard_example_ratio)
    train_hard = collect_hard_examples(model1, train_batches, threshold, device)
    val_hard = collect_hard_examples(model1, val_batches, threshold, device)
    seconds["mining"] = time.perf_counter() - start
    hard_ratio_val = val_hard.ratio
    if config.protocol == "original":
        # The seed trains and measures phase 2 on the validation hard tokens, one token at a time.
        train_hard = val_hard = val_hard.single_tokens()
    hard_before = evaluate_on_hard_examples(model1, val_hard, batch_size, device)

    start = time.perf_counter()
    model2 = extend_model(model1, config.phase2_layers)
    freeze_lower_layers(
        model2, config.phase1_layers, config.freeze_embedding, config.freeze_lower_layers, config.freeze_head
    )
    history2 = train_phase2(model2, train_hard, val_hard, config, batch_size, device, seed, progress, verbose)
    seconds["phase2"] = time.perf_counter() - start
    hard_after = evaluate_on_hard_examples(model2, val_hard, batch_size, device)

    start = time.perf_counter()
    phase2_stats = evaluate(model2, val_batches, create_standard_config(config.phase2_layers), device)
    routed = TrainingConfig(
        layer_weights={config.phase2_layers: 1.0}, routing_threshold=threshold, exit_layer=config.phase1_layers
    )
    routing = evaluate(model2, val_batches, routed, device)
    seconds["evaluation"] = time.perf_counter() - start

    counts, edges = torch.histogram(mined_conf.flatten().double(), bins=50, range=(0.0, 1.0))
    return ASHEMResult(
        config=dataclasses.asdict(config),
        setup={
            "vocab_size": vocab_size,
            "dim": dim,
            "num_heads": num_heads,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "train_sequences": train_batches.inputs.shape[0],
            "val_sequences": val_batches.inputs.shape[0],
            "mined_from": "validation" if config.protocol == "original" else "train",
            "device": str(device),
            "seed": seed,
        },
        phase1=_summary(phase1_stats) | _history(history1, seconds["phase1"]),
        threshold=threshold,
        hard_ratio_mined=(mined_conf < threshold).float().mean().item(),
        hard_ratio_val=hard_ratio_val,
        hard_before=hard_before,
        hard_after=hard_after,
        phase2=_summary(phase2_stats) | _history(history2, seconds["phase2"]),
        routing={key: routing[key] for key in ("loss", "ppl", "acc", "shallow_ratio", "compute_cost")},
        confidence_histogram={"counts": counts.tolist(), "edges": edges.tolist()},
        seconds=seconds,
    )
