"""What a :class:`lash.trainer.Trainer` owns and a checkpoint holds.

:class:`TrainerState` keeps the settings, the model and optimizer pair (from ``create_optimizer``),
the schedule, the fp16 scaler and the progress counters, and turns them into one plain
``state_dict()`` and back (``load_state_dict``, everything checked before anything changes).
:mod:`lash.checkpoint` writes and reads such dicts and knows nothing of the trainer; the loop
itself (steps, epochs, evaluation) is :class:`lash.trainer.Trainer`, built on this class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lash import checkpoint, parallel
from lash.config import TrainingConfig
from lash.distributed import all_reduce_sum, init_distributed, launched_by_torchrun
from lash.losses import multi_exit_loss
from lash.models import StandardTransformer
from lash.optim import create_optimizer
from lash.parallel import DISTRIBUTED, PRECISIONS
from lash.step_graphs import StepGraphs
from lash.validation import check_device, check_int, check_optional_int, check_real
from lash_kernels import IGNORE_INDEX



class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def check_options(config: TrainingConfig, vocab_size: int, ignore_index: int, precision: str, grad_accum_steps: int,
                  warmup_steps: int, total_steps: int | None, min_lr_ratio: float, distributed: str) -> None:  # fmt: skip
    """Check the :class:`Trainer`'s arguments, each error naming the argument, the value and the allowed range."""
    if not isinstance(config, TrainingConfig):
        raise ValueError(f"config must be a TrainingConfig, got {type(config).__name__}")
    check_int("vocab_size", vocab_size, 1)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index={ignore_index!r} must be an int (the target id that carries no loss)")
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


class WeightedLoss(nn.Module):
    """The training loss as a module, so DDP/FSDP hooks and ``torch.compile`` see one forward."""

    def __init__(self, model: StandardTransformer, config: TrainingConfig, ignore_index: int) -> None:
        super().__init__()
        self.model, self.layers, self.ignore_index = model, config.active_layers, ignore_index
        self.weights = [config.weight(layer) for layer in self.layers]

    def forward(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        hiddens = self.model.hidden_states(x, self.layers)  # K × (B, T, D)
        return multi_exit_loss(hiddens, self.model.output_head.weight, y, self.weights, self.ignore_index, w)


class TrainerState:
    """A trainer's settings, its model and optimizer pair, schedule, scaler and progress; see
    :class:`lash.trainer.Trainer` for the arguments."""

    def __init__(
        self,
        config: TrainingConfig,
        vocab_size: int,
        device: str | torch.device = "cpu",
        ignore_index: int = IGNORE_INDEX,
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
        model: StandardTransformer | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        check_options(config, vocab_size, ignore_index, precision, grad_accum_steps, warmup_steps, total_steps, min_lr_ratio,
                      distributed)  # fmt: skip
        self.config, self.vocab_size, self.ignore_index = config, vocab_size, ignore_index
        self.dist, self.device = init_distributed(device) if launched_by_torchrun() else (None, check_device("device", device))
        self.progress = progress and self.is_main
        self.fast_path = parallel.fast_path(self.device, compile, self.world_size, grad_accum_steps)
        self.compile = self.fast_path == "compile"
        self.precision, self.grad_accum_steps, self.name = precision, grad_accum_steps, name
        self.schedule, self.distributed = (warmup_steps, total_steps, min_lr_ratio), distributed
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.model: StandardTransformer | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.runner: nn.Module | None = None
        self.graphs: StepGraphs | None = None  # the runner's captured steps, on the "graphs" fast path
        self.sharded_root: nn.Module | None = None  # gathered for evaluation
        # Progress through the data, saved in checkpoints so a resumed run continues exactly.
        self.epochs_trained, self.global_step, self.batches_into_epoch = 0, 0, 0
        # Sum and count of the losses of an epoch stopped part-way, so its mean covers the whole epoch.
        self.partial_epoch_loss: tuple[float, int] = (0.0, 0)
        if model is not None:  # owned from the start; create_optimizer(model, lr) later does the same
            self.create_optimizer(model, lr, weight_decay)

    @property
    def is_main(self) -> bool:
        """Whether this process prints and writes (rank 0, or the only process)."""
        return self.dist is None or self.dist.is_main

    @property
    def world_size(self) -> int:
        return 1 if self.dist is None else self.dist.world_size

    @property
    def is_sharded(self) -> bool:
        return self.world_size > 1 and self.distributed == "fsdp"

    def epoch_label(self, epoch: int) -> str:
        """``"epoch 3"``, or ``"phase 1 epoch 3"`` for a trainer named ``"phase 1"``."""
        return f"{self.name} epoch {epoch}" if self.name else f"epoch {epoch}"

    def _wrap(self, model: StandardTransformer) -> tuple[nn.Module, nn.Module | None]:
        """The loss module for ``model``, wrapped in DDP/FSDP2 under torchrun, compiled on request; its FSDP2 root."""
        unused = self.config.output_layer < model.num_layers  # deeper layers never run
        loss = WeightedLoss(model, self.config, self.ignore_index)
        return parallel.wrap(loss, model, self.device, self.world_size, self.distributed, unused, self.compile)

    def create_optimizer(self, model: StandardTransformer, base_lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
        """AdamW with one param group per layer at ``base_lr * layer_lr_scales[l]``.

        Groups are named ``layer_1`` … ``layer_L``; the embedding and the shared head (and any
        other parameter) form ``embedding_head`` at ``base_lr``. With ``warmup_steps`` or
        ``total_steps`` set, ``trainer.scheduler`` drives every group's rate per optimizer step.
        The model, optimizer, schedule and the model's wrapped loss are kept for
        :meth:`~lash.trainer.Trainer.train_epoch` and the checkpoints.
        """
        check_model(model, self.config, self.vocab_size, self.device)
        # FSDP2 replaces the parameters: wrap before the optimizer sees them.
        self.runner, self.sharded_root = self._wrap(model)
        self.graphs = StepGraphs(self.device) if self.fast_path == "graphs" else None
        self.optimizer, self.scheduler = create_optimizer(model, self.config, base_lr, weight_decay, *self.schedule)
        self.model = model
        return self.optimizer

    def _pair(self, action: str) -> tuple[StandardTransformer, torch.optim.Optimizer]:
        if self.model is None or self.optimizer is None:
            raise ValueError(f"{action} needs a model and optimizer: call create_optimizer first")
        return self.model, self.optimizer

    def _settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the saved one."""
        warmup, total, floor = self.schedule
        return {"grad_accum_steps": self.grad_accum_steps, "warmup_steps": warmup, "total_steps": total,
                "min_lr_ratio": floor, "precision": self.precision}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, as plain values and tensors: the model and optimizer
        states (gathered in full under FSDP2; every process must call this), the progress
        counters, schedule, scaler, settings and the config."""
        model, optimizer = self._pair("state_dict")
        model_state, optim_state = parallel.full_states(model, optimizer, self.is_sharded)
        trainer = {
            "epochs_trained": self.epochs_trained,
            "global_step": self.global_step,
            "batches_into_epoch": self.batches_into_epoch,
            "partial_epoch_loss": list(self.partial_epoch_loss),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "settings": self._settings(),
        }
        return {"model": model_state, "optimizer": optim_state, "trainer": trainer, "config": self.config.as_dict()}

    def load_state_dict(self, state: Mapping[str, Any], source: str | Path = "the state dict") -> None:
        """Restore what :meth:`state_dict` returned. It is checked first against this trainer (model
        tensors, config, settings, optimizer groups, schedule; ``source`` names it in errors), so
        a refusal leaves everything as it was."""
        model, optimizer = self._pair("load_state_dict")
        missing = [key for key in ("model", "optimizer", "trainer", "config") if not isinstance(state.get(key), Mapping)]
        if missing:
            raise ValueError(f"{source} is no trainer state: it lacks {', '.join(missing)} (what state_dict() returns)")
        checkpoint.check_model_state(state["model"], model, source)
        checkpoint.check_resumable(state, source, self.config.as_dict(), self._settings(), optimizer, self.scheduler is not None)
        if not self.is_sharded:  # FSDP2 checks its full state itself as it shards it
            checkpoint.check_optimizer_state(state["optimizer"], optimizer, source)
        parallel.load_full_states(model, optimizer, state["model"], state["optimizer"], self.is_sharded)
        saved = state["trainer"]
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.epochs_trained, self.global_step = saved["epochs_trained"], saved["global_step"]
        self.batches_into_epoch, self.partial_epoch_loss = saved["batches_into_epoch"], tuple(saved["partial_epoch_loss"])

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Save :meth:`state_dict`, the RNG states and ``extra`` atomically (rank 0 writes).

        The model and optimizer are the ones of the last ``create_optimizer``. ``extra`` holds
        anything else worth keeping (the CLI stores its arguments and history).
        """
        checkpoint.save_run(path, self.state_dict() | {"extra": extra or {}}, write=self.is_main)

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Restore what :meth:`save_checkpoint` saved into the last ``create_optimizer`` pair.

        The file is read with ``torch.load(weights_only=True)``: it cannot run code (see
        :mod:`lash.checkpoint`). Everything is checked before anything changes: a corrupt,
        foreign or mismatched file, or one saved under another config, schedule, accumulation,
        precision or optimizer setting (learning rate, weight decay, ...), raises ``ValueError``
        naming the difference, and the model, optimizer and files are left untouched. Returns
        the checkpoint's ``extra``.
        """
        self._pair("load_checkpoint")
        payload = checkpoint.load(path)
        checkpoint.check_rng_state(payload["rng"], path)
        self.load_state_dict(payload, path)
        checkpoint.set_rng_state(payload["rng"])
        return payload["extra"]

    def _count_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After an optimizer step: the schedule's step (when it drives ``optimizer``) and the count."""
        if self.scheduler is not None and self.scheduler.optimizer is optimizer:
            self.scheduler.step()
        self.global_step += 1

    def _close_epoch(self, losses: list[torch.Tensor], checked: int, epoch: int, completed: bool, resumed_at: int) -> float:
        """The end of a ``train_epoch`` call: its mean loss, and the progress counters a resumed run needs.

        A completed epoch counts and clears the carried loss; one stopped part-way carries its
        sum and count into the next call. Returns NaN for a call that trained on nothing.
        """
        carried_sum, carried_count = self.partial_epoch_loss
        if not losses and not (completed and carried_count):
            if completed and resumed_at:  # resumed at the very end (a converted v1 checkpoint of such a stop)
                self.epochs_trained, self.batches_into_epoch = self.epochs_trained + 1, 0
            if not completed or resumed_at:
                return math.nan
            raise ValueError("train_batches yielded no batch with a labelled target")
        check_finite(losses, checked, epoch)
        # fp64 sums of fp32 losses are exact, so an epoch split by a stop sums to the same value.
        total = torch.tensor(carried_sum, dtype=torch.float64, device=self.device)
        if losses:
            total = total + torch.stack(losses).double().sum()
        count = len(losses) + carried_count
        if completed:
            self.epochs_trained, self.batches_into_epoch, self.partial_epoch_loss = self.epochs_trained + 1, 0, (0.0, 0)
        else:
            self.partial_epoch_loss = (total.item(), count)
        return (all_reduce_sum(total / count) / self.world_size).item()
