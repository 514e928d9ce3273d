"""The trainer: LASH's three options applied to a plain loop of epochs.

``compute_loss`` turns ``layer_weights`` into the hidden states it needs and one call of
:func:`lash.losses.multi_exit_loss`; ``create_optimizer`` turns ``layer_lr_scales`` into AdamW
param groups; ``evaluate`` reports every exit and, with ``routing_threshold``, the early-exit mix.

Production options sit on the constructor: mixed precision, ``torch.compile``, gradient
accumulation, a warm-up + cosine schedule, checkpoints, and — under ``torchrun`` — DDP or
FSDP2 with sharded data and all-reduced metrics (see :mod:`lash.distributed`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lash import checkpoint, evaluation, parallel, threads
from lash.config import TrainingConfig
from lash.distributed import ShardedBatches, all_reduce_sum, init_distributed, launched_by_torchrun
from lash.early_stopping import EarlyStopping, load_progress, save_progress
from lash.evaluation import Batches
from lash.losses import multi_exit_loss
from lash.models import StandardTransformer
from lash.optim import create_optimizer
from lash.parallel import DISTRIBUTED, PRECISIONS
from lash.progress import log_progress
from lash.validation import check_device, check_int, check_optional_int, check_real, check_token_ids
from lash_kernels import check_token_weights, values_checked

# Steps between host syncs that check the loss is finite and refresh the progress bar: a sync
# every step would stall the GPU queue on small models.
_SYNC_EVERY = 25


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class _WeightedLoss(nn.Module):
    """The training loss as a module, so DDP/FSDP hooks and ``torch.compile`` see one forward."""

    def __init__(self, model: StandardTransformer, config: TrainingConfig, ignore_index: int) -> None:
        super().__init__()
        self.model, self.layers, self.ignore_index = model, config.active_layers, ignore_index
        self.weights = [config.weight(layer) for layer in self.layers]

    def forward(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        hiddens = self.model.hidden_states(x, self.layers)  # K × (B, T, D)
        return multi_exit_loss(hiddens, self.model.output_head.weight, y, self.weights, self.ignore_index, w)


def _check_options(config: TrainingConfig, vocab_size: int, precision: str, grad_accum_steps: int, warmup_steps: int,
                   total_steps: int | None, min_lr_ratio: float, distributed: str) -> None:  # fmt: skip
    """Check the :class:`Trainer`'s arguments, each error naming the argument, the value and the allowed range."""
    if not isinstance(config, TrainingConfig):
        raise ValueError(f"config must be a TrainingConfig, got {type(config).__name__}")
    check_int("vocab_size", vocab_size, 1)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    check_int("grad_accum_steps", grad_accum_steps, 1)
    check_int("warmup_steps", warmup_steps, 0)
    check_optional_int("total_steps", total_steps, 1)
    check_real("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
    if distributed not in DISTRIBUTED:
        raise ValueError(f"distributed={distributed!r} must be one of {', '.join(DISTRIBUTED)}")


def check_model(model: StandardTransformer, config: TrainingConfig, vocab_size: int, device: torch.device) -> None:
    """Check the model against the config, the vocabulary and the device before any work."""
    config.validate_for(model.num_layers)
    if model.vocab_size != vocab_size:
        raise ValueError(f"model vocab_size={model.vocab_size} but Trainer vocab_size={vocab_size}")
    param_device = next(model.parameters()).device
    same = param_device.type == device.type and (device.index is None or param_device.index == device.index)
    if not same:
        raise ValueError(f"model is on {param_device} but Trainer device is {device}; move one of them")


def check_finite(losses: list[torch.Tensor], checked: int, epoch: int) -> int:
    """Raise on the first non-finite loss after index ``checked``; return the new index."""
    if checked == len(losses):
        return checked
    recent = torch.stack(losses[checked:])
    finite = torch.isfinite(recent)
    if not bool(finite.all()):
        step = checked + int((~finite).nonzero()[0]) + 1
        raise NonFiniteLossError(f"training loss became {recent[step - checked - 1].item()} at epoch {epoch}, step {step}")
    return len(losses)


def _checked_batch(batch: tuple[torch.Tensor, ...], vocab_size: int, ignore_index: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(x, y)`` or ``(x, y, w)`` (``w``: per-token loss weights shaped like ``y``) checked, then moved to ``device``.

    Checked before the copy: a bad id or weight is a ValueError, never a device-side assert, and
    reading CPU tensors costs the device no sync (inside a compiled graph no check runs). The step
    then runs inside ``values_checked()``, so the model and the loss do not check them again (on
    a GPU that would be device work in every step).
    """
    if len(batch) not in (2, 3):
        raise ValueError(f"a training batch must be (x, y) or (x, y, w); got {len(batch)} tensors")
    x, y, *w = batch
    check_token_ids(x, vocab_size)
    check_token_ids(y, vocab_size, "target value", ignore_index)
    if w:
        check_token_weights(w[0], tuple(y.shape))
    return tuple(t.to(device, non_blocking=True) for t in batch)


def _nothing_to_learn(batch: tuple[torch.Tensor, ...], ignore_index: int) -> bool:
    """Whether a CPU batch has no labelled target of nonzero weight, so its loss is 0 and a step
    on it would only decay the weights. Batches already on a device are kept: reading them would sync."""
    if len(batch) not in (2, 3) or any(t.device.type != "cpu" for t in batch[1:]):
        return False  # a malformed batch is left to _checked_batch
    y, labelled = batch[1], batch[1] != ignore_index
    if len(batch) == 3 and batch[2].shape == y.shape:  # so is a misshapen w
        labelled &= batch[2] != 0
    return not bool(labelled.any())


def _optimizer_step(trainer: Trainer, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
    """One optimizer step of :meth:`Trainer.train_epoch`: unscale and clip, step, schedule, count."""
    if grad_clip:
        trainer.scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, grad_clip)
    trainer.scaler.step(optimizer)
    trainer.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if trainer.scheduler is not None and trainer.scheduler.optimizer is optimizer:
        trainer.scheduler.step()
    trainer.global_step += 1


def _close_epoch(trainer: Trainer, losses: list[torch.Tensor], checked: int, epoch: int, completed: bool, resumed_at: int) -> float:
    """The end of :meth:`Trainer.train_epoch`: its mean loss, and the progress counters a resumed run needs.

    A completed epoch counts and clears the carried loss; one stopped part-way carries its
    sum and count into the next call. Returns NaN for a call that trained on nothing.
    """
    carried_sum, carried_count = trainer.partial_epoch_loss
    if not losses and not (completed and carried_count):
        if completed and resumed_at:  # resumed at the very end (a converted v1 checkpoint of such a stop)
            trainer.epochs_trained, trainer.batches_into_epoch = trainer.epochs_trained + 1, 0
        if not completed or resumed_at:
            return math.nan
        raise ValueError("train_batches yielded no batch with a labelled target")
    check_finite(losses, checked, epoch)
    # fp64 sums of fp32 losses are exact, so an epoch split by a stop sums to the same value.
    total = torch.tensor(carried_sum, dtype=torch.float64, device=trainer.device)
    if losses:
        total = total + torch.stack(losses).double().sum()
    count = len(losses) + carried_count
    if completed:
        trainer.epochs_trained += 1
        trainer.batches_into_epoch = 0
        trainer.partial_epoch_loss = (0.0, 0)
    else:
        trainer.partial_epoch_loss = (total.item(), count)
    return (all_reduce_sum(total / count) / trainer.world_size).item()


def train_with_early_stopping(
    trainer: Trainer,
    model: StandardTransformer,
    train_batches: Batches,
    val_batches: Batches,
    optimizer: torch.optim.Optimizer,
    max_epochs: int = 100,
    patience: int = 1,
    min_delta: float = 0.0,
    grad_clip: float | None = 1.0,
    verbose: bool = True,
    checkpoint_path: str | Path | None = None,
    val_name: str = "val",
) -> dict[str, Any]:
    """Train until the validation loss has not improved for ``patience`` epochs.

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


class Trainer:
    """Trains and evaluates LASH models under a :class:`TrainingConfig`.

    Args:
        config: the three options.
        vocab_size: the model's vocabulary size (checked against the model).
        device: where batches are moved; the model must already live there (under torchrun on
            CUDA, ``trainer.device`` is this process's GPU).
        ignore_index: target id that carries no loss.
        progress: show a tqdm bar per epoch (rank 0 only).
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast and a grad scaler).
        compile: ``torch.compile`` the training step's forward and backward; ``None`` (default):
            on CUDA yes, elsewhere no (:func:`lash.parallel.compile_by_default`).
        grad_accum_steps: micro-batches per optimizer step.
        warmup_steps: linear learning-rate warm-up, in optimizer steps.
        total_steps: with it, cosine decay to ``min_lr_ratio`` at this step.
        min_lr_ratio: the cosine schedule's floor, as a fraction of each group's rate.
        distributed: ``"ddp"`` or ``"fsdp"`` (FSDP2 ``fully_shard``) when launched by torchrun.
        name: what progress bars and log lines call this training (``"phase 1"``: "phase 1 epoch 3").

    State, all public: the progress counters that checkpoints carry, the fp16 ``scaler``, and what
    the last :meth:`create_optimizer` made: ``model``, ``optimizer``, ``scheduler``, ``runner`` (the
    model's loss, wrapped for DDP/FSDP2, compiled once: :class:`lash.parallel.CompiledLoss`) and
    FSDP2's ``sharded_root``. ``save_checkpoint(path)``/``load_checkpoint(path)`` use that pair.
    """

    def __init__(
        self,
        config: TrainingConfig,
        vocab_size: int,
        device: str | torch.device = "cpu",
        ignore_index: int = -100,
        progress: bool = True,
        *,
        precision: str = "fp32",
        compile: bool | None = None,
        grad_accum_steps: int = 1,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        distributed: str = "ddp",
        name: str = "",
    ) -> None:
        _check_options(config, vocab_size, precision, grad_accum_steps, warmup_steps, total_steps, min_lr_ratio, distributed)
        self.config, self.vocab_size, self.ignore_index = config, vocab_size, ignore_index
        self.dist, self.device = init_distributed(device) if launched_by_torchrun() else (None, check_device("device", device))
        self.progress = progress and self.is_main
        self.compile = parallel.compile_by_default(self.device) if compile is None else compile
        self.precision, self.grad_accum_steps, self.name = precision, grad_accum_steps, name
        self.schedule, self.distributed = (warmup_steps, total_steps, min_lr_ratio), distributed
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.model: StandardTransformer | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.runner = self.sharded_root = None  # nn.Modules once made; the root is gathered for evaluation
        # Progress through the data, saved in checkpoints so a resumed run continues exactly.
        self.epochs_trained, self.global_step, self.batches_into_epoch = 0, 0, 0
        # Sum and count of the losses of an epoch stopped part-way, so its mean covers the whole epoch.
        self.partial_epoch_loss: tuple[float, int] = (0.0, 0)

    @property
    def is_main(self) -> bool:
        """Whether this process prints and writes (rank 0, or the only process)."""
        return self.dist is None or self.dist.is_main

    def epoch_label(self, epoch: int) -> str:
        """``"epoch 3"``, or ``"phase 1 epoch 3"`` for a trainer named ``"phase 1"``."""
        return f"{self.name} epoch {epoch}" if self.name else f"epoch {epoch}"

    @property
    def world_size(self) -> int:
        return 1 if self.dist is None else self.dist.world_size

    @property
    def is_sharded(self) -> bool:
        return self.world_size > 1 and self.distributed == "fsdp"

    def _autocast(self) -> contextlib.AbstractContextManager:
        return parallel.autocast(self.device, self.precision)

    def _shard(self, batches: Batches) -> Batches:
        return ShardedBatches(batches, self.dist) if self.world_size > 1 else batches

    def _wrap(self, model: StandardTransformer) -> tuple[nn.Module, nn.Module | None]:
        """The loss module for ``model``, wrapped in DDP/FSDP2 under torchrun, compiled on request; its FSDP2 root."""
        unused = self.config.output_layer < model.num_layers  # deeper layers never run
        loss = _WeightedLoss(model, self.config, self.ignore_index)
        return parallel.wrap(loss, model, self.device, self.world_size, self.distributed, unused, self.compile)

    def compute_loss(self, model: StandardTransformer, x: torch.Tensor, y: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_l w_l · CE(head(h_l), y) over the layers with a positive weight.

        Only the layers up to the deepest weighted one run, and the head meets only weighted
        layers: with the last layer alone weighted (the fast path) this is one head application
        on the final hidden state, exactly the loss of ``forward()``.

        Args:
            model: a LASH model.
            x: input ids ``(B, T)``.
            y: target ids ``(B, T)``.
            token_weights: optional per-token loss weights ``(B, T)`` ≥ 0: each CE is then their weighted mean.
        """
        check_model(model, self.config, self.vocab_size, self.device)
        w = None if token_weights is None else token_weights.to(self.device)
        with self._autocast():
            return _WeightedLoss(model, self.config, self.ignore_index)(x.to(self.device), y.to(self.device), w)

    def create_optimizer(self, model: StandardTransformer, base_lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
        """AdamW with one param group per layer at ``base_lr * layer_lr_scales[l]``.

        Groups are named ``layer_1`` … ``layer_L``; the embedding and the shared head (and any
        other parameter) form ``embedding_head`` at ``base_lr``. With ``warmup_steps`` or
        ``total_steps`` set, ``trainer.scheduler`` drives every group's rate per optimizer step.
        The model, optimizer, schedule and the model's wrapped loss are kept for
        :meth:`train_epoch` and the checkpoints.
        """
        check_model(model, self.config, self.vocab_size, self.device)
        # FSDP2 replaces the parameters: wrap before the optimizer sees them.
        self.runner, self.sharded_root = self._wrap(model)
        self.optimizer, self.scheduler = create_optimizer(model, self.config, base_lr, weight_decay, *self.schedule)
        self.model = model
        return self.optimizer

    def train_epoch(
        self,
        model: StandardTransformer,
        train_batches: Batches,
        optimizer: torch.optim.Optimizer,
        grad_clip: float | None = 1.0,
        max_steps: int | None = None,
    ) -> float:
        """One pass over ``train_batches`` (or until ``global_step`` reaches ``max_steps``).

        Returns the mean training loss of the epoch's batches, those before a stop (``max_steps``)
        or a resume included. Shuffled :class:`lash.data.TokenBatches` are served in the order of
        epoch ``epochs_trained`` (a function of their seed and that epoch alone), so a run restored
        from a checkpoint, mid-epoch or at an epoch's end, continues in the batches the
        uninterrupted run would have seen. A batch is ``(x, y)`` or ``(x, y, w)``, ``w`` the
        ``(B, T)`` per-token loss weights. A batch without any labelled target of nonzero weight
        is skipped: no step is taken on a loss of 0. (The check runs on CPU batches before they
        move; under torchrun it is left to each rank's share.)

        Args:
            grad_clip: clip the gradient norm to this (> 0); ``None`` or 0: no clipping.
            max_steps: stop when ``global_step`` reaches this (>= 1).

        Raises:
            NonFiniteLossError: a step's loss was NaN or infinite (named by epoch and step). The
                check runs every few steps, so the weights may already be damaged: reload them
                (``train_with_early_stopping`` restores its best weights itself).
        """
        if grad_clip is not None:
            check_real("grad_clip", grad_clip, 0.0)
        check_optional_int("max_steps", max_steps, 1)
        check_model(model, self.config, self.vocab_size, self.device)
        model.train()
        threads.refresh()  # under the CLI's --threads auto: the cores others left free
        epoch = self.epochs_trained + 1
        if hasattr(train_batches, "epoch"):
            train_batches.epoch = self.epochs_trained
        resumed_at = self.batches_into_epoch
        shard = self._shard(train_batches)
        batches = itertools.islice(shard, resumed_at, None)
        total = len(shard) - resumed_at if hasattr(shard, "__len__") else None  # tqdm's ETA
        runner = self.runner if model is self.model else self._wrap(model)[0]
        params = [p for p in model.parameters() if p.requires_grad]
        losses: list[torch.Tensor] = []
        checked, accumulated, completed = 0, 0, True
        bar = tqdm(batches, desc=self.epoch_label(epoch), total=total, disable=not self.progress, leave=False)
        for batch in bar:
            if max_steps is not None and self.global_step >= max_steps:
                completed = False
                break
            if self.world_size == 1 and _nothing_to_learn(batch, self.ignore_index):
                self.batches_into_epoch += 1  # deciding on the CPU costs no device sync
                continue
            x, y, *w = _checked_batch(batch, self.vocab_size, self.ignore_index, self.device)  # w: [] or [(B, T)]
            accumulated += 1
            sync = accumulated == self.grad_accum_steps
            no_sync = getattr(runner, "no_sync", None)
            with contextlib.nullcontext() if sync or no_sync is None else no_sync(), self._autocast(), values_checked():
                loss = parallel.scale_for_ranks(runner(x, y, *w), y, self.ignore_index, self.world_size, *w)
            self.scaler.scale(loss / self.grad_accum_steps).backward()
            losses.append(loss.detach())
            self.batches_into_epoch += 1
            if sync:
                _optimizer_step(self, params, optimizer, grad_clip)
                accumulated = 0
            if len(losses) % _SYNC_EVERY == 0:
                checked = check_finite(losses, checked, epoch)
                bar.set_postfix(loss=f"{torch.stack(losses[-_SYNC_EVERY:]).mean().item():.4f}")
        if accumulated:
            _optimizer_step(self, params, optimizer, grad_clip)
        return _close_epoch(self, losses, checked, epoch, completed, resumed_at)

    def evaluate(self, model: StandardTransformer, val_batches: Batches) -> dict[str, Any]:
        """:func:`lash.evaluation.evaluate` under this trainer's config, device, precision and sharding."""
        check_model(model, self.config, self.vocab_size, self.device)
        sharded = self.sharded_root if model is self.model else None
        if sharded is not None:
            sharded.unshard()  # evaluation bypasses the root's forward hooks, so gather explicitly
        try:
            return evaluation.evaluate(model, self._shard(val_batches), self.config, self.device, self.ignore_index, self.precision)
        finally:
            if sharded is not None:
                sharded.reshard()

    def epochs(
        self,
        model: StandardTransformer,
        train_batches: Batches,
        val_batches: Batches,
        optimizer: torch.optim.Optimizer,
        grad_clip: float | None = 1.0,
        max_epochs: int | None = None,
        max_steps: int | None = None,
    ) -> Iterator[tuple[float, dict[str, Any]]]:
        """The training loop: :meth:`train_epoch` then :meth:`evaluate`, yielding ``(train_loss, stats)``.

        Runs until ``epochs_trained`` reaches ``max_epochs`` or ``global_step`` reaches
        ``max_steps`` (counted from the start of the run, so a resumed run stops where the
        uninterrupted one would), or until the caller stops iterating. Early stopping and the
        CLI both drive this one loop.
        """
        while (max_epochs is None or self.epochs_trained < max_epochs) and (max_steps is None or self.global_step < max_steps):
            train_loss = self.train_epoch(model, train_batches, optimizer, grad_clip, max_steps)
            yield train_loss, self.evaluate(model, val_batches)

    # The free function below as the method: ``trainer.train_with_early_stopping(model, ...)``.
    train_with_early_stopping = train_with_early_stopping

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Save model, optimizer, scheduler, trainer state and RNG states atomically (rank 0 writes).

        The model and optimizer are the ones of the last :meth:`create_optimizer`. ``extra``
        holds anything else worth keeping (the CLI stores its arguments and history).
        """
        checkpoint.save_trainer(path, self, extra)

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Restore what :meth:`save_checkpoint` saved into the last :meth:`create_optimizer` pair.

        The file is read with ``torch.load(weights_only=True)``: it cannot run code (see
        :mod:`lash.checkpoint`). Everything is checked before anything changes: a corrupt,
        foreign or mismatched file, or one saved under another config, schedule, accumulation,
        precision or optimizer setting (learning rate, weight decay, ...), raises ``ValueError``
        naming the difference, and the model, optimizer and files are left untouched. Returns
        the checkpoint's ``extra``.
        """
        return checkpoint.load_trainer(path, self)
