"""Early stopping: keep the best epoch's weights, stop after ``patience`` epochs without a better one.

One rule serves every loop that selects an epoch: :meth:`lash.trainer.Trainer.train_with_early_stopping`
(patience 1 by default, as in the seed) and both ASHEM phases. Its state, best weights included,
round-trips through :meth:`EarlyStopping.state_dict`, so a stopped run resumes with the same
decisions as one that never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
