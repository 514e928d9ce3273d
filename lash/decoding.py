"""One decoding engine for every model LASH serves: plain, early-exit and self-speculative decoding.

The engine holds the loops, the sampler (temperature, top-k, top-p), stopping (EOS, max tokens),
left padding and the stats, once. A model takes part through :class:`Parts`: a step runs
layers ``i..j`` over ids or hidden states at given slots and positions with a cache and gives
the shared head's logits, argmax and confidence at its last tokens (:class:`Step`; one CUDA graph
on a GPU); the cache can forget columns. :mod:`lash.generation` adapts LASH models,
:mod:`lash.hf.generation` Hugging Face causal LMs; both call :func:`decode`.

Modes:

* **plain** — every token runs every layer.
* **early exit** — a generated token whose confidence at ``exit_layer`` (max softmax probability
  of the head) reaches ``routing_threshold`` is emitted from the exit layer and runs no deeper
  layer then. Its deep keys and values are filled later (``deep_fill``):

  - ``"recompute"`` (default): its exit-layer state is kept, and the next step that goes deep
    runs the deep layers over every pending token plus its own, as extra rows of one call, so
    the deep caches hold exact deep states and the deep weights are read once for all rows
    (EE-LLM, Chen et al., 2023; FREE, Bae et al., 2023);
  - ``"propagate"``: its deep keys and values are projected from its exit state at once
    (CALM's state propagation, Schuster et al., 2022), so it never goes deep.

  The prompt is prefilled by every layer, not routed. With several rows, each row exits on its
  own confidence and a step goes deep when any row does not exit, carrying every row's pending
  tokens (under ``"propagate"``, an exited row keeps its exit state in that step's deep
  layers); ``exit_batching="batch"`` instead lets a step exit only when every row is confident, so
  that a step that goes deep answers every row from the last layer (same cost, never a worse
  answer). Pending tokens are filled at the latest every :data:`MAX_PENDING` tokens, so a deep
  call has at most ``MAX_PENDING + 1`` rows.
* **self-speculative** (LayerSkip, Elhoushi et al., 2024) — the first ``exit_layer`` layers and
  the head draft up to ``draft_tokens`` tokens one at a time; the deep layers verify them in one
  call over their exit-layer states; the longest agreeing prefix is kept, plus the full model's
  own next token. Sampling follows the speculative-sampling rule (Leviathan et al., 2023), so
  the output follows the full model's distribution; greedy output equals plain greedy output.
  Each row keeps its own prefix: a row that kept fewer drafts than another leaves its rejected
  ones as holes in the cache, which attention skips (where a sliding window counts cache
  columns, :attr:`Parts.holes` is false and the batch keeps the shortest prefix any row kept).

Host reads: the device decides everything it can; the host reads back at most one small tensor
per generated token (early exit: whether the step goes deep and which rows have stopped;
speculative: how many drafts were kept; plain: which rows have stopped, only with an EOS).

Stats (every mode, the same keys): ``shallow_ratio`` (generated tokens emitted from the exit
layer), ``compute_cost`` (:func:`lash.routing.compute_cost` of it, the nominal accounting),
``executed_layer_ratio`` (layer evaluations really run per generated token, deferred fills and
rejected drafts included, over ``num_layers``) and ``acceptance_rate`` (drafts kept over drafts
made). Counts are per row; the prompt's prefill is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from lash.losses import confidence
from lash.exit_rule import ExitRule
from lash.routing import compute_cost

MAX_PENDING = 15  # exited tokens an early-exit row may owe the deep layers before a step fills them
DEEP_FILLS = ("recompute", "propagate")
EXIT_BATCHING = ("row", "batch")


class Step(NamedTuple):
    """A layer call's result: the last layer's states, and the shared head's logits with their
    statistics at the tokens the call asked the head for (``None`` where it asked for none)."""

    h: torch.Tensor  # (B, max(m, 1), D) at the call's last tokens: those the head ran on (the last one when none)
    logits: torch.Tensor | None  # (B, m, V)
    top: torch.Tensor | None  # (B, m) the argmax: greedy's token
    confidence: torch.Tensor | None  # (B, m) fp32 max softmax probability: early exit's test


def head_step(h: torch.Tensor, logits: torch.Tensor | None) -> Step:
    """The :class:`Step` of states ``h`` whose last tokens gave ``logits`` (``None``: no head)."""
    if logits is None:
        return Step(h, None, None, None)
    return Step(h, logits, logits.argmax(-1), confidence(logits))


class Parts(Protocol):
    """What the engine needs of a model. Layers are 0-based here; slots are cache columns."""

    num_layers: int
    # Whether cache columns may be left invalid mid-row (speculative decoding's per-row holes):
    # attention must read columns by validity alone; a sliding window that counts columns may not.
    holes: bool

    def new_cache(self, batch: int, slots: int) -> Any:
        """An empty cache for ``batch`` rows and ``slots`` columns."""

    def step(self, x: torch.Tensor, start: int, positions: torch.Tensor, layers: range, state: DecodeState,
             frozen: torch.Tensor | None = None, heads: int = 1) -> Step:  # fmt: skip
        """Run ``layers`` over ``x``: ids ``(B, n)``, embedded first, or hidden states ``(B, n, D)``,
        at cache columns ``start..start+n-1`` and ``positions`` (B, n), writing their keys and
        values into ``state.cache``; queries read every valid column up to their own. Tokens where
        ``frozen`` (B, n) is set keep their input state after every layer, so each layer caches
        what it projects from that state (propagation). The head runs on the last ``heads``
        tokens: 0, 1 or ``n``; the states come back for those (the last token's when 0), so the
        last layer may skip everything but the keys and values of the others. The result may be
        memory the next step over the same ``layers`` reuses (a graph's output buffers): copy what
        must outlive that."""

    def fill(self, h: torch.Tensor, start: int, positions: torch.Tensor, layers: range, state: DecodeState) -> None:
        """Write the keys and values ``layers`` would have for the frozen states ``h`` (propagation)."""

    def keep(self, state: DecodeState, slots: int) -> None:
        """Forget every cache column from ``slots`` on (rejected drafts); static caches need nothing."""


class LayerParts:
    """A :class:`Parts` built from a model's embedding, layers and head, run one after another
    (the adapters' eager path; :mod:`lash.cuda_graphs` replays the same as one graph)."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, n)`` ids → ``(B, n, D)`` hidden states."""
        raise NotImplementedError

    def run(self, h: torch.Tensor, start: int, positions: torch.Tensor, layers: range, state: DecodeState,
            frozen: torch.Tensor | None = None, outputs: int | None = None) -> torch.Tensor:  # fmt: skip
        """:meth:`Parts.step`'s layers over hidden states: ``(B, n, D)`` → the last layer's states at
        the last ``outputs`` tokens ``(B, outputs, D)`` (every token's for ``None``)."""
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states ``(..., D)`` → ``(..., V)`` (any layer: the head is shared)."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, start: int, positions: torch.Tensor, layers: range, state: DecodeState,
             frozen: torch.Tensor | None = None, heads: int = 1) -> Step:  # fmt: skip
        h = self.run(x if x.is_floating_point() else self.embed(x), start, positions, layers, state, frozen, max(heads, 1))
        return head_step(h, self.head(h) if heads else None)


@dataclass
class DecodeState:
    """One call's device buffers: the cache and, per column, validity and position."""

    cache: Any
    valid: torch.Tensor  # (B, S) bool: the column holds a token (False: left padding)
    positions: torch.Tensor  # (B, S) int64 position of each column's token
    exit_states: torch.Tensor | None = None  # (B, S, D) exit-layer states (early exit's pending tokens)


@dataclass
class Sampler:
    """How a token is chosen from logits: greedy at temperature 0, else a seeded draw."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``(..., V)`` logits → the ``(..., V)`` fp32 distribution tokens are drawn from (sampling only)."""
        # Shift the maximum to 0 and keep it there: a temperature too small for fp32 (even one
        # that rounds to 0) then gives -inf for every other logit, never inf - inf or 0 / 0.
        shifted = logits.float() - logits.float().amax(-1, keepdim=True)  # (..., V), <= 0
        scaled = torch.where(shifted == 0, shifted, shifted / self.temperature)
        if self.top_k is not None:
            kth = scaled.topk(self.top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, -math.inf)
        probs = scaled.softmax(dim=-1)
        if self.top_p is not None:  # the smallest set of most likely tokens holding top_p of the mass
            ordered, order = probs.sort(dim=-1, descending=True)
            outside = ordered.cumsum(-1) - ordered >= self.top_p  # the most likely token always stays
            probs = probs.scatter(-1, order, ordered.masked_fill(outside, 0.0))
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of ``probs`` (B, V): ``(B,)``."""
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)

    def choose(self, logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """``(B,)`` tokens from ``(B, V)`` logits whose argmax is ``top`` (B,): greedy takes it."""
        if self.greedy:
            return top
        return self.draw(self.probabilities(logits))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Stop:
    """When rows stop: at ``max_new_tokens``, or at their first EOS (then padded with ``pad``)."""

    max_new_tokens: int
    eos: torch.Tensor | None = None  # (E,) token ids on the device
    pad: int = 0


class _Record:
    """Generated tokens, which rows have stopped, and the work done, counted per row."""

    def __init__(self, tokens: torch.Tensor, start: int, stop: Stop) -> None:
        self.tokens, self.start, self.length, self.stop = tokens, start, start, stop  # (B, S); columns filled
        self.generated = 0  # tokens every row has (the fewest any row has, when rows differ)
        self.done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)  # (B,) an EOS came
        # Summed over rows; device tensors where a step adds them, read once at the end.
        self.exited = self.layer_evals = self.drafted = self.accepted = 0

    def add(self, new: torch.Tensor) -> None:
        """Append ``(B,)`` or ``(B, m)`` tokens to every row (on the device: no host read)."""
        new = new.reshape(new.shape[0], -1)
        self.tokens[:, self.length : self.length + new.shape[1]] = new
        self.length += new.shape[1]
        self.generated += new.shape[1]
        if self.stop.eos is not None:
            self.done |= torch.isin(new, self.stop.eos).any(dim=1)

    @property
    def more(self) -> bool:
        """Whether to generate another token: not at ``max_new_tokens`` (no host read)."""
        return self.generated < self.stop.max_new_tokens

    def finish(self, valid: torch.Tensor) -> torch.Tensor:
        """The prompts and generated tokens, cut to ``max_new_tokens``; each row's tokens are the
        columns ``valid`` (B, S) keeps (speculative decoding leaves rejected drafts as holes).
        With an EOS, each row is padded after its first one and the output ends once every row
        has one, as ``generate`` does."""
        start, stop = self.start, self.stop
        holes = ~valid[:, start : self.length]
        order = torch.sort(holes.to(torch.uint8), dim=1, stable=True).indices  # each row's tokens first, in order
        new = self.tokens[:, start : self.length].gather(1, order)[:, : stop.max_new_tokens]
        out = torch.cat((self.tokens[:, :start], new), dim=1)
        if stop.eos is None:
            return out
        n = new.shape[1]
        first = torch.where(torch.isin(new, stop.eos), torch.arange(1, n + 1, device=out.device), n + 1).amin(dim=1)
        after = torch.arange(1, n + 1, device=out.device) > first.unsqueeze(1)  # (B, n)
        out = torch.cat((out[:, :start], new.masked_fill(after, stop.pad)), dim=1)
        return out[:, : start + min(int(first.max()), n)]

    def stats(self, num_layers: int, exit_layer: int | None) -> dict[str, float]:
        generated = min(self.generated, self.stop.max_new_tokens)
        shallow = int(self.exited) / (generated * self.tokens.shape[0]) if generated else 0.0
        drafted = int(self.drafted)
        return {
            "shallow_ratio": shallow,
            "compute_cost": compute_cost(shallow, exit_layer, num_layers) if exit_layer else 1.0,
            "executed_layer_ratio": self.layer_evals / (generated * num_layers) if generated else 0.0,
            "acceptance_rate": int(self.accepted) / drafted if drafted else 0.0,
        }


def _plain(parts: Parts, state: DecodeState, record: _Record, sampler: Sampler) -> None:
    every, col = range(parts.num_layers), record.start
    while record.more:
        if record.stop.eos is not None and bool(record.done.all()):  # the one host read, only with an EOS
            return
        s = parts.step(record.tokens[:, col : col + 1], col, state.positions[:, col : col + 1], every, state)
        record.add(sampler.choose(s.logits[:, -1], s.top[:, -1]))
        record.layer_evals += parts.num_layers
        col += 1


def _early_exit(
    parts: Parts, state: DecodeState, record: _Record, sampler: Sampler, rule: ExitRule, deep_fill: str,
    exit_batching: str,
) -> None:  # fmt: skip
    exit_layer = rule.exit_layer
    shallow, deep = range(exit_layer), range(exit_layer, parts.num_layers)
    col = filled = record.start  # filled: the deep caches hold every column before it
    while record.more:
        s = parts.step(record.tokens[:, col : col + 1], col, state.positions[:, col : col + 1], shallow, state)
        state.exit_states[:, col] = s.h[:, 0]
        logits, top = s.logits[:, 0], s.top[:, 0]  # (B, V), (B,)
        exited = rule.exits(s.confidence[:, 0])  # (B,)
        if exit_batching == "batch":
            exited = exited.all().expand_as(exited)
        # The one host read of the step: whether any row goes deep and, with an EOS, whether every row stopped.
        if record.stop.eos is None:
            goes_deep = not bool(exited.all())
        else:
            goes_deep, stopped = divmod(int(2 * (~exited).any() + record.done.all()), 2)
            if stopped:  # every row stopped at an earlier token
                return
        record.layer_evals += exit_layer
        if deep_fill == "propagate" and not goes_deep:
            parts.fill(s.h, col, state.positions[:, col : col + 1], deep, state)
            filled = col + 1
        elif goes_deep or col + 1 - filled > MAX_PENDING:
            n = col + 1 - filled
            block = state.exit_states[:, filled : col + 1]  # (B, n, D): the pending tokens and this one
            frozen = exited[:, None] if deep_fill == "propagate" else None  # exited rows keep their exit state
            d = parts.step(block, filled, state.positions[:, filled : col + 1], deep, state, frozen, heads=int(goes_deep))
            if goes_deep:
                logits = torch.where(exited.unsqueeze(1), logits, d.logits[:, 0])
                top = torch.where(exited, top, d.top[:, 0])
            record.layer_evals += n * len(deep)
            filled = col + 1
        record.exited = record.exited + exited.sum()  # on the device, read once at the end
        record.add(sampler.choose(logits, top))
        col += 1


def _accepted(drafts, draft_probs, verify_probs, sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """How many drafts each row keeps, and each row's next token after them (on the device).

    Speculative sampling, row by row: row ``b`` keeps draft ``i`` with probability
    ``min(1, p_i(d)/q_i(d))``; at its first rejection it draws from ``norm(max(p_i - q_i, 0))``,
    after keeping all ``k`` from the full model's ``p_k``. Every row's tokens are then draws from
    the full model (Leviathan et al., 2023). (Greedy decoding needs none of this: it keeps the
    drafts that equal the full model's argmax, then takes that argmax.)

    Args:
        drafts: ``(B, k)``; ``draft_probs``: ``(B, k, V)``; ``verify_probs``: ``(B, k+1, V)``.

    Returns:
        ``(B,)`` drafts kept per row and the ``(B,)`` token after them.
    """
    B, k = drafts.shape
    p = verify_probs[:, :k].gather(2, drafts.unsqueeze(2)).squeeze(2)  # (B, k)
    q = draft_probs.gather(2, drafts.unsqueeze(2)).squeeze(2)  # (B, k)
    keep = torch.rand(p.shape, generator=sampler.generator, device=p.device) * q < p
    kept = keep.long().cumprod(dim=1).sum(dim=1)  # (B,) per-row accepted prefix length
    at = kept.view(B, 1, 1).expand(B, 1, verify_probs.shape[-1])
    p_m = verify_probs.gather(1, at)[:, 0]  # (B, V): the full model after each row's kept drafts
    q_m = torch.cat((draft_probs, torch.zeros_like(draft_probs[:, :1])), dim=1).gather(1, at)[:, 0]  # 0 after the last
    residual = (p_m - q_m).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_m)  # rounding may leave no mass
    return kept, sampler.draw(residual / residual.sum(-1, keepdim=True))


def _speculative(parts: Parts, state: DecodeState, record: _Record, sampler: Sampler, exit_layer: int, draft_tokens: int) -> None:
    """Draft, verify, keep. Each row keeps its own accepted prefix: a step writes the drafts at
    the same columns in every row and moves on past the longest prefix any row kept (``M``);
    a row that kept fewer leaves its rejected drafts there as holes (invalid columns, which
    attention skips and the output drops) and continues at its own positions. A row that has
    ``max_new_tokens`` tokens keeps nothing more, so its positions stop growing."""
    shallow, deep = range(exit_layer), range(exit_layer, parts.num_layers)
    col, stop = record.start, record.stop  # col: every row's newest token's column, not yet cached
    B, device = record.tokens.shape[0], record.tokens.device
    steps = torch.arange(draft_tokens + 1, device=device)
    generated = torch.full((B,), record.generated, device=device)  # per row
    # The position of each row's last token it keeps (its max_new_tokens-th): a row that is ahead
    # drafts past it, and those drafts, dropped, may not reach past the model's positions.
    last = state.positions[:, col - 1 : col] + stop.max_new_tokens  # (B, 1)
    states = None
    while record.more:
        k = min(draft_tokens, stop.max_new_tokens - record.generated)
        draft_probs = []
        for i in range(k + 1):  # k drafts, then the draft layers for the last one (the verifier's input)
            at = col + i
            s = parts.step(record.tokens[:, at : at + 1], at, state.positions[:, at : at + 1], shallow, state, heads=int(i < k))
            if states is None:
                states = s.h.new_empty(B, draft_tokens + 1, s.h.shape[-1])  # (B, k+1, D): the verifier's input
            states[:, i] = s.h[:, 0]  # copied: the next draft step may reuse the memory (Parts.step)
            if i < k:  # the draft, written where it would go
                if sampler.greedy:
                    record.tokens[:, at + 1] = s.top[:, 0]
                else:
                    draft_probs.append(sampler.probabilities(s.logits[:, 0]))  # (B, V)
                    record.tokens[:, at + 1] = sampler.draw(draft_probs[-1])
        verify = parts.step(states[:, : k + 1], col, state.positions[:, col : col + k + 1], deep, state, heads=k + 1)
        drafted = record.tokens[:, col + 1 : col + k + 1]  # (B, k)
        if sampler.greedy:  # the drafts that equal the full model's argmax, then its argmax
            kept = (drafted == verify.top[:, :k]).long().cumprod(dim=1).sum(dim=1)  # (B,)
            nxt = verify.top.gather(1, kept[:, None])[:, 0]
        elif k:
            kept, nxt = _accepted(drafted, torch.stack(draft_probs, dim=1), sampler.probabilities(verify.logits), sampler)
        else:
            kept, nxt = torch.zeros(B, dtype=torch.long, device=device), sampler.choose(verify.logits[:, 0], verify.top[:, 0])
        if not parts.holes:  # one prefix for the batch, the fewest kept: a row that kept more takes its next draft
            fewest_kept = kept.min()
            after = torch.cat((drafted, nxt[:, None]), dim=1).gather(1, fewest_kept.view(1, 1).expand(B, 1))[:, 0]
            nxt, kept = torch.where(kept > fewest_kept, after, nxt), fewest_kept.expand(B)
        active = generated < stop.max_new_tokens  # (B,) rows still taking tokens
        kept = torch.where(active, kept, 0)
        gained = torch.where(active, kept + 1, 0)  # the kept drafts and the next token
        fresh = torch.where(steps[: k + 1] == kept[:, None], nxt[:, None], torch.cat((drafted, nxt[:, None]), dim=1))
        done = record.done
        if stop.eos is not None:
            done = done | (torch.isin(fresh, stop.eos) & (steps[: k + 1] < gained[:, None])).any(dim=1)
        generated = generated + gained
        # The one host read of the iteration: the longest kept prefix, the fewest tokens a row has, all stopped.
        packed = int((generated.min() * (draft_tokens + 1) + kept.max()) * 2 + done.all())
        packed, all_done = divmod(packed, 2)
        fewest, m = divmod(packed, draft_tokens + 1)
        record.tokens[:, col + m + 1] = nxt  # after the first m drafts, already in place
        state.valid[:, col + 1 : col + m + 1] &= steps[1 : m + 1] <= kept[:, None]  # rejected drafts: holes
        state.valid[:, col + m + 1] = active  # a row with all its tokens adds no more
        ahead = torch.arange(state.positions.shape[1] - col - m - 1, device=device)
        state.positions[:, col + m + 1 :] = torch.minimum((state.positions[:, col] + gained)[:, None] + ahead, last)  # each row's own
        record.length, record.generated, record.done = col + m + 2, fewest, done
        parts.keep(state, col + m + 1)
        record.layer_evals += (k + 1) * parts.num_layers
        record.drafted, record.accepted = record.drafted + k * active.sum(), record.accepted + kept.sum()
        col += m + 1
        if stop.eos is not None and all_done:
            return


def decode(
    parts: Parts,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    stop: Stop,
    sampler: Sampler,
    *,
    mode: str,
    exit_layer: int | None = None,
    routing_threshold: float | None = None,
    draft_tokens: int = 4,
    deep_fill: str = "recompute",
    exit_batching: str = "row",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Decode after ``input_ids`` (B, T0), left-padded where ``attention_mask`` (B, T0) is 0.

    Args:
        parts: the model, through :class:`Parts`.
        mode: ``"plain"``, ``"early_exit"`` or ``"speculative"``.
        exit_layer: early exit's exit layer, speculative's draft depth (1-based; checked by the caller).
        Others: see the module docstring.

    Returns:
        ``(B, T0 + n)`` ids, the prompts first, and the stats.
    """
    B, T0 = input_ids.shape
    device = input_ids.device
    room = stop.max_new_tokens
    if mode == "speculative":  # one row alone never leaves holes; several may, up to k per token
        room = (stop.max_new_tokens * (draft_tokens + 1) if B > 1 and parts.holes else stop.max_new_tokens) + draft_tokens
    valid = torch.cat((attention_mask.bool(), attention_mask.new_ones(B, room, dtype=torch.bool)), dim=1)  # (B, S)
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0)  # (B, S): each row counts from its first token
    state = DecodeState(parts.new_cache(B, T0 + room), valid, positions)
    record = _Record(torch.empty(B, T0 + room, dtype=torch.long, device=device), T0, stop)
    record.tokens[:, :T0] = input_ids
    exit_for_stats = exit_layer if mode != "plain" else None
    if stop.max_new_tokens == 0:
        return input_ids, record.stats(parts.num_layers, exit_for_stats)
    s = parts.step(input_ids, 0, positions[:, :T0], range(parts.num_layers), state)
    record.add(sampler.choose(s.logits[:, -1], s.top[:, -1]))  # the prompt is prefilled by every layer, not routed
    record.layer_evals += parts.num_layers
    if mode == "plain":
        _plain(parts, state, record, sampler)
    elif mode == "early_exit":
        state.exit_states = s.h.new_empty(B, T0 + room, s.h.shape[-1])  # (B, S, D)
        _early_exit(parts, state, record, sampler, ExitRule(routing_threshold, exit_layer), deep_fill, exit_batching)
    else:
        _speculative(parts, state, record, sampler, exit_layer, draft_tokens)
    return record.finish(state.valid), record.stats(parts.num_layers, exit_for_stats)
