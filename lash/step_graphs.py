"""CUDA graphs for training: a step's forward and backward replayed from one captured graph.

At the seed size (dim 64, 4 layers) a training step's forward and backward are about a hundred
small kernels, and on a GPU the host's launches, not the kernels' work, set the step's time.
:class:`StepGraphs`, the :class:`lash.trainer.Trainer`'s default on CUDA, is a
:class:`lash.captured.GraphSet` of the eager step (the forward, the loss and the backward: the
very kernels an eager step launches), captured once per batch signature and then replayed, one
launch for the lot. A capture costs two eager steps' work and Triton's first compile of LASH's
kernels, all at once (:mod:`lash.captured`), so even a short run earns it back.

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
batch); a batch of any other signature runs eagerly, and so does every step after a capture
failed (the reason is logged once). The graph's pool keeps the step's activations between steps,
beside what evaluation's graphs keep (:mod:`lash.captured`); ``compile=False`` trains eagerly, which frees them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lash.captured import Capture, GraphSet, cuda_graph, signature

MAX_GRAPHS = 2  # a full batch and an epoch's ragged last batch
# Forward and backward of one batch already on the device; returns the detached loss.
ForwardBackward = Callable[[Sequence[torch.Tensor]], torch.Tensor]
Outputs = tuple[torch.Tensor, list[torch.Tensor | None]]  # the loss and each parameter's gradient


def _storage(params: Sequence[nn.Parameter]) -> tuple[int, ...]:
    """The parameters that take gradients, by storage: a parameter moved or frozen makes another graph."""
    return tuple(p.data_ptr() for p in params)


def _signature(batch: Sequence[torch.Tensor], params: Sequence[nn.Parameter]) -> tuple:
    """What a step's graph is captured for: the batch's shapes and dtypes, and the parameters' storage."""
    return signature(_storage(params), batch)


class StepGraphs(GraphSet[Outputs]):
    """A trainer's captured steps: :meth:`step` replays (or first captures) the graph of a batch's signature.

    Args:
        device: where the steps run.
        capture: turns a step's body into its replay; :func:`lash.captured.cuda_graph` (tests
            pass a stand-in with a graph's semantics on the CPU).
    """

    def __init__(self, device: torch.device, capture: Capture = cuda_graph) -> None:
        super().__init__(device, MAX_GRAPHS, "training step", capture)

    def step(self, batch: Sequence[torch.Tensor], params: Sequence[nn.Parameter],
             forward_backward: ForwardBackward) -> torch.Tensor | None:  # fmt: skip
        """Forward and backward of ``batch`` (CPU or device tensors) through the graph of its
        signature, captured on first sight; the gradients land in ``params``' ``.grad``.
        Returns the detached loss, or None for a batch that no graph serves (the caller runs
        the eager step)."""

        def body(inputs: tuple[torch.Tensor, ...]) -> Outputs:
            for p in params:  # the backward then makes each gradient afresh (in the graph's pool)
                p.grad = None
            loss = forward_backward(inputs)
            return loss, [p.grad for p in params]

        failed = self.failed
        out = self.run(_storage(params), batch, body)
        if out is None:
            if self.failed is not failed:  # this capture failed: drop what it left in .grad
                for p in params:
                    p.grad = None
            return None
        loss, grads = out
        for p, grad in zip(params, grads):
            p.grad = grad
        return loss.clone()
