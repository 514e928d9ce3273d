"""Evaluation: loss, perplexity and accuracy of every exit, of the model's answer, and of routing.

One free function, :func:`evaluate`, that the :class:`lash.trainer.Trainer`, ASHEM and the CLI
all call. It runs the fused statistics of :func:`lash.losses.exit_statistics` (loss,
confidence and prediction per token and exit, no ``[tokens, vocab]`` logits) and applies the
routing rule of :mod:`lash.routing`. On CUDA each batch's forward and sums replay a CUDA graph by
default (:func:`lash.captured.forward`): at the seed size a batch is a few dozen small kernels,
whose launches, not their work, would set the time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from lash import captured
from lash.config import TrainingConfig
from lash.distributed import all_reduce_sum
from lash.losses import exit_statistics
from lash.models import StandardTransformer
from lash.parallel import autocast
from lash.routing import compute_cost
from lash.validation import check_batch_ids
from lash_kernels import IGNORE_INDEX, values_checked

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinite instead of overflowing."""
    return math.exp(loss) if loss < 700 else math.inf


@torch.no_grad()
def evaluate(
    model: StandardTransformer,
    batches: Batches,
    config: TrainingConfig,
    device: torch.device,
    ignore_index: int = IGNORE_INDEX,
    precision: str = "fp32",
    graphs: bool | None = None,
) -> dict[str, Any]:
    """Loss, perplexity and accuracy of the model's answer, of every exit, and of routing.

    The model answers from ``config.output_layer`` (the deepest weighted layer; the last layer
    in every preset). With routing on, a token whose confidence at ``exit_layer`` passes the
    threshold takes the exit layer's prediction instead. All layers still run: this is the
    original implementation's selection-based measure (README, "Compatibility"), with
    :func:`lash.routing.compute_cost` as its accounting.
    Sums are all-reduced, so under torchrun each rank passes its own share of the batches.

    Args:
        model: a LASH model on ``device``.
        batches: ``(x, y)`` pairs ``(B, T)``.
        config: the options (output layer, routing).
        device: where batches go.
        ignore_index: target value of tokens without a label.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast), as :mod:`lash.parallel`.
        graphs: replay each batch from a CUDA graph of its shape (:func:`lash.captured.forward`);
            default: on CUDA. ``True`` off CUDA is a ``ValueError``.

    Returns:
        ``loss``, ``ppl``, ``acc``, ``shallow_ratio``, ``compute_cost``, ``weighted_loss``
        (the training objective), ``tokens``, ``output_layer`` and ``per_layer``
        ({layer: {loss, ppl, acc}} for every layer).

    Raises:
        ValueError: no batch held a labelled token, or a batch holds an id outside the vocabulary.
    """
    config.validate_for(model.num_layers)
    kept = captured.model_graphs(model, captured.wanted(graphs, device), device)
    was_training = model.training
    model.eval()
    rule = config.exit_rule
    L, out, exit_ = model.num_layers, config.output_layer - 1, config.exit_layer - 1

    def batch_sums(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A batch's sums, ``(2L + 4,)`` in float64: per layer its tokens' loss, then their hits,
        then the routed loss and hits and the exited tokens (zeros without routing), then the
        labelled tokens."""
        x, y = batch[0], batch[1].reshape(-1)
        with autocast(device, precision), values_checked():
            stats = exit_statistics(model.hidden_states(x), model.output_head.weight, y, ignore_index)
        valid = stats.valid  # (N,)
        hit = (stats.predictions == y) & valid  # (L, N)
        sums = [(stats.token_loss * valid).sum(dim=1), hit.sum(dim=1)]
        if rule is None:
            sums.append(torch.zeros(3, device=device))
        else:
            exited = rule.exits(stats.confidence[exit_]) & valid  # (N,)
            routed_loss = torch.where(exited, stats.token_loss[exit_], stats.token_loss[out]).mul(valid).sum()
            sums += [routed_loss[None], torch.where(exited, hit[exit_], hit[out]).sum()[None], exited.sum()[None]]
        sums.append(valid.sum()[None])
        return torch.cat([s.double() for s in sums])

    total = torch.zeros(2 * L + 4, device=device, dtype=torch.float64)
    key = ("evaluate", rule, out, exit_, ignore_index, precision)
    for x, y in batches:
        check_batch_ids(x, y, model.vocab_size, ignore_index)  # here, so that a CPU batch's ids are read on the CPU
        total += captured.forward(kept, key, "evaluation batch", (x, y), batch_sums, device)
    model.train(was_training)
    sums = all_reduce_sum(total).tolist()
    per_loss, per_hits, (loss, hits, exited_tokens, n) = sums[:L], sums[L : 2 * L], sums[2 * L :]
    if n == 0:
        raise ValueError("val_batches held no token with a label")
    if not config.has_routing:  # the output layer answers every token
        loss, hits = per_loss[out], per_hits[out]
    per_layer = {
        layer: {"loss": per_loss[layer - 1] / n, "ppl": perplexity(per_loss[layer - 1] / n), "acc": per_hits[layer - 1] / n}
        for layer in range(1, L + 1)
    }
    shallow_ratio = exited_tokens / n
    return {
        "loss": loss / n,
        "ppl": perplexity(loss / n),
        "acc": hits / n,
        "shallow_ratio": shallow_ratio,
        "compute_cost": compute_cost(shallow_ratio, config.exit_layer, config.output_layer),
        "weighted_loss": sum(config.weight(layer) * per_loss[layer - 1] / n for layer in config.active_layers),
        "tokens": int(n),
        "output_layer": config.output_layer,
        "per_layer": per_layer,
    }
