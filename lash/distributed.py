"""Running under ``torchrun``: process group, data sharding, metric reduction, rank-0 output.

LASH uses PyTorch's own engine — ``DistributedDataParallel`` or FSDP2's ``fully_shard`` — and
adds only what a trainer needs around it: every rank sees the same global batch order and takes
its own rows of each global batch, so a run on N processes trains on exactly the batches of a
single-process run; evaluation sums are all-reduced; only rank 0 prints and writes.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``world_size`` 1 means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group ``torchrun`` set up (NCCL on CUDA, gloo on the CPU).

    Without torchrun's environment this is a single process and nothing is initialised. On CUDA
    each process takes the GPU of its local rank.

    Returns:
        The process's :class:`DistInfo` and the device it should use.
    """
    device = torch.device(device)
    if not launched_by_torchrun():
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined, after freeing what still uses it.

    FSDP2's and DDP's wrappers (their state, device mesh, DTensors and communication contexts)
    form reference cycles, so they outlive the function that trained with them; the garbage
    collector may reach them only during the interpreter's final teardown, after the group is
    gone, where destroying objects that hold gloo communication state can abort the process
    ("terminate called without an active exception", exit code -6) after the work is done.
    So: collect them first, then wait for every rank, then destroy the group.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class ShardedBatches:
    """This rank's rows of every global batch of ``batches``.

    The wrapped batches iterate in the same (seeded) order on every rank; rank r keeps rows
    r, r + world_size, … of each batch. The loss of each rank is scaled by the trainer so that
    the DDP gradient average equals the gradient of the global batch's mean loss, even when a
    batch does not split evenly.
    """

    def __init__(self, batches, info: DistInfo) -> None:
        self.batches, self.info = batches, info

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def epoch(self) -> int:
        return self.batches.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.batches.epoch = value

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for batch in self.batches:  # (x, y), or (x, y, w) with per-token loss weights
            yield tuple(t[self.info.rank :: self.info.world_size] for t in batch)
