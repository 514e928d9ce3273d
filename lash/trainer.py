"""The trainer: LASH's three options applied to a plain loop of epochs.

``compute_loss`` turns ``layer_weights`` into the hidden states it needs and one call of
:func:`lash.losses.multi_exit_loss`; ``create_optimizer`` turns ``layer_lr_scales`` into AdamW
param groups; ``evaluate`` reports every exit and, with ``routing_threshold``, the early-exit mix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lash.config import TrainingConfig
from lash.losses import exit_statistics, multi_exit_loss
from lash.models import StandardTransformer

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]

# Steps between host syncs that check the loss is finite and refresh the progress bar: a sync
# every step would stall the GPU queue on small models.
_SYNC_EVERY = 25


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinite instead of overflowing."""
    return math.exp(loss) if loss < 700 else math.inf


class Trainer:
    """Trains and evaluates LASH models under a :class:`TrainingConfig`.

    Args:
        config: the three options.
        vocab_size: the model's vocabulary size (checked against the model).
        device: where batches are moved; the model must already live there.
        ignore_index: target id that carries no loss.
        progress: show a tqdm bar per epoch.
    """

    def __init__(
        self,
        config: TrainingConfig,
        vocab_size: int,
        device: str | torch.device = "cpu",
        ignore_index: int = -100,
        progress: bool = True,
    ) -> None:
        if not isinstance(config, TrainingConfig):
            raise ValueError(f"config must be a TrainingConfig, got {type(config).__name__}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size!r} must be an int >= 1")
        self.config = config
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.ignore_index = ignore_index
        self.progress = progress
        self.epochs_trained = 0

    def _prepare(self, model: StandardTransformer) -> None:
        """Check the model against the config, the vocabulary and the device before any work."""
        self.config.validate_for(model.num_layers)
        if model.vocab_size != self.vocab_size:
            raise ValueError(f"model vocab_size={model.vocab_size} but Trainer vocab_size={self.vocab_size}")
        param_device = next(model.parameters()).device
        same = param_device.type == self.device.type and (
            self.device.index is None or param_device.index == self.device.index
        )
        if not same:
            raise ValueError(f"model is on {param_device} but Trainer device is {self.device}; move one of them")

    def compute_loss(self, model: StandardTransformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ_l w_l · CE(head(h_l), y) over the layers with a positive weight.

        Only the layers up to the deepest weighted one run, and the head meets only weighted
        layers: with the last layer alone weighted (the fast path) this is one head application
        on the final hidden state, exactly the loss of ``forward()``.

        Args:
            model: a LASH model.
            x: input ids ``(B, T)``.
            y: target ids ``(B, T)``.
        """
        self._prepare(model)
        layers = self.config.active_layers
        hiddens = model.hidden_states(x.to(self.device), layers)  # K × (B, T, D)
        weights = [self.config.weight(layer) for layer in layers]
        return multi_exit_loss(hiddens, model.output_head.weight, y.to(self.device), weights, self.ignore_index)

    def create_optimizer(self, model: StandardTransformer, base_lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
        """AdamW with one param group per layer at ``base_lr * layer_lr_scales[l]``.

        Groups are named ``layer_1`` … ``layer_L``; the embedding and the shared head (and any
        other parameter) form ``embedding_head`` at ``base_lr``.
        """
        if not (isinstance(base_lr, (int, float)) and math.isfinite(base_lr) and base_lr > 0):
            raise ValueError(f"base_lr={base_lr!r} must be a finite number > 0")
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay={weight_decay!r} must be a finite number >= 0")
        self.config.validate_for(model.num_layers)
        groups = []
        in_layers: set[int] = set()
        for layer, block in enumerate(model.layers, start=1):
            params = list(block.parameters())
            in_layers.update(id(p) for p in params)
            scale = self.config.lr_scale(layer)
            groups.append({"params": params, "lr": base_lr * scale, "lr_scale": scale, "name": f"layer_{layer}"})
        rest = [p for p in model.parameters() if id(p) not in in_layers]
        groups.append({"params": rest, "lr": base_lr, "lr_scale": 1.0, "name": "embedding_head"})
        return torch.optim.AdamW(groups, lr=base_lr, weight_decay=weight_decay)

    def train_epoch(
        self,
        model: StandardTransformer,
        train_batches: Batches,
        optimizer: torch.optim.Optimizer,
        grad_clip: float | None = 1.0,
    ) -> float:
        """One pass over ``train_batches``; returns the mean training loss.

        Raises:
            NonFiniteLossError: a step's loss was NaN or infinite (named by epoch and step). The
                check runs every few steps, so the weights may already be damaged: reload them
                (``train_with_early_stopping`` restores its best weights itself).
        """
        self._prepare(model)
        model.train()
        self.epochs_trained += 1
        epoch = self.epochs_trained
        params = [p for p in model.parameters() if p.requires_grad]
        losses: list[torch.Tensor] = []
        checked = 0
        bar = tqdm(train_batches, desc=f"epoch {epoch}", disable=not self.progress, leave=False)
        for step, (x, y) in enumerate(bar, start=1):
            loss = self.compute_loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            losses.append(loss.detach())
            if step % _SYNC_EVERY == 0:
                checked = self._check_finite(losses, checked, epoch)
                bar.set_postfix(loss=f"{torch.stack(losses[-_SYNC_EVERY:]).mean().item():.4f}")
        if not losses:
            raise ValueError("train_batches yielded no batch")
        self._check_finite(losses, checked, epoch)
        return torch.stack(losses).mean().item()

    @staticmethod
    def _check_finite(losses: list[torch.Tensor], checked: int, epoch: int) -> int:
        """Raise on the first non-finite loss after index ``checked``; return the new index."""
        recent = torch.stack(losses[checked:])
        finite = torch.isfinite(recent)
        if not bool(finite.all()):
            step = checked + int((~finite).nonzero()[0]) + 1
            raise NonFiniteLossError(f"training loss became {recent[step - checked - 1].item()} at epoch {epoch}, step {step}")
        return len(losses)

    @torch.no_grad()
    def evaluate(self, model: StandardTransformer, val_batches: Batches) -> dict[str, Any]:
        """Loss, perplexity and accuracy of the model's answer, of every exit, and of routing.

        The model answers from its output layer (the deepest weighted layer; the last layer in
        every preset). With routing on, a token whose confidence at ``exit_layer`` is at least
        ``routing_threshold`` takes the exit layer's prediction instead. All layers still run:
        this is the seed's selection-based measure, and ``compute_cost`` is its accounting,
        (shallow · exit_layer + deep · output_layer) / (tokens · output_layer).

        Returns:
            ``loss``, ``ppl``, ``acc``, ``shallow_ratio``, ``compute_cost``, ``weighted_loss``
            (the training objective), ``tokens``, ``output_layer`` and ``per_layer``
            ({layer: {loss, ppl, acc}} for every layer).
        """
        self._prepare(model)
        was_training = model.training
        model.eval()
        cfg, L = self.config, model.num_layers
        out, exit_ = cfg.output_layer - 1, cfg.exit_layer - 1
        loss_sum = torch.zeros(L, device=self.device, dtype=torch.float64)
        correct = torch.zeros(L, device=self.device, dtype=torch.float64)
        routed = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss, correct, shallow tokens
        tokens = torch.zeros((), device=self.device, dtype=torch.float64)
        for x, y in val_batches:
            y = y.to(self.device).reshape(-1)
            stats = exit_statistics(model.hidden_states(x.to(self.device)), model.output_head.weight, y, self.ignore_index)
            valid = stats.valid
            hit = (stats.predictions == y) & valid  # (L, N)
            loss_sum += (stats.token_loss * valid).sum(dim=1)
            correct += hit.sum(dim=1)
            tokens += valid.sum()
            if cfg.has_routing:
                exits = (stats.confidence[exit_] >= cfg.routing_threshold) & valid  # (N,)
                routed[0] += torch.where(exits, stats.token_loss[exit_], stats.token_loss[out]).mul(valid).sum()
                routed[1] += torch.where(exits, hit[exit_], hit[out]).sum()
                routed[2] += exits.sum()
        model.train(was_training)
        n = tokens.item()
        if n == 0:
            raise ValueError("val_batches held no token with a label")
        per_loss, per_acc = (loss_sum / n).tolist(), (correct / n).tolist()
        per_layer = {
            layer: {"loss": per_loss[layer - 1], "ppl": perplexity(per_loss[layer - 1]), "acc": per_acc[layer - 1]}
            for layer in range(1, L + 1)
        }
        if cfg.has_routing:
            loss, acc, shallow_ratio = (routed / n).tolist()
        else:
            loss, acc, shallow_ratio = per_loss[out], per_acc[out], 0.0
        compute_cost = (shallow_ratio * cfg.exit_layer + (1 - shallow_ratio) * cfg.output_layer) / cfg.output_layer
        return {
            "loss": loss,
            "ppl": perplexity(loss),
            "acc": acc,
            "shallow_ratio": shallow_ratio,
            "compute_cost": compute_cost,
            "weighted_loss": sum(cfg.weight(layer) * per_loss[layer - 1] for layer in cfg.active_layers),
            "tokens": int(n),
            "output_layer": cfg.output_layer,
            "per_layer": per_layer,
        }

    def train_with_early_stopping(
        self,
        model: StandardTransformer,
        train_batches: Batches,
        val_batches: Batches,
        optimizer: torch.optim.Optimizer,
        max_epochs: int = 100,
        patience: int = 1,
        min_delta: float = 0.0,
        grad_clip: float | None = 1.0,
        verbose: bool = True,
    ) -> dict[str, Any]:
        """Train until the validation loss has not improved for ``patience`` epochs.

        An epoch improves when its validation loss is below the best so far by more than
        ``min_delta``. The best weights are restored at the end, and also when a non-finite
        loss stops training (the error is re-raised after the restore).

        Returns:
            ``train_losses``, ``val_losses``, ``val_ppls``, ``val_accs``, ``best_epoch``
            (1-based), ``best_val_loss``, ``total_epochs``, ``stopped_early`` and ``history``
            (the full :meth:`evaluate` dict of every epoch).
        """
        if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
            raise ValueError(f"max_epochs={max_epochs!r} must be an int >= 1")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience={patience!r} must be an int >= 1")
        if not (isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta={min_delta!r} must be a finite number >= 0")
        result: dict[str, Any] = {"train_losses": [], "val_losses": [], "val_ppls": [], "val_accs": [], "history": []}
        best_loss, best_epoch, best_state, waited = math.inf, 0, None, 0
        stopped_early = False
        for epoch in range(1, max_epochs + 1):
            try:
                train_loss = self.train_epoch(model, train_batches, optimizer, grad_clip)
            except NonFiniteLossError:
                if best_state is not None:
                    model.load_state_dict(best_state)
                raise
            stats = self.evaluate(model, val_batches)
            result["train_losses"].append(train_loss)
            result["val_losses"].append(stats["loss"])
            result["val_ppls"].append(stats["ppl"])
            result["val_accs"].append(stats["acc"])
            result["history"].append(stats)
            improved = stats["loss"] < best_loss - min_delta
            if improved:
                best_loss, best_epoch, waited = stats["loss"], epoch, 0
                best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
            else:
                waited += 1
            if verbose:
                tqdm.write(
                    f"epoch {epoch}: train loss {train_loss:.4f} | val loss {stats['loss']:.4f} "
                    f"ppl {stats['ppl']:.2f} acc {stats['acc']:.4f}" + ("  *best" if improved else "")
                )
            if waited >= patience:
                stopped_early = True
                if verbose:
                    tqdm.write(f"early stop after epoch {epoch}: best epoch {best_epoch} (val loss {best_loss:.4f})")
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        result.update(best_epoch=best_epoch, best_val_loss=best_loss, total_epochs=epoch, stopped_early=stopped_early)
        return result
