"""Early stopping: keep the best epoch's weights, stop after ``patience`` epochs without a better one.

One rule serves every loop that selects an epoch: :meth:`lash.trainer.Trainer.train_with_early_stopping`
(patience 1 by default, as in the original implementation) and both ASHEM phases. Its state, best weights included,
round-trips through :meth:`EarlyStopping.state_dict`, so a stopped run resumes with the same
decisions as one that never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lash.trainer_state import NonFiniteLossError
from lash.utils import log_progress
from lash.validation import check_int, check_real


class EarlyStopping:
    """Tracks the best epoch by a loss (lower is better) and when to stop.

    Args:
        patience: epochs without improvement after which :attr:`stop` is true (≥ 1).
        min_delta: an epoch improves when its loss is below the best by more than this (≥ 0).
    """

    def __init__(self, patience: int = 1, min_delta: float = 0.0) -> None:
        check_int("patience", patience, 1)
        check_real("min_delta", min_delta, 0.0)
        self.patience, self.min_delta = patience, min_delta
        self.best_loss, self.best_epoch, self.waited = math.inf, 0, 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, loss: float, model: nn.Module, candidate: bool = True) -> bool:
        """Record ``epoch``'s loss; keep a copy of ``model``'s weights when it is the best so far.

        An epoch that is not a ``candidate`` (it failed another condition) never counts as an
        improvement. Returns whether the epoch improved.
        """
        improved = candidate and loss < self.best_loss - self.min_delta
        if improved:
            self.best_loss, self.best_epoch, self.waited = loss, epoch, 0
            self.best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        else:
            self.waited += 1
        return improved

    @property
    def stop(self) -> bool:
        """Whether ``patience`` epochs have passed without improvement."""
        return self.waited >= self.patience

    def epochs(self, loop: Iterator[Any]) -> Iterator[Any]:
        """``loop``'s items until it ends or :attr:`stop` turns true; checked before each item is
        asked for, so no epoch runs after the one that stopped training."""
        while not self.stop:
            try:
                yield next(loop)
            except StopIteration:
                return

    def restore(self, model: nn.Module) -> None:
        """Load the best epoch's weights into ``model`` (nothing when no epoch was recorded)."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue, as tensors and plain values (safe to save and load)."""
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "waited": self.waited,
                "best_state": self.best_state}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss, self.best_epoch = float(state["best_loss"]), int(state["best_epoch"])
        self.waited, self.best_state = int(state["waited"]), state["best_state"]


def load_progress(trainer: Any, path: str | Path | None) -> dict[str, Any] | None:
    """The selection state saved by :func:`save_progress` at ``path``, after restoring the
    trainer's model, optimizer, RNG and counters from the same file; ``None`` when there is no
    such file (or no path), so the caller starts afresh."""
    if path is None or not Path(path).exists():
        return None
    saved = trainer.load_checkpoint(path).get("early_stopping")
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {path} holds no early-stopping state to continue from")
    return saved


def save_progress(trainer: Any, path: str | Path | None, stopper: EarlyStopping, result: dict[str, Any], **more: Any) -> None:
    """Checkpoint ``trainer`` (its model, optimizer, RNG, counters) with ``stopper``'s state,
    the history so far (``result``) and any ``more`` plain values; nothing without a path."""
    if path is not None:
        trainer.save_checkpoint(path, extra={"early_stopping": {"stopper": stopper.state_dict(), "result": result} | more})


def train_with_early_stopping(
    trainer: Any,
    model: nn.Module,
    train_batches: Iterable,
    val_batches: Iterable,
    optimizer: torch.optim.Optimizer,
    max_epochs: int = 100,
    patience: int = 1,
    min_delta: float = 0.0,
    grad_clip: float | None = 1.0,
    verbose: bool = True,
    checkpoint_path: str | Path | None = None,
    val_name: str = "val",
) -> dict[str, Any]:
    """Train until the validation loss has not improved for ``patience`` epochs
    (``Trainer.train_with_early_stopping``, whose ``self`` is ``trainer``).

    An epoch improves when its validation loss is below the best so far by more than
    ``min_delta`` (:class:`lash.early_stopping.EarlyStopping`). The best weights are restored at
    the end, and also when a non-finite loss stops training (the error is re-raised after the
    restore).

    Args:
        checkpoint_path: a file to save the run to after every epoch (model, optimizer, RNG,
            the early-stopping state and the history so far). If it exists when the call
            starts, training continues from it, with the same decisions and the same final
            result as a run that never stopped. ``model`` and ``optimizer`` must be the pair of
            the trainer's last :meth:`Trainer.create_optimizer`, which checkpoints hold.
        val_name: what the log lines call ``val_batches`` (ASHEM selects on a "dev" slice).

    Returns:
        ``train_losses``, ``val_losses``, ``val_ppls``, ``val_accs``, ``best_epoch``
        (1-based), ``best_val_loss``, ``total_epochs``, ``stopped_early`` and ``history``
        (the full :meth:`Trainer.evaluate` dict of every epoch).
    """
    check_int("max_epochs", max_epochs, 1)
    stopper = EarlyStopping(patience, min_delta)
    result: dict[str, Any] = {"train_losses": [], "val_losses": [], "val_ppls": [], "val_accs": [], "history": []}
    first_epoch = trainer.epochs_trained
    if checkpoint_path is not None and (model is not trainer.model or optimizer is not trainer.optimizer):
        raise ValueError("checkpoint_path needs the model and optimizer of the trainer's last create_optimizer")
    saved = load_progress(trainer, checkpoint_path)
    if saved is not None:
        stopper.load_state_dict(saved["stopper"])
        result, first_epoch = saved["result"], saved["first_epoch"]
        log_progress(f"resumed from {checkpoint_path} after epoch {len(result['train_losses'])}", verbose, trainer.is_main)
    epoch = len(result["train_losses"])
    loop = trainer.epochs(model, train_batches, val_batches, optimizer, grad_clip, first_epoch + max_epochs)
    clock = time.perf_counter()
    try:
        for train_loss, stats in stopper.epochs(loop):
            epoch += 1
            seconds, clock = time.perf_counter() - clock, time.perf_counter()
            for key, value in (("train_losses", train_loss), ("val_losses", stats["loss"]), ("val_ppls", stats["ppl"]),
                               ("val_accs", stats["acc"]), ("history", stats)):  # fmt: skip
                result[key].append(value)
            improved = stopper.update(epoch, stats["loss"], model)
            line = (
                f"{trainer.epoch_label(epoch)}: train loss {train_loss:.4f} | {val_name} loss {stats['loss']:.4f} "
                f"ppl {stats['ppl']:.2f} acc {stats['acc']:.4f} | {seconds:.1f} s" + ("  *best" if improved else "")
            )
            log_progress(line, verbose, trainer.is_main)
            save_progress(trainer, checkpoint_path, stopper, result, first_epoch=first_epoch)
            if stopper.stop:
                log_progress(f"{trainer.epoch_label(epoch)}: early stop; best epoch {stopper.best_epoch} "
                             f"({val_name} loss {stopper.best_loss:.4f})", verbose, trainer.is_main)  # fmt: skip
    except NonFiniteLossError:
        stopper.restore(model)
        raise
    stopper.restore(model)
    result.update(best_epoch=stopper.best_epoch, best_val_loss=stopper.best_loss, total_epochs=epoch,
                  stopped_early=stopper.stop)  # fmt: skip
    return result
