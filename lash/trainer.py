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
import functools
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lash import evaluation, parallel, threads
from lash.distributed import ShardedBatches
from lash.early_stopping import train_with_early_stopping
from lash.evaluation import Batches
from lash.models import StandardTransformer
from lash.trainer_state import NonFiniteLossError, TrainerState, WeightedLoss, check_finite, check_model
from lash.validation import check_batch_ids, check_optional_int, check_real
from lash_kernels import check_token_weights, values_checked

__all__ = ["NonFiniteLossError", "Trainer"]

# Steps between host syncs that check the loss is finite and refresh the progress bar: a sync
# every step would stall the GPU queue on small models.
_SYNC_EVERY = 25


def _check_batch(batch: tuple[torch.Tensor, ...], vocab_size: int, ignore_index: int) -> None:
    """Raise ``ValueError`` unless ``batch`` is ``(x, y)`` or ``(x, y, w)`` with ids in range
    and ``w`` per-token loss weights shaped like ``y``."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        count = f"{len(batch)} tensors" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
        raise ValueError(f"a training batch must be (x, y) or (x, y, w); got {count}")
    x, y, *w = batch
    check_batch_ids(x, y, vocab_size, ignore_index)
    if w:
        check_token_weights(w[0], tuple(y.shape))


def _to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """A batch already checked (:func:`_check_batch`) moved to ``device``.

    Checked before the copy: a bad id or weight is a ValueError, never a device-side assert, and
    reading CPU tensors costs the device no sync (inside a compiled graph no check runs). The step
    then runs inside ``values_checked()``, so the model and the loss do not check them again (on
    a GPU that would be device work in every step).
    """
    return tuple(t.to(device, non_blocking=True) for t in batch)


def _nothing_to_learn(batch: tuple[torch.Tensor, ...], ignore_index: int) -> bool:
    """Whether a CPU batch has no labelled target of nonzero weight, so its loss is 0 and a step
    on it would only decay the weights. Batches already on a device are kept: reading them would sync."""
    if len(batch) not in (2, 3) or any(t.device.type != "cpu" for t in batch[1:]):
        return False  # a malformed batch is left to _check_batch
    y, labelled = batch[1], batch[1] != ignore_index
    if len(batch) == 3 and batch[2].shape == y.shape:  # so is a misshapen w
        labelled &= batch[2] != 0
    return not bool(labelled.any())


class Trainer(TrainerState):
    """Trains and evaluates LASH models under a :class:`TrainingConfig`.

    Args:
        config: the three options.
        vocab_size: the model's vocabulary size (checked against the model).
        device: where batches are moved; the model must already live there (under torchrun on
            CUDA, ``trainer.device`` is this process's GPU).
        ignore_index: target id that carries no loss.
        progress: show a tqdm bar per epoch (rank 0 only).
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast and a grad scaler).
        compile: ``True``: ``torch.compile`` the training step's forward and backward; ``False``:
            run it eagerly; ``None`` (default): the fast path for the device and set-up
            (:func:`lash.parallel.fast_path`): on CUDA, one process and no accumulation, the
            eager step replayed from CUDA graphs (:mod:`lash.step_graphs`); elsewhere on CUDA
            compiled; on the CPU eager.
        grad_accum_steps: micro-batches per optimizer step.
        warmup_steps: linear learning-rate warm-up, in optimizer steps.
        total_steps: with it, cosine decay to ``min_lr_ratio`` at this step.
        min_lr_ratio: the cosine schedule's floor, as a fraction of each group's rate.
        distributed: ``"ddp"`` or ``"fsdp"`` (FSDP2 ``fully_shard``) when launched by torchrun.
        name: what progress bars and log lines call this training (``"phase 1"``: "phase 1 epoch 3").
        model: the model to train, owned from construction with its AdamW at ``lr`` and
            ``weight_decay`` (:meth:`create_optimizer`); ``None``: given later through
            ``create_optimizer(model, lr)``, the original API's call.

    State, all public and kept by :class:`lash.trainer_state.TrainerState`: the progress counters
    that checkpoints carry, the fp16 ``scaler``, and what the last :meth:`create_optimizer` made:
    ``model``, ``optimizer``, ``scheduler``, ``runner`` (the model's loss, wrapped for DDP/FSDP2,
    compiled once: :class:`lash.parallel.CompiledLoss`), ``graphs`` (the runner's captured steps,
    :class:`lash.step_graphs.StepGraphs`, on the "graphs" fast path) and FSDP2's ``sharded_root``.
    ``state_dict()`` / ``load_state_dict()`` and ``save_checkpoint(path)`` / ``load_checkpoint(path)``
    cover that pair and the counters.
    """

    def _autocast(self) -> contextlib.AbstractContextManager:
        return parallel.autocast(self.device, self.precision)

    def _shard(self, batches: Batches) -> Batches:
        return ShardedBatches(batches, self.dist) if self.world_size > 1 else batches

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
            return WeightedLoss(model, self.config, self.ignore_index)(x.to(self.device), y.to(self.device), w)

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
        prechecked = self._check_batches(train_batches)
        start = (self.epochs_trained, self.global_step, self.batches_into_epoch, self.partial_epoch_loss)
        try:
            return self._epoch(model, train_batches, optimizer, grad_clip, max_steps, prechecked)
        except ValueError:
            if self.global_step == start[1]:  # no step was taken: nothing was learnt, so nothing moved
                self.epochs_trained, _, self.batches_into_epoch, self.partial_epoch_loss = start
                optimizer.zero_grad(set_to_none=True)
            raise

    def _check_batches(self, train_batches: Batches) -> bool:
        """Before the first step: where the trainer stands must lie inside the epoch, and every
        remaining batch of a collection (not a one-pass iterator) is checked on the CPU, so a bad
        batch anywhere, or an epoch with nothing to learn, changes nothing. Returns whether every
        remaining batch was checked here (the steps then do not check them again)."""
        if not hasattr(train_batches, "__len__") or isinstance(train_batches, Iterator):
            return False
        size = len(self._shard(train_batches))
        if self.batches_into_epoch > size:
            raise ValueError(f"the trainer is {self.batches_into_epoch} batches into its epoch, but train_batches has "
                             f"{size}: resume with the batches the run was saved with")  # fmt: skip
        if self.world_size > 1:
            return False  # each rank checks its own share as it comes
        learnable = False
        for batch in self._batches(train_batches):
            if any(t.device.type != "cpu" for t in batch):
                return False  # batches already on a device are checked as they come: reading them would sync
            _check_batch(batch, self.vocab_size, self.ignore_index)
            learnable = learnable or not _nothing_to_learn(batch, self.ignore_index)
        if not learnable and not self.batches_into_epoch and not self.partial_epoch_loss[1]:
            raise ValueError("train_batches yielded no batch with a labelled target")
        return True

    def _epoch(self, model: StandardTransformer, train_batches: Batches, optimizer: torch.optim.Optimizer,
               grad_clip: float | None, max_steps: int | None, prechecked: bool) -> float:  # fmt: skip
        model.train()
        threads.refresh()  # under the CLI's --threads auto: the cores others left free
        epoch, resumed_at = self.epochs_trained + 1, self.batches_into_epoch
        runner = self.runner if model is self.model else self._wrap(model)[0]
        params = [p for p in model.parameters() if p.requires_grad]
        losses: list[torch.Tensor] = []
        checked, accumulated, completed = 0, 0, True
        bar = tqdm(self._batches(train_batches), desc=self.epoch_label(epoch), total=self._remaining(train_batches),
                   disable=not self.progress, leave=False)  # fmt: skip
        for batch in bar:
            if max_steps is not None and self.global_step >= max_steps:
                completed = False
                break
            if self.world_size == 1 and _nothing_to_learn(batch, self.ignore_index):
                self.batches_into_epoch += 1  # deciding on the CPU costs no device sync
                continue
            accumulated += 1
            losses.append(self.step(runner, batch, sync=accumulated == self.grad_accum_steps, checked=prechecked))
            if accumulated == self.grad_accum_steps:
                self.optimizer_step(params, optimizer, grad_clip)
                accumulated = 0
            if len(losses) % _SYNC_EVERY == 0:
                checked = check_finite(losses, checked, epoch)
                bar.set_postfix(loss=f"{torch.stack(losses[-_SYNC_EVERY:]).mean().item():.4f}")
        if accumulated:
            self.optimizer_step(params, optimizer, grad_clip)
        return self._close_epoch(losses, checked, epoch, completed, resumed_at)

    def _batches(self, train_batches: Batches) -> Iterator[tuple[torch.Tensor, ...]]:
        """The epoch's batches (this rank's share) from where it stopped, in the epoch's order."""
        if hasattr(train_batches, "epoch"):
            train_batches.epoch = self.epochs_trained
        return itertools.islice(self._shard(train_batches), self.batches_into_epoch, None)

    def _remaining(self, train_batches: Batches) -> int | None:
        shard = self._shard(train_batches)
        return len(shard) - self.batches_into_epoch if hasattr(shard, "__len__") else None  # tqdm's ETA

    def step(self, runner: nn.Module, batch: tuple[torch.Tensor, ...], sync: bool = True, checked: bool = False) -> torch.Tensor:
        """Forward and backward of one batch ``(x, y)`` or ``(x, y, w)``, checked on the CPU (unless
        ``checked``: the caller did) and moved to the device; returns the detached loss. The
        trainer's own runner on the "graphs" fast path replays the step's CUDA graph
        (:mod:`lash.step_graphs`). ``sync=False`` (a micro-batch before the last of an
        accumulation) skips DDP's gradient all-reduce."""
        if not checked:
            _check_batch(batch, self.vocab_size, self.ignore_index)
        forward_backward = functools.partial(self._forward_backward, runner, sync)
        loss = None
        if self.graphs is not None and runner is self.runner:
            loss = self.graphs.step(batch, [p for p in runner.parameters() if p.requires_grad], forward_backward)
        if loss is None:  # no graph, or none for this batch
            loss = forward_backward(_to_device(batch, self.device))
        self.batches_into_epoch += 1
        return loss

    def _forward_backward(self, runner: nn.Module, sync: bool, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """The step's device work on a batch already on the device: the loss and its backward."""
        x, y, *w = batch  # w: [] or [(B, T)]
        no_sync = getattr(runner, "no_sync", None)
        with contextlib.nullcontext() if sync or no_sync is None else no_sync(), self._autocast(), values_checked():
            loss = parallel.scale_for_ranks(runner(x, y, *w), y, self.ignore_index, self.world_size, *w)
        self.scaler.scale(loss / self.grad_accum_steps).backward()
        return loss.detach()

    def optimizer_step(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        """Unscale and clip the gradients, step, zero them, advance the schedule and the count."""
        if grad_clip:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self._count_step(optimizer)

    def evaluate(self, model: StandardTransformer, val_batches: Batches) -> dict[str, Any]:
        """:func:`lash.evaluation.evaluate` under this trainer's config, device, precision and sharding,
        replaying CUDA graphs on the "graphs" fast path."""
        check_model(model, self.config, self.vocab_size, self.device)
        sharded = self.sharded_root if model is self.model else None
        if sharded is not None:
            sharded.unshard()  # evaluation bypasses the root's forward hooks, so gather explicitly
        try:
            return evaluation.evaluate(model, self._shard(val_batches), self.config, self.device, self.ignore_index, self.precision,
                                       graphs=self.fast_path == "graphs")  # fmt: skip
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

    # Early stopping over :meth:`epochs` (lash.early_stopping), as the method the original API names.
    train_with_early_stopping = train_with_early_stopping
