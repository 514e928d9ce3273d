"""Precision and parallelism: autocast, DDP / FSDP2 wrapping, ``torch.compile``, full state dicts.

Everything the :class:`lash.trainer.Trainer` does differently on several GPUs or at lower
precision lives here, so the training loop reads the same in every set-up. PyTorch's own DDP
and FSDP2 (``fully_shard``) do the work; see :mod:`lash.distributed` for the process group.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time

import torch
from torch import nn

from lash.distributed import all_reduce_sum
from lash.models import StandardTransformer

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DISTRIBUTED = ("ddp", "fsdp")
log = logging.getLogger(__name__)


def fast_path(device: torch.device, compile: bool | None, world_size: int, grad_accum_steps: int) -> str:
    """How a trainer runs its training step: ``"graphs"`` (the eager step replayed from CUDA
    graphs, :mod:`lash.step_graphs`), ``"compile"`` (``torch.compile``) or ``"eager"``.

    ``compile=True`` compiles and ``compile=False`` runs eagerly, on any device. By default
    (``None``) a small model's step on CUDA is bound by kernel launches, and a graph removes them
    at the cost of two steps' work, where compiling costs tens of seconds: graphs, wherever one
    process trains with one micro-batch per optimizer step. Several processes (DDP's and FSDP2's
    hooks) and gradient accumulation (gradients added up over micro-batches) compile instead. On
    the CPU the default is eager: a short run pays more to compile than it saves.
    """
    if compile is not None:
        return "compile" if compile else "eager"
    if device.type != "cuda":
        return "eager"
    if world_size == 1 and grad_accum_steps == 1:
        return "graphs"
    return "compile"


class _EndOfBackward(torch.autograd.Function):
    """The loss unchanged; when the backward reaches it, ``clock.stop`` is queued for the backward's end."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, clock: CompiledLoss) -> torch.Tensor:
        ctx.clock = clock
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        torch.autograd.Variable._execution_engine.queue_callback(ctx.clock.stop)
        return grad, None


class CompiledLoss(nn.Module):
    """The training loss under ``torch.compile`` (static shapes: a ragged last batch gets its own
    graph). The first step, forward and backward with their tracing and compiling, is timed and
    logged once; ``compile_seconds`` keeps it for end-to-end figures."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(loss, dynamic=False)
        self.no_sync = getattr(loss, "no_sync", None)  # DDP's, for gradient accumulation
        self.compile_seconds: float | None = None
        self._started: tuple[float, torch.device] | None = None

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.compile_seconds is not None or not torch.is_grad_enabled():
            return self.compiled(*args)
        self._started = (time.perf_counter(), args[0].device)
        return _EndOfBackward.apply(self.compiled(*args), self)

    def stop(self) -> None:
        if self.compile_seconds is None and self._started is not None:
            started, device = self._started
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.compile_seconds = time.perf_counter() - started
            log.info("torch.compile: the first training step took %.1f s, compiling included", self.compile_seconds)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision``'s dtype on ``device`` (no-op for fp32)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def wrap(
    loss: nn.Module,
    model: StandardTransformer,
    device: torch.device,
    world_size: int,
    distributed: str,
    find_unused: bool,
    compile: bool,
) -> tuple[nn.Module, nn.Module | None]:
    """The training-loss module ready to run: DDP or FSDP2 with several processes, compiled on request.

    Args:
        loss: the module computing the loss of ``model``.
        model: its model; FSDP2 shards each of its blocks.
        device: this process's device.
        world_size: the number of processes.
        distributed: ``"ddp"`` or ``"fsdp"``.
        find_unused: DDP must look for parameters without gradient (layers deeper than trained).
        compile: wrap the result in ``torch.compile``.

    Returns:
        The runner, and the FSDP2 root (``None`` otherwise), which evaluation gathers explicitly.
    """
    root = None
    if world_size > 1 and distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        loss = root = fully_shard(loss)
    elif world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        loss = nn.parallel.DistributedDataParallel(loss, device_ids=ids, find_unused_parameters=find_unused)
    return (CompiledLoss(loss) if compile else loss), root


def full_states(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """Model and optimizer state dicts; gathered in full (on the CPU) when FSDP2 shards them."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), optimizer.state_dict()


def load_full_states(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict, sharded: bool) -> None:
    """Load full state dicts (as :func:`full_states` gives) into a possibly sharded model and optimizer."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
            options=StateDictOptions(full_state_dict=True),
        )  # fmt: skip
    else:
        model.load_state_dict(model_state)
        # Optimizer.load_state_dict keeps tensors already on the right device and dtype as they
        # are: copied here, so a state dict taken from a live optimizer is not shared with it.
        optimizer.load_state_dict(copy.deepcopy(optim_state))


def scale_for_ranks(
    loss: torch.Tensor, y: torch.Tensor, ignore_index: int, world_size: int, w: torch.Tensor | None = None
) -> torch.Tensor:
    """Scale a rank's mean loss so DDP's gradient average is the global batch's mean.

    Rank r's loss is a mean over its n_r labelled tokens (with per-token weights ``w``, a
    weighted mean, and n_r the weight of its labelled tokens); multiplying by
    ``world_size · n_r / Σ n`` makes the average over ranks Σ (sum_r) / Σ n, exact even when
    a batch does not split evenly. The mean of the scaled losses over ranks is therefore the
    global batch's loss, which is what ``Trainer.train_epoch`` reports.
    """
    if world_size == 1:
        return loss
    labelled = y != ignore_index
    local = (labelled.sum() if w is None else torch.where(labelled, w, 0.0).sum()).float()
    total = all_reduce_sum(local.clone())
    # Counts are 0 or ≥ 1, weights any size ≥ 0: the clamp only turns 0 / 0 into 0.
    return loss * (world_size * local / total.clamp(min=torch.finfo(torch.float32).tiny))
