"""CUDA graphs for decoding: each short step of the engine is one captured graph's replay.

A decoding step launches a dozen small kernels per layer; at batch 1 on a GPU their launch
overhead, not the bytes of the weights, sets the speed. :class:`GraphedParts` (LASH models) and
:class:`lash.hf.generation.GraphedHFParts` (Hugging Face models over a ``StaticCache``) replay one
CUDA graph for each :meth:`lash.decoding.Parts.step` of up to :data:`MAX_GRAPH_ROWS` tokens: a plain
or shallow step, a deep step with its pending tokens, a draft or verify step. The graph holds the
whole step: the embedding (a step that starts from ids), the layers, the head and its statistics
(argmax and confidence), so a generated token costs one replay and a few copies. LASH calls run
in row buckets of 1, 2, 4, 8 and 16 (padded rows repeat the last real one), so a deep step with
any number of pending tokens replays one of five graphs. Each graph is captured on first use
for its :class:`GraphKey` and kept in :class:`Graphs` with the cache and the buffers it reads and
writes, per model, batch and cache length (up to :data:`MAX_SHAPES` of those per model): a later
``generate`` call with the same ones captures nothing (its cache's length is rounded up,
:func:`cache_columns`, so calls of similar lengths count as the same; :func:`release` frees what
is kept).

A graph replays what it captured: every Python value and every tensor address is fixed then. So
everything that changes between replays is a device buffer the graph reads: the call's hidden
states or ids, positions and frozen flags are copied in, the first column it writes is a device scalar,
attention reads the cache through a mask the graph builds from the columns' validity (LASH
graphs read the columns written so far rounded up to a power of two, one graph per such reach;
a Hugging Face static cache is read whole), and
LASH's stacked q/k/v and gate/value weights are rewritten in place at each call
(:func:`lash.modules.inference_weights` with buffers), so a model trained between calls is
served with its new weights. Parameters that move (``model.to``) start a new set of graphs.
A step's results are the graph's output buffers, which its next replay overwrites (the engine
copies what it keeps). Longer calls (a long prompt's prefill) run eagerly over the same cache,
and so does the sampler when it samples (greedy decoding takes the graph's argmax).
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch

from lash import captured
from lash.captured import cuda_graph, outside_inference_mode
from lash.decoding import MAX_PENDING, DecodeState, Step, head_step
from lash.decoding_parts import LashParts, StaticCache
from lash.modules import inference_weights

if TYPE_CHECKING:
    from lash.models import DeepSupervisionTransformer

MAX_GRAPH_ROWS = MAX_PENDING + 1  # an early-exit deep step's rows at most
# A capture turns a function of no arguments (it reads and writes fixed buffers) into a replay
# that runs the same work again and returns its output; the second argument is the memory pool
# the graphs of one Graphs share (None off CUDA).
Capture = Callable[[Callable[[], Step], object], Callable[[], Step]]


class Inputs(NamedTuple):
    """A graph's input buffers for calls of ``n`` tokens."""

    h: torch.Tensor  # (B, n, D)
    ids: torch.Tensor  # (B, n)
    positions: torch.Tensor  # (B, n)
    frozen: torch.Tensor  # (B, 1) bool


class GraphKey(NamedTuple):
    """What one graph of a :class:`Graphs` is captured for."""

    layers: tuple[int, int]  # start, stop
    rows: int
    frozen: bool
    reach: int  # cache columns its attention reads
    embed: bool  # ids in, else hidden states
    heads: str  # the head on "none", the "last" token or "every" row


class GraphedLayers(Protocol):
    """What a graphed adapter gives :meth:`Graphs.step`: how it captures, its head, and its layers."""

    capture: Capture

    def head(self, h: torch.Tensor) -> torch.Tensor: ...

    def graph_layers(self, inputs: Inputs, layers: range, frozen: bool, reach: int, embed: bool) -> Callable[[], torch.Tensor]:
        """What a graph runs before the head: ``layers`` over ``inputs.ids`` embedded (``embed``) or
        ``inputs.h``, with ``inputs.frozen`` where ``frozen``, reading ``reach`` cache columns."""


class Graphs:
    """The graphs of one model, batch and cache length, with the cache they write and the buffers
    they read: each call's inputs, the columns' validity and the first column it writes."""

    def __init__(self, cache, batch: int, slots: int, dim: int, like: torch.Tensor) -> None:
        self.cache, self.slots = cache, slots
        self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=like.device)
        self.first = torch.zeros((), dtype=torch.long, device=like.device)
        self.count = torch.ones((), dtype=torch.long, device=like.device)  # the call's real rows
        self.steps = torch.arange(MAX_GRAPH_ROWS, device=like.device)
        self.inputs = {}
        for n in range(1, MAX_GRAPH_ROWS + 1):
            ids = self.valid.new_zeros(batch, n, dtype=torch.long)
            self.inputs[n] = Inputs(like.new_zeros(batch, n, dim), ids, ids.clone(), self.valid.new_zeros(batch, 1))
        self.replays: dict[GraphKey, Callable[[], Step]] = {}
        self.pool = torch.cuda.graph_pool_handle() if like.is_cuda else None

    def begin(self) -> None:
        """Before a call: no column is valid yet."""
        self.valid.zero_()

    def step(self, parts: GraphedLayers, x: torch.Tensor, start: int, positions: torch.Tensor, layers: range,
             state: DecodeState, frozen: torch.Tensor | None, heads: int, reach: int, rows: int) -> Step:  # fmt: skip
        """:meth:`lash.decoding.Parts.step` as one graph replay: copy the call's inputs in and
        replay its graph (embedding, layers, head and statistics), captured on first use.

        ``reach``: the cache columns its attention reads; ``rows`` (≥ the call's tokens): the rows
        the graph runs, whose inputs past the call's own are left as they are (the adapter's
        layers say what the padded rows do). One graph for each (layers, rows, frozen or not,
        reach, ids or states, head on none, the last or every token)."""
        n, inputs, embed = x.shape[1], self.inputs[rows], not x.is_floating_point()
        (inputs.ids if embed else inputs.h)[:, :n].copy_(x)
        inputs.positions[:, :n].copy_(positions)
        if frozen is not None:
            inputs.frozen.copy_(frozen)
        self.valid[:, : state.valid.shape[1]].copy_(state.valid)  # those past the call's stay invalid (begin)
        self.first.fill_(start)
        self.count.fill_(n)
        key = GraphKey((layers.start, layers.stop), rows, frozen is not None, reach, embed, ("none", "last", "every")[min(heads, 2)])
        replay = self.replays.get(key)
        if replay is None:
            run_layers = parts.graph_layers(inputs, layers, key.frozen, reach, embed)
            replay = self.replays[key] = parts.capture(self._with_head(run_layers, parts.head, key.heads), self.pool)
        return Step(*(None if t is None else t[:, :n] for t in replay()))  # the graph's buffers (Parts.step)

    def _with_head(self, run_layers: Callable[[], torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor],
                   heads: str) -> Callable[[], Step]:  # fmt: skip
        """A graph's whole body: the layers, then the head and its statistics on none, the call's
        last real token (``count - 1``) or every row; the states of every row, or else of that token."""

        def body() -> Step:
            h = run_layers()
            if heads == "every":
                return head_step(h, head(h))
            h = h.index_select(1, (self.count - 1).view(1))  # the call's last real token
            return head_step(h, head(h) if heads == "last" else None)

        return body


MAX_SHAPES = 4  # the (batch, cache length) pairs whose graphs a model keeps, the least recently used dropped first


class _Kept(NamedTuple):
    """A model's graphs, each for one batch and cache length, over the same weights."""

    weights: tuple  # the parameters' and buffers' addresses and types, and whether CUDA autocast was on
    shapes: dict  # (batch, columns) → Graphs, the least recently used first


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → _Kept
_STACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → its stacked weights' buffers


def cache_columns(slots: int) -> int:
    """The columns a graphed cache holds for a call that needs ``slots``: the next power of two (at
    least 64) up to 1024, then the next multiple of 1024, so that calls of similar lengths share
    one set of graphs and a long cache grows by at most a quarter. Those past the call's own are
    never valid; LASH graphs' attention stops at their reach, a static cache's reads all."""
    if slots > 1024:
        return -(-slots // 1024) * 1024
    return max(64, 1 << (slots - 1).bit_length())


def graphs_for(model: torch.nn.Module, batch: int, slots: int, new_cache: Callable[[int], object], dim: int) -> Graphs:
    """The model's graphs for this batch and a call that needs ``slots`` cache columns: those held
    for the batch and column bucket (:func:`cache_columns`), else new ones, over
    ``new_cache(columns)``. A model keeps them for up to :data:`MAX_SHAPES` batch and length pairs
    (the modes of one batch may differ in length: speculative decoding's holes take more
    columns), the least recently used dropped first, and drops them all once the weights'
    addresses or types change."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    columns = cache_columns(slots)
    weights = (tuple((t.data_ptr(), t.dtype) for t in tensors), torch.is_autocast_enabled("cuda"))
    kept = _GRAPHS.get(model)
    if kept is None or kept.weights != weights:
        _GRAPHS.pop(model, None)  # the old graphs and caches go before new ones are allocated
        kept = _GRAPHS[model] = _Kept(weights, {})
    held = kept.shapes.pop((batch, columns), None)
    if held is None:
        while len(kept.shapes) >= MAX_SHAPES:
            kept.shapes.pop(next(iter(kept.shapes)))
        held = Graphs(new_cache(columns), batch, columns, dim, tensors[0])
    kept.shapes[(batch, columns)] = held  # the most recently used last
    return held


def release(model: torch.nn.Module) -> None:
    """Free what graphed decoding keeps for ``model`` between calls: its graphs, their cache and
    buffers, and its stacked projection weights; and its evaluation and mining graphs
    (:func:`lash.captured.forward`). The next graphed call captures anew."""
    _GRAPHS.pop(model, None)
    _STACKED.pop(model, None)
    captured.release(model)


class GraphedParts(LashParts):
    """:class:`lash.decoding.Parts` of a LASH model whose short layer calls replay captured graphs.

    Args:
        model: a LASH model in eval mode, on CUDA.
    """

    capture: Capture = staticmethod(cuda_graph)  # how a layer call becomes a replay

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        with outside_inference_mode(), inference_weights(self.model, _STACKED.setdefault(self.model, {})):
            yield

    def new_cache(self, batch: int, slots: int) -> StaticCache:
        self.graphs = graphs_for(self.model, batch, slots, lambda columns: super(GraphedParts, self).new_cache(batch, columns),
                                 self.model.dim)  # fmt: skip
        self.graphs.begin()
        for buffer in self.graphs.cache:
            buffer.zero_()
        return self.graphs.cache

    def step(self, x: torch.Tensor, start: int, positions: torch.Tensor, layers: range, state: DecodeState,
             frozen: torch.Tensor | None = None, heads: int = 1) -> Step:  # fmt: skip
        n = x.shape[1]
        if n > MAX_GRAPH_ROWS:
            return super().step(x, start, positions, layers, state, frozen, heads)
        # Attention reads the columns written so far, rounded up (cache_columns): a call early in a
        # long cache does not read all of it, and a few graphs cover every length. Calls run in row
        # buckets of 1, 2, 4, 8 or 16, the padded rows repeating the last real one.
        reach = min(cache_columns(start + n), self.graphs.slots)
        rows = 1 << (n - 1).bit_length()
        return self.graphs.step(self, x, start, positions, layers, state, frozen, heads, reach, rows)

    def graph_layers(self, inputs: Inputs, layers: range, frozen: bool, reach: int, embed: bool) -> Callable[[], torch.Tensor]:
        graphs, layer_call = self.graphs, super().layers

        def run_layers() -> torch.Tensor:
            # A padded row repeats the last real row: it writes the same keys and values to the same
            # column, and its output is dropped.
            rows = torch.minimum(graphs.steps[: inputs.h.shape[1]], graphs.count - 1)  # (rows,)
            h = self.embed(inputs.ids.index_select(1, rows)) if embed else inputs.h.index_select(1, rows)
            return layer_call(h, graphs.first + rows, reach, inputs.positions.index_select(1, rows), layers, graphs.cache,
                              graphs.valid, inputs.frozen if frozen else None)  # fmt: skip

        return run_layers
