"""CUDA graphs for training: a step's forward and backward replayed from one captured graph.

At the seed size (dim 64, 4 layers) a training step's forward and backward are about a hundred
small kernels, and on a GPU the host's launches, not the kernels' work, set the step's time.
:class:`StepGraphs`, the :class:`lash.trainer.Trainer`'s default on CUDA, captures the eager step
(the forward, the loss and the backward: the very kernels an eager step launches) once per batch
signature and then replays it, one launch for the lot. A capture costs two eager steps' work (a
warm-up on a side stream, in which cuBLAS picks its algorithms, then the capture) and no
compiling beyond Triton's own first compile of LASH's kernels, which runs before the warm-up for
all of them at once (:func:`lash_kernels.compile_ahead`), so even a short run earns it back.

A replay stands in for the eager step:

* the batch is copied into the graph's input buffers;
* the captured backward wrote the gradients into tensors of the graph's memory pool, and each
  replay writes them again: after a replay every parameter's ``.grad`` is set to its tensor (the
  optimizer step may set ``.grad`` back to None; the graph keeps the tensors, and its next replay
  overwrites them as an eager step would make fresh gradients);
* the loss is the graph's output buffer, copied out before the next replay overwrites it.

The optimizer step, gradient clipping and the learning-rate schedule stay eager (the fused AdamW
is a few launches for all the parameters), so a changing learning rate, an optimizer state loaded
from a checkpoint or any other optimizer work as they do without graphs. The graph reads the
parameters in place, so weights loaded between steps (``load_state_dict``) are the ones trained;
parameters that move or stop requiring gradients change the signature, and a new graph is made.

Graphs are kept for :data:`MAX_GRAPHS` signatures (a full batch and an epoch's ragged last
batch); a batch of any other signature runs eagerly. If a capture fails (a ``RuntimeError``: an
operation CUDA cannot capture, or no memory for the graph's pool), the reason is logged once and
the steps run eagerly from then on. The graph's pool keeps the step's activations between steps,
beside whatever evaluation allocates; ``compile=False`` trains eagerly, which frees them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from lash.cuda_graphs import cuda_graph
from lash_kernels import compile_ahead

MAX_GRAPHS = 2  # a full batch and an epoch's ragged last batch
log = logging.getLogger(__name__)
# Forward and backward of one batch already on the device; returns the detached loss.
ForwardBackward = Callable[[Sequence[torch.Tensor]], torch.Tensor]
Outputs = tuple[torch.Tensor, list[torch.Tensor | None]]  # the loss and each parameter's gradient
# As lash.cuda_graphs.cuda_graph: a body of no arguments and a memory pool give a replay.
Capture = Callable[[Callable[[], Outputs], object], Callable[[], Outputs]]


class _Graph(NamedTuple):
    inputs: tuple[torch.Tensor, ...]  # the batch's buffers: (x, y) or (x, y, w)
    replay: Callable[[], Outputs]


def _signature(batch: Sequence[torch.Tensor], params: Sequence[nn.Parameter]) -> tuple:
    """What a graph is captured for: the batch's shapes and dtypes, and the parameters that
    take gradients, by storage (a parameter moved or frozen is another signature)."""
    return tuple((t.shape, t.dtype) for t in batch), tuple(p.data_ptr() for p in params)


def _compile_kernels(body: Callable[[], Outputs]) -> None:
    """Compile the step's Triton kernels in parallel before its warm-up runs them one by one
    (:func:`lash_kernels.compile_ahead`). Only a saving: if it fails, the warm-up compiles them
    (and raises whatever is really wrong)."""
    try:
        compile_ahead(body)
    except Exception as error:  # noqa: BLE001 - the warm-up that follows compiles, or fails, on its own
        log.warning("compiling the training step's kernels ahead failed (%s: %s); they compile as the step "
                    "reaches them", type(error).__name__, error)  # fmt: skip


class StepGraphs:
    """A trainer's captured steps: :meth:`step` replays (or first captures) the graph of a batch's signature.

    Args:
        device: where the steps run.
        capture: turns a step's body into its replay; :func:`lash.cuda_graphs.cuda_graph` (tests
            pass a stand-in with a graph's semantics on the CPU).
    """

    def __init__(self, device: torch.device, capture: Capture = cuda_graph) -> None:
        self.device, self.capture = device, capture
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None  # shared: graphs never overlap
        self.failed: str | None = None  # why a capture failed; the steps then run eagerly
        self.capture_seconds: list[float] = []  # each capture's first step, warm-up and capture included

    def step(self, batch: Sequence[torch.Tensor], params: Sequence[nn.Parameter],
             forward_backward: ForwardBackward) -> torch.Tensor | None:  # fmt: skip
        """Forward and backward of ``batch`` (CPU or device tensors) through the graph of its
        signature, captured on first sight; the gradients land in ``params``' ``.grad``.
        Returns the detached loss, or None for a batch that no graph serves (the caller runs
        the eager step)."""
        key = _signature(batch, params)
        graph, started = self.graphs.get(key), None
        if graph is None:
            if self.failed is not None or len(self.graphs) >= MAX_GRAPHS:
                return None
            started = time.perf_counter()
            graph = self._capture(key, batch, params, forward_backward)
            if graph is None:
                return None
        else:
            for buffer, t in zip(graph.inputs, batch):
                buffer.copy_(t, non_blocking=True)
        loss, grads = graph.replay()
        for p, grad in zip(params, grads):
            p.grad = grad
        if started is not None:
            self._took(started, batch)
        return loss.clone()

    def _capture(self, key: tuple, batch: Sequence[torch.Tensor], params: Sequence[nn.Parameter],
                 forward_backward: ForwardBackward) -> _Graph | None:  # fmt: skip
        """Capture the step for ``key`` with ``batch`` in its input buffers; None, with the reason
        logged, if it cannot be captured."""
        inputs = tuple(t.to(self.device, copy=True) for t in batch)

        def body() -> Outputs:
            for p in params:  # the backward then makes each gradient afresh (in the graph's pool)
                p.grad = None
            loss = forward_backward(inputs)
            return loss, [p.grad for p in params]

        if self.device.type == "cuda":
            _compile_kernels(body)
        try:
            graph = _Graph(inputs, self.capture(body, self.pool))
        except RuntimeError as error:  # CUDA's capture errors, out of memory; a ValueError from the step stays one
            self.failed = f"{type(error).__name__}: {error}"
            for p in params:
                p.grad = None
            log.warning("CUDA graphs: the training step could not be captured (%s); training runs eagerly", self.failed)
            return None
        self.graphs[key] = graph
        return graph

    def _took(self, started: float, batch: Sequence[torch.Tensor]) -> None:
        """Log the seconds of a step that captured its graph: warm-up, capture and first replay."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.capture_seconds.append(time.perf_counter() - started)
        shape = " × ".join(map(str, batch[0].shape))
        log.info("CUDA graphs: the first training step took %.2f s, capturing included (batches of %s)",
                 self.capture_seconds[-1], shape)  # fmt: skip
