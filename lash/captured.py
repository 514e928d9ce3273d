"""CUDA graphs of a function of a batch: captured once per batch signature, replayed after.

At the seed size (dim 64, 4 layers) a training step, an evaluation batch or a mining batch is a
few dozen to a hundred small kernels, and on a GPU the host's launches, not the kernels' work, set
its time. A :class:`GraphSet` captures such a function (its eager kernels, the very ones an eager
call launches) once per batch signature and replays it, one launch for the lot:

* the batch is copied into the graph's input buffers;
* the function's outputs are the graph's output buffers, which the next replay of any graph of
  the set overwrites: a caller reads (or copies) them before it runs the set again.

A capture costs two calls' work (a warm-up on a side stream, in which cuBLAS picks its
algorithms, then the capture) and no compiling beyond Triton's own first compile of LASH's
kernels, which runs before the warm-up for all of them at once (:func:`lash_kernels.compile_ahead`).
The graphs of a set share one memory pool: they never run at the same time. A set keeps graphs for
a few signatures (its ``limit``); a batch of any other signature runs eagerly, and so does every
batch after a capture failed (a ``RuntimeError``: an operation CUDA cannot capture, or no memory
for the pool; the reason is logged once). A ``ValueError`` from the function stays one.

Users: :class:`lash.step_graphs.StepGraphs` (the trainer's forward and backward), and
:func:`forward` (evaluation, :func:`lash.evaluation.evaluate`, and ASHEM's mining), whose graphs
each model keeps in a set of its own (:func:`model_graphs`) while its weights stay where they are
(:func:`lash.cuda_graphs.release` frees them, with decoding's).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Generic, NamedTuple, TypeVar

import torch

from lash.validation import check_bool
from lash_kernels import compile_ahead

log = logging.getLogger(__name__)
Out = TypeVar("Out")
# A capture turns a body of no arguments (it reads and writes fixed buffers) into a replay that
# runs the same work again and returns its outputs; the second argument is the set's memory pool.
Capture = Callable[[Callable[[], Out], object], Callable[[], Out]]
MAX_MODEL_GRAPHS = 8  # a model's evaluation and mining signatures: dev, validation, hard tokens, each full and ragged


def available(device: torch.device) -> bool:
    """Whether calls on ``device`` can be captured (CUDA only)."""
    return device.type == "cuda"


def wanted(graphs: bool | None, device: torch.device) -> bool:
    """Whether a call on ``device`` asks for graphs: ``graphs`` itself, or (``None``) wherever they
    can be captured; ``ValueError`` for a non-bool, or ``True`` off CUDA."""
    if graphs is None:
        return available(device)
    check_bool("cuda_graphs", graphs)
    if graphs and not available(device):
        raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device}")
    return graphs


@contextlib.contextmanager
def outside_inference_mode() -> Iterator[None]:
    """Gradients off and ``torch.inference_mode`` off: the buffers graphs keep are then plain
    tensors, which a later call may update in place whether or not it runs in inference mode
    (an inference tensor may only be updated inside it)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def cuda_graph(body: Callable[[], Out], pool: object) -> Callable[[], Out]:
    """Capture ``body`` as a CUDA graph after one warm-up run on a side stream (kernels compile,
    cuBLAS picks its algorithms, lazily made state such as an optimizer's is made). A decoding
    step's or an evaluation batch's warm-up writes what the first replay writes again: its writes
    depend only on its inputs (a training step's, :mod:`lash.step_graphs`, makes gradients its body
    drops before the capture). Graphs of one ``pool`` share memory: they never run at the same
    time, and a graph's outputs stay its own (they are alive while later graphs are captured)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = body()

    def replay() -> Out:
        graph.replay()
        return out

    return replay


class _Graph(NamedTuple):
    inputs: tuple[torch.Tensor, ...]  # the batch's buffers
    replay: Callable[[], object]


def _compile_kernels(body: Callable[[], object], what: str) -> None:
    """Compile the body's Triton kernels in parallel before its warm-up runs them one by one
    (:func:`lash_kernels.compile_ahead`). Only a saving: if it fails, the warm-up compiles them
    (and raises whatever is really wrong)."""
    try:
        compile_ahead(body)
    except ValueError:  # the body's own error (a bad batch): the caller's to see
        raise
    except Exception as error:  # noqa: BLE001 - the warm-up that follows compiles, or fails, on its own
        log.warning("compiling the %s's kernels ahead failed (%s: %s); they compile as the %s reaches them",
                    what, type(error).__name__, error, what)  # fmt: skip


def signature(key: Hashable, batch: Sequence[torch.Tensor]) -> tuple:
    """What a graph of a :class:`GraphSet` is captured for: the caller's key and the batch's shapes and dtypes."""
    return key, tuple((t.shape, t.dtype) for t in batch)


class GraphSet(Generic[Out]):
    """Graphs of one kind of call, one per batch signature and caller's key, at most ``limit`` of them.

    Args:
        device: where the calls run.
        limit: the signatures kept; calls of others run eagerly.
        what: the call's name in the log ("training step").
        capture: turns a call's body into its replay; :func:`cuda_graph` (tests pass a stand-in
            with a graph's semantics on the CPU).
    """

    def __init__(self, device: torch.device, limit: int, what: str, capture: Capture = cuda_graph) -> None:
        self.device, self.limit, self.what, self.capture = device, limit, what, capture
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None  # shared: graphs never overlap
        self.failed: str | None = None  # why a capture failed; the calls then run eagerly
        self.capture_seconds: list[float] = []  # each capture's first call, warm-up and capture included

    def run(self, key: Hashable, batch: Sequence[torch.Tensor], body: Callable[[tuple[torch.Tensor, ...]], Out],
            what: str | None = None) -> Out | None:  # fmt: skip
        """``body`` over ``batch`` (CPU or device tensors) moved to the device, through the graph of
        ``key`` and the batch's shapes and dtypes, captured on first sight (``what`` names the call
        in the log; default the set's). Returns the graph's outputs (overwritten by the set's next
        replay), or None for a call no graph serves (the caller runs it eagerly)."""
        key = signature(key, batch)
        graph, started = self.graphs.get(key), None
        if graph is None:
            if self.failed is not None or len(self.graphs) >= self.limit:
                return None
            started = time.perf_counter()
            graph = self._capture(key, batch, body, what or self.what)
            if graph is None:
                return None
        else:
            for buffer, t in zip(graph.inputs, batch):
                buffer.copy_(t, non_blocking=True)
        out = graph.replay()
        if started is not None:
            self._took(started, batch, what or self.what)
        return out

    def _capture(self, key: tuple, batch: Sequence[torch.Tensor], body: Callable[[tuple[torch.Tensor, ...]], Out],
                 what: str) -> _Graph | None:  # fmt: skip
        """Capture ``body`` for ``key`` with ``batch`` in its input buffers; None, with the reason
        logged, if it cannot be captured."""
        inputs = tuple(t.to(self.device, copy=True) for t in batch)

        def call() -> Out:
            return body(inputs)

        if self.device.type == "cuda":
            _compile_kernels(call, what)
        try:
            graph = _Graph(inputs, self.capture(call, self.pool))
        except RuntimeError as error:  # CUDA's capture errors, out of memory; a ValueError from the body stays one
            self.failed = f"{type(error).__name__}: {error}"
            log.warning("CUDA graphs: the %s could not be captured (%s); it runs eagerly", what, self.failed)
            return None
        self.graphs[key] = graph
        return graph

    def _took(self, started: float, batch: Sequence[torch.Tensor], what: str) -> None:
        """Log the seconds of a call that captured its graph: warm-up, capture and first replay."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.capture_seconds.append(time.perf_counter() - started)
        shape = " × ".join(map(str, batch[0].shape))
        log.info("CUDA graphs: the first %s took %.2f s, capturing included (batches of %s)",
                 what, self.capture_seconds[-1], shape)  # fmt: skip


class _Kept(NamedTuple):
    """A model's forward graphs, over its weights where they were when the first was captured."""

    weights: tuple  # the parameters' and buffers' addresses and dtypes
    graphs: GraphSet


_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → _Kept
CAPTURE: Capture = cuda_graph  # how :func:`forward` captures (tests set a stand-in)


def model_graphs(model: torch.nn.Module, graphs: bool, device: torch.device) -> GraphSet | None:
    """The set that keeps ``model``'s forward graphs, for one pass of :func:`forward` calls over its
    batches, or None without ``graphs``. Looked up once per pass (its weights stay where they are
    during one): a model's graphs are dropped, all of them, when its weights have moved or changed
    dtype since they were captured."""
    if not graphs:
        return None
    weights = tuple((t.data_ptr(), t.dtype) for t in itertools.chain(model.parameters(), model.buffers()))
    kept = _MODELS.get(model)
    if kept is None or kept.weights != weights:
        _MODELS.pop(model, None)  # the old graphs' pool goes before a new one fills
        kept = _MODELS[model] = _Kept(weights, GraphSet(device, MAX_MODEL_GRAPHS, "forward", CAPTURE))
    return kept.graphs


def forward(graphs: GraphSet | None, key: Hashable, what: str, batch: Sequence[torch.Tensor],
            body: Callable[[tuple[torch.Tensor, ...]], torch.Tensor], device: torch.device) -> torch.Tensor:  # fmt: skip
    """``body`` (a forward of a model without gradients, one output tensor) over ``batch`` moved to
    ``device``: replayed from the graph of ``key`` and the batch's signature in ``graphs`` (the
    model's, :func:`model_graphs`; read the result before the model's next graphed call), else
    eagerly."""
    if graphs is not None:
        with outside_inference_mode():  # a call in inference mode and one outside it share the buffers
            out = graphs.run(key, batch, body, what)
        if out is not None:
            return out
    return body(tuple(t.to(device) for t in batch))


def release(model: torch.nn.Module) -> None:
    """Free the forward graphs :func:`forward` keeps for ``model``."""
    _MODELS.pop(model, None)
