"""ASHEM: Adaptive Supervision via Hard Example Mining, done on held-out data.

A dev slice (``dev_fraction`` of the training sequences) is set aside first. Phase 1 trains a
shallow model on the rest, early-stopped and selected on the dev slice. Its confidence (max
softmax probability) on every training token gives a threshold, the ``hard_example_ratio``
quantile; tokens below it are hard. Phase 2 copies the embedding, the phase-1 layers and the
shared head into a deeper model whose new layers start as identities, freezes what the config
says, and trains on full training sequences with the loss masked to the hard tokens (or
weighted towards them), so attention still sees the whole context. Its starting model is
epoch 0, a candidate like every trained epoch: the kept epoch is the best on the dev slice's
hard tokens among those whose dev two-stage routing loss is no worse than the start. At
inference a token the phase-1 layers are confident about exits there (two-stage routing); the
rest go deeper.

Everything reported is measured on the validation split, which nothing else looks at.
``protocol="original"`` instead repeats the original implementation's protocol in phase 2 (hard
tokens mined from the validation set, phase 2 trained, selected and measured on them as
single-token sequences) so its published table can be compared like for like.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lash import captured
from lash.checkpoint import rng_state, set_rng_state
from lash.config import ASHEMConfig, TrainingConfig, create_standard_config
from lash.data import TokenBatches
from lash.early_stopping import EarlyStopping, load_progress, save_progress
from lash.evaluation import evaluate
from lash.losses import exit_statistics
from lash.models import DeepSupervisionTransformer
from lash.parallel import fast_path
from lash.trainer import Trainer
from lash.utils import duration, log_progress
from lash.validation import check_batch_ids
from lash_kernels import IGNORE_INDEX, values_checked

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class HardExamples(NamedTuple):
    """Sequences with a per-token mask of the tokens called hard."""

    inputs: torch.Tensor  # (n, T) token ids
    targets: torch.Tensor  # (n, T) next-token ids
    hard: torch.Tensor  # (n, T) bool

    @property
    def ratio(self) -> float:
        """Fraction of tokens that are hard."""
        return self.hard.float().mean().item()

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, easy_weight: float = 0.0) -> TokenBatches:
        """Full sequences with the loss on the hard tokens.

        With ``easy_weight`` 0 the targets are ``IGNORE_INDEX`` except at hard tokens; otherwise
        every token keeps its target and the batches carry loss weights, 1 at hard tokens and
        ``easy_weight`` at the others.
        """
        if easy_weight == 0:
            return TokenBatches(self.inputs, self.targets.masked_fill(~self.hard, IGNORE_INDEX), batch_size, shuffle, seed)
        weights = torch.where(self.hard, 1.0, easy_weight)  # (n, T)
        return TokenBatches(self.inputs, self.targets, batch_size, shuffle, seed, weights)

    def single_tokens(self) -> HardExamples:
        """Each hard token alone as a length-1 sequence: the original implementation's phase-2 data (no context)."""
        x, y = self.inputs[self.hard][:, None], self.targets[self.hard][:, None]  # (m, 1)
        return HardExamples(x, y, torch.ones_like(x, dtype=torch.bool))


class ScoredTokens(NamedTuple):
    """Every token of some batches with the confidence of a model's output layer, ``(n, T)`` each."""

    inputs: torch.Tensor
    targets: torch.Tensor
    confidence: torch.Tensor

    def hard_examples(self, threshold: float) -> HardExamples:
        """The sequences with the mask of tokens whose confidence is below ``threshold``."""
        return HardExamples(self.inputs, self.targets, self.confidence < threshold)


@torch.no_grad()
def score_tokens(
    model: DeepSupervisionTransformer, batches: Batches, device: str | torch.device = "cpu", graphs: bool | None = None
) -> ScoredTokens:
    """The output layer's max softmax probability for every token of ``batches``, in their order.
    ``graphs``: replay each batch from a CUDA graph (:func:`lash.captured.forward`; default: on CUDA)."""
    device = torch.device(device)
    kept = captured.model_graphs(model, captured.wanted(graphs, device), device)
    model.eval()

    def confidence(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        with values_checked():
            h = model.hidden_states(x, [model.num_layers])
            return exit_statistics(h, model.output_head.weight, y).confidence[0].view_as(x)

    xs, ys, confs = [], [], []
    for x, y in batches:
        check_batch_ids(x, y, model.vocab_size, IGNORE_INDEX)
        confs.append(captured.forward(kept, "confidence", "mining batch", (x, y), confidence, device).clone())
        xs.append(x)
        ys.append(y)
    return ScoredTokens(torch.cat(xs), torch.cat(ys), torch.cat(confs).cpu())  # one copy back, not one per batch


def compute_confidence_threshold(confidence: torch.Tensor, hard_example_ratio: float) -> float:
    """The confidence below which ``hard_example_ratio`` of the tokens fall (their quantile)."""
    if not 0.0 < hard_example_ratio < 1.0:
        raise ValueError(f"hard_example_ratio={hard_example_ratio} is outside (0, 1)")
    ordered = confidence.flatten().sort().values
    return ordered[min(int(hard_example_ratio * ordered.numel()), ordered.numel() - 1)].item()


def extend_model(model: DeepSupervisionTransformer, phase2_layers: int) -> DeepSupervisionTransformer:
    """A ``phase2_layers`` model holding a copy of ``model``'s embedding, layers and head.

    The new layers start as identities, so the deeper model starts exactly where the phase-1
    model is (phase 2's epoch 0 is the phase-1 model). Their residual branches' output
    projections (``attn.o_proj``, ``ffn.w2``) are zero, so a new post-norm block computes
    ``norm2(norm1(h))``. The phase-1 output is ``h = u · w``, with ``u`` of unit RMS and ``w`` the
    last phase-1 norm gain. With ``norm1``'s gain ``1 / w``, ``norm1(h)`` is ``u`` times a
    per-token constant, which ``norm2`` removes; its gain ``w`` then gives back ``h`` (up to the
    norms' ``eps``; a gain entry of exactly 0 loses that coordinate's ``u``, and the start is
    then only close). ``exit_layer`` is the last copied layer.
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
    gain = model.layers[-1].norm2.weight.detach()  # w
    inverse = torch.where(gain == 0, 1.0, gain.reciprocal())
    with torch.no_grad():
        for block in deeper.layers[model.num_layers :]:
            block.attn.o_proj.weight.zero_()
            block.ffn.w2.weight.zero_()
            block.norm1.weight.copy_(inverse)
            block.norm2.weight.copy_(gain)
    return deeper


def freeze_lower_layers(
    model: DeepSupervisionTransformer, num_layers: int, embedding: bool = True, layers: bool = True, head: bool = False
) -> None:
    """Stop gradients to the embedding, the first ``num_layers`` layers and/or the shared head."""
    parts = ([model.embedding] if embedding else []) + (list(model.layers[:num_layers]) if layers else [])
    parts += [model.output_head] if head else []
    for part in parts:
        part.requires_grad_(False)


def evaluate_on_hard_examples(model: DeepSupervisionTransformer, examples: HardExamples, batch_size: int = 64,
                              device: str | torch.device = "cpu", graphs: bool | None = None) -> dict[str, float]:  # fmt: skip
    """Loss, perplexity and accuracy of the model's last layer on the hard tokens only (``graphs`` as :func:`evaluate`'s)."""
    config = create_standard_config(model.num_layers)
    stats = evaluate(model, examples.batches(batch_size), config, torch.device(device), IGNORE_INDEX, graphs=graphs)
    return {key: stats[key] for key in ("loss", "ppl", "acc", "tokens")}


def _phase2_config(model: DeepSupervisionTransformer, config: ASHEMConfig) -> TrainingConfig:
    """Loss on the last layer; the phase-1 layers at ``lower_lr_scale`` when they train."""
    scales = None if config.lower_lr_scale == 1.0 else {layer: config.lower_lr_scale for layer in range(1, config.phase1_layers + 1)}
    return create_standard_config(model.num_layers, layer_lr_scales=scales)


def train_phase2(
    model: DeepSupervisionTransformer,
    train_examples: HardExamples,
    dev_examples: HardExamples,
    config: ASHEMConfig,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    verbose: bool = True,
    routing: tuple[TokenBatches, float] | None = None,
    checkpoint_path: str | Path | None = None,
    compile: bool | None = None,
) -> dict[str, Any]:
    """Train the phase-2 model's last layer on the hard tokens; keep its best epoch on the dev slice.

    The loss is masked to the hard tokens (or, with ``phase2_easy_weight``, weighted towards
    them), while every sequence keeps its full context. The starting model is epoch 0 and a
    candidate like every trained epoch, so phase 2 never returns a model worse on the dev
    slice's hard tokens than where it started. With ``routing = (dev_batches, threshold)`` an
    epoch is a candidate only if its two-stage routing loss on those batches is no worse than
    epoch 0's, so the routed model never gets worse on the dev slice either. Training stops after
    ``phase2_patience`` epochs without a better candidate. With ``checkpoint_path`` every epoch
    is saved there, and a call that finds the file continues from it (same final result).
    ``compile`` is the :class:`Trainer`'s (default: its device's fast path).

    Returns:
        ``train_losses`` (epochs 1…E), ``dev_losses`` and ``dev_ppls`` (hard tokens) and, with
        ``routing``, ``dev_routing_losses`` (epochs 0…E), ``best_epoch`` (0: phase 2 did not
        help), ``total_epochs`` and ``stopped_early``.
    """
    device = torch.device(device)
    trainer = Trainer(_phase2_config(model, config), model.vocab_size, device, IGNORE_INDEX, progress, compile=compile,
                      name="phase 2")  # fmt: skip
    optimizer = trainer.create_optimizer(model, config.phase2_lr)
    graphs = trainer.fast_path == "graphs"  # evaluation takes the steps' path
    dev_batches = dev_examples.batches(batch_size)
    routed = None if routing is None else TrainingConfig(
        layer_weights={model.num_layers: 1.0}, routing_threshold=routing[1], exit_layer=config.phase1_layers
    )  # fmt: skip

    def routing_loss() -> float | None:
        return None if routed is None else evaluate(model, routing[0], routed, device, graphs=graphs)["loss"]

    stopper = EarlyStopping(config.phase2_patience)
    saved = load_progress(trainer, checkpoint_path)
    if saved is None:
        start = trainer.evaluate(model, dev_batches)
        result: dict[str, Any] = {"train_losses": [], "dev_losses": [start["loss"]], "dev_ppls": [start["ppl"]]}
        result["dev_routing_losses"] = [routing_loss()]
        stopper.update(0, start["loss"], model)
        routed_start = "" if routed is None else f" | dev routing loss {result['dev_routing_losses'][0]:.4f}"
        log_progress(f"phase 2 epoch 0 (start): dev hard loss {start['loss']:.4f} ppl {start['ppl']:.2f}{routed_start}", verbose)
    else:
        stopper.load_state_dict(saved["stopper"])
        result = saved["result"]
        log_progress(f"phase 2: resumed from {checkpoint_path} after epoch {len(result['train_losses'])}", verbose)
    train_batches = train_examples.batches(batch_size, shuffle=True, seed=seed, easy_weight=config.phase2_easy_weight)
    loop = trainer.epochs(model, train_batches, dev_batches, optimizer, max_epochs=config.phase2_max_epochs)
    epoch = first = len(result["train_losses"])
    clock = time.perf_counter()
    for train_loss, stats in stopper.epochs(loop):
        epoch += 1
        routed_loss = routing_loss()
        for key, value in (("train_losses", train_loss), ("dev_losses", stats["loss"]), ("dev_ppls", stats["ppl"]),
                           ("dev_routing_losses", routed_loss)):  # fmt: skip
            result[key].append(value)
        candidate = routed_loss is None or routed_loss <= result["dev_routing_losses"][0]
        improved = stopper.update(epoch, stats["loss"], model, candidate)
        save_progress(trainer, checkpoint_path, stopper, result)
        routed_text = "" if routed_loss is None else f" | dev routing loss {routed_loss:.4f}"
        seconds = (time.perf_counter() - clock) / (epoch - first)
        left = min(config.phase2_max_epochs - epoch, config.phase2_patience - stopper.waited)
        log_progress(
            f"phase 2 epoch {epoch}: train loss {train_loss:.4f} | dev hard loss {stats['loss']:.4f} ppl "
            f"{stats['ppl']:.2f}{routed_text} | {seconds:.1f} s/epoch, phase 2 ends within "
            f"{duration(seconds * left)} unless it improves" + ("  *best" if improved else ""),
            verbose,
        )
    stopper.restore(model)
    result.update(best_epoch=stopper.best_epoch, total_epochs=epoch, stopped_early=epoch < config.phase2_max_epochs)
    return result


@dataclasses.dataclass
class ASHEMResult:
    """Everything one ASHEM run measured (:mod:`lash.report` writes and reads a list of them)."""

    config: dict[str, Any]
    setup: dict[str, Any]  # data and model sizes (train, dev and val sequences), device, seed
    phase1: dict[str, Any]  # val loss/ppl/acc, per_layer; dev-slice history, kept epoch, seconds
    threshold: float
    hard_ratio_mined: float  # achieved on the tokens the threshold was mined from (setup["mined_from"])
    hard_ratio_val: float
    hard_before: dict[str, float]  # phase-1 model on the validation hard tokens
    hard_after: dict[str, float]  # phase-2 model on the same tokens
    phase2: dict[str, Any]  # full-depth val metrics, per_layer; dev history from epoch 0, kept epoch, seconds
    routing: dict[str, Any]  # two-stage routing on validation: ppl, acc, shallow_ratio, compute_cost
    confidence_histogram: dict[str, list[float]]  # phase-1 confidences the threshold came from
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _history(result: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Phase 1's early-stopping record, its validation losses named for what they are: the dev slice's."""
    renamed = {"dev_losses": result["val_losses"], "dev_ppls": result["val_ppls"], "train_losses": result["train_losses"]}
    keys = ("best_epoch", "total_epochs", "stopped_early")
    return renamed | {key: result[key] for key in keys} | {"seconds": seconds}


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    # String layer keys, as JSON stores them, so a loaded result reads like a fresh one.
    per_layer = {str(layer): values for layer, values in stats["per_layer"].items()}
    return {key: stats[key] for key in ("loss", "ppl", "acc")} | {"per_layer": per_layer}


@dataclasses.dataclass
class PhaseOne:
    """What phase 1 hands to phase 2: the kept model, its figures, and the random state at its end."""

    model: DeepSupervisionTransformer
    summary: dict[str, Any]  # ASHEMResult.phase1: val loss/ppl/acc, per_layer; dev history, kept epoch, seconds
    rng: dict[str, Any]  # lash.checkpoint.rng_state() when phase 1 ended: phase 2 continues from it


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def split_dev(config: ASHEMConfig, train_batches: TokenBatches, seed: int) -> tuple[TokenBatches, TokenBatches]:
    """``(train, dev)``: the training sequences less the dev slice (``config.dev_fraction``), and the slice."""
    return train_batches.split(config.dev_fraction, seed)


def run_phase1(
    config: ASHEMConfig,
    train_batches: TokenBatches,
    dev_batches: TokenBatches,
    val_batches: TokenBatches,
    vocab_size: int,
    dim: int = 64,
    num_heads: int = 4,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    verbose: bool = True,
    checkpoint_path: str | Path | None = None,
    compile: bool | None = None,
) -> PhaseOne:
    """Phase 1: a ``phase1_layers`` model trained with early stopping on the dev slice, measured on validation.

    With ``checkpoint_path`` every epoch is saved there, and a call that finds the file continues
    from it to the same result. ``train_batches`` and ``dev_batches`` come from :func:`split_dev`.
    ``compile`` is the :class:`Trainer`'s (default: its device's fast path).
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    start = time.perf_counter()
    log_progress(f"phase 1: {config.phase1_layers} layers, up to {_epochs(config.phase1_max_epochs)} (patience "
                 f"{config.phase1_patience}) on {train_batches.inputs.shape[0]} sequences; early stopping and "
                 f"selection on a dev slice of {dev_batches.inputs.shape[0]}", verbose)  # fmt: skip
    model = DeepSupervisionTransformer(vocab_size, dim, config.phase1_layers, num_heads, max_seq_len=train_batches.inputs.shape[1]).to(device)
    trainer = Trainer(create_standard_config(config.phase1_layers), vocab_size, device, progress=progress,
                      compile=compile, name="phase 1")  # fmt: skip
    history = trainer.train_with_early_stopping(
        model, train_batches, dev_batches, trainer.create_optimizer(model, config.phase1_lr),
        max_epochs=config.phase1_max_epochs, patience=config.phase1_patience, verbose=verbose,
        checkpoint_path=checkpoint_path, val_name="dev",
    )  # fmt: skip
    seconds = time.perf_counter() - start
    log_progress(f"phase 1 done: kept epoch {history['best_epoch']} of {history['total_epochs']}, {duration(seconds)}", verbose)
    stats = evaluate(model, val_batches, trainer.config, device, graphs=trainer.fast_path == "graphs")
    return PhaseOne(model, _summary(stats) | _history(history, seconds), rng_state())


def run_phase2(
    phase1: PhaseOne,
    config: ASHEMConfig,
    train_batches: TokenBatches,
    dev_batches: TokenBatches,
    val_batches: TokenBatches,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    verbose: bool = True,
    checkpoint_path: str | Path | None = None,
    compile: bool | None = None,
) -> tuple[ASHEMResult, DeepSupervisionTransformer]:
    """Mining, phase 2 and the evaluation, from where :func:`run_phase1` ended; returns the
    result and the phase-2 model. ``checkpoint_path`` and ``compile`` as in :func:`train_phase2`."""
    device = torch.device(device)
    graphs = fast_path(device, compile, 1, 1) == "graphs"  # mining and evaluation take the steps' path
    batch_size = batch_size or train_batches.batch_size
    set_rng_state(phase1.rng)
    model1, seconds = phase1.model, {"phase1": phase1.summary["seconds"]}
    start = time.perf_counter()
    # One confidence pass per split phase 2 needs; the threshold comes from the mined split's.
    original = config.protocol == "original"
    # Scored in stored order: the hard examples' order then never depends on phase 1's epoch count.
    splits = {"val": val_batches} if original else {"train": train_batches.in_order(), "dev": dev_batches, "val": val_batches}
    scored = {name: score_tokens(model1, batches, device, graphs) for name, batches in splits.items()}
    mined_conf = scored["val" if original else "train"].confidence
    threshold = compute_confidence_threshold(mined_conf, config.hard_example_ratio)
    hard = {name: tokens.hard_examples(threshold) for name, tokens in scored.items()}
    seconds["mining"] = time.perf_counter() - start
    if original:
        # The original protocol trains, selects and measures phase 2 on the validation hard tokens, one token at a time.
        train_hard = dev_hard = val_hard = hard["val"].single_tokens()
        routing_check = None
    else:
        train_hard, dev_hard, val_hard = hard["train"], hard["dev"], hard["val"]
        routing_check = (dev_batches, threshold)
    hard_before = evaluate_on_hard_examples(model1, val_hard, batch_size, device, graphs)

    start = time.perf_counter()
    selection = "the validation hard tokens (original protocol)" if original else "the dev slice"
    log_progress(f"phase 2: {config.phase2_layers} layers, up to {_epochs(config.phase2_max_epochs)} "
                 f"(patience {config.phase2_patience}) on {int(train_hard.hard.sum())} hard tokens; "
                 f"selection on {selection}", verbose)  # fmt: skip
    model2 = extend_model(model1, config.phase2_layers)
    freeze_lower_layers(
        model2, config.phase1_layers, config.freeze_embedding, config.freeze_lower_layers, config.freeze_head
    )
    history2 = train_phase2(
        model2, train_hard, dev_hard, config, batch_size, device, seed, progress, verbose, routing_check, checkpoint_path,
        compile,
    )  # fmt: skip
    seconds["phase2"] = time.perf_counter() - start
    log_progress(f"phase 2 done: kept epoch {history2['best_epoch']} of {history2['total_epochs']}"
                 f"{' (the starting model: phase 2 did not help)' if history2['best_epoch'] == 0 else ''}, "
                 f"{duration(seconds['phase2'])}", verbose)  # fmt: skip
    hard_after = evaluate_on_hard_examples(model2, val_hard, batch_size, device, graphs)

    start = time.perf_counter()
    phase2_stats = evaluate(model2, val_batches, create_standard_config(config.phase2_layers), device, graphs=graphs)
    routed = TrainingConfig(
        layer_weights={config.phase2_layers: 1.0}, routing_threshold=threshold, exit_layer=config.phase1_layers
    )
    routing = evaluate(model2, val_batches, routed, device, graphs=graphs)
    seconds["evaluation"] = time.perf_counter() - start

    counts, edges = torch.histogram(mined_conf.flatten().double(), bins=50, range=(0.0, 1.0))
    result = ASHEMResult(
        config=dataclasses.asdict(config),
        setup={
            "vocab_size": model1.vocab_size,
            "dim": model1.dim,
            "num_heads": model1.num_heads,
            "seq_len": train_batches.inputs.shape[1],
            "batch_size": batch_size,
            "train_sequences": train_batches.inputs.shape[0],
            "dev_sequences": dev_batches.inputs.shape[0],
            "val_sequences": val_batches.inputs.shape[0],
            "mined_from": "validation" if original else "train",
            "device": str(device),
            "seed": seed,
        },
        phase1=phase1.summary,
        threshold=threshold,
        hard_ratio_mined=(mined_conf < threshold).float().mean().item(),
        hard_ratio_val=hard["val"].ratio,
        hard_before=hard_before,
        hard_after=hard_after,
        phase2=_summary(phase2_stats) | history2 | {"seconds": seconds["phase2"]},
        routing={key: routing[key] for key in ("loss", "ppl", "acc", "shallow_ratio", "compute_cost")},
        confidence_histogram={"counts": counts.tolist(), "edges": edges.tolist()},
        seconds=seconds,
    )
    return result, model2


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
    compile: bool | None = None,
) -> ASHEMResult:
    """Run both phases and the evaluation (:func:`run_phase1`, then :func:`run_phase2`).

    ``config.dev_fraction`` of the training sequences become the dev slice: early stopping and
    model selection in both phases look at it alone, and the validation split is only measured
    for the report (except under ``protocol="original"``, whose phase 2 uses it as the
    original implementation did).

    Args:
        config: the ASHEM settings (depths, learning rates, patience, freezing, protocol).
        train_batches: training ``(x, y)`` batches (the dev slice is carved from them).
        val_batches: validation batches; every reported number is measured on them.
        vocab_size: vocabulary size.
        dim: model width.
        num_heads: attention heads.
        device: where to train.
        batch_size: batch size of the phase-2 data (default: ``train_batches.batch_size``).
        seed: seed of the dev slice, the initialisation and the shuffling.
        progress: tqdm bars.
        verbose: one line per epoch and per phase.
        compile: the :class:`Trainer`'s ``compile`` (``None``, the default: on CUDA the steps replay CUDA graphs).
    """
    train, dev = split_dev(config, train_batches, seed)
    phase1 = run_phase1(config, train, dev, val_batches, vocab_size, dim, num_heads, device, seed, progress, verbose,
                        compile=compile)  # fmt: skip
    return run_phase2(phase1, config, train, dev, val_batches, device, batch_size, seed, progress, verbose,
                      compile=compile)[0]  # fmt: skip
