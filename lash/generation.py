"""Decoding LASH models: the adapter of :mod:`lash.decoding`'s engine, and :func:`generate`.

:class:`LashParts` runs a LASH model's own blocks (their one ``forward(h, positions, cache)``,
the training code) over a static KV cache preallocated for the whole call, so decoding cannot
drift from training. CALM-style propagation (``deep_fill="propagate"``) projects an exited
token's keys and values for every deep layer with one GEMM over the layers' stacked ``k_proj``
and ``v_proj`` weights and rotates them in one launch.
"""

from __future__ import annotations

from numbers import Integral
from typing import TYPE_CHECKING, NamedTuple

import torch

from lash.decoding import DEEP_FILLS, EXIT_BATCHING, DecodeState, Sampler, Stop, decode
from lash.exit_rule import ExitRule
from lash.modules.attention import LayerCache, additive_mask
from lash.validation import check_bool, check_exit_layer, check_index, check_int, check_real, check_threshold, check_token_ids
from lash_kernels import apply_rotary, values_checked

if TYPE_CHECKING:
    from lash.models import DeepSupervisionTransformer


class StaticCache(NamedTuple):
    """Every layer's keys and values for a whole decoding call, allocated once."""

    keys: torch.Tensor  # (L, B, nh, S, hs)
    values: torch.Tensor  # (L, B, nh, S, hs)


class LashParts:
    """:class:`lash.decoding.Parts` of a LASH model.

    Args:
        model: a :class:`lash.models.StandardTransformer` (or subclass), in eval mode.
    """

    holes = True  # attention reads the cache's columns by validity alone

    def __init__(self, model: DeepSupervisionTransformer) -> None:
        self.model, self.num_layers = model, model.num_layers

    def new_cache(self, batch: int, slots: int) -> StaticCache:
        m = self.model
        shape = (m.num_layers, batch, m.num_heads, slots, m.dim // m.num_heads)
        weight = m.output_head.weight
        # Zeros, not empty memory: a masked column still meets a zero attention weight, and
        # 0 · NaN (left in uninitialised memory) would be NaN.
        return StaticCache(weight.new_zeros(shape), weight.new_zeros(shape))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embedding(ids)  # ids are checked once, by generate, or were generated

    def run(self, h: torch.Tensor, start: int, positions: torch.Tensor, layers: range, state: DecodeState,
            frozen: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        cache: StaticCache = state.cache
        end = start + h.shape[1]  # the columns after this call: attention reads no further
        slots = torch.arange(start, end, device=h.device)  # (n,)
        columns = torch.arange(end, device=h.device)  # (end,)
        allowed = (columns <= slots[:, None]) & state.valid[:, None, :end]  # (B, n, end): valid columns up to its own
        mask = additive_mask(allowed.unsqueeze(1), h.dtype)  # (B, 1, n, end), shared by the layers
        where = slots.expand(h.shape[0], -1)  # (B, n): every row writes the same columns
        start_h = h
        for i in layers:
            layer_cache = LayerCache(cache.keys[i][:, :, :end], cache.values[i][:, :, :end], where, mask)
            h = self.model.layers[i](h, positions, layer_cache)
            if frozen is not None:
                h = torch.where(frozen[..., None], start_h, h)
        return h

    def fill(self, h: torch.Tensor, start: int, positions: torch.Tensor, layers: range, state: DecodeState) -> None:
        blocks = [self.model.layers[i].attn for i in layers]
        stacked = torch.cat([w for a in blocks for w in (a.k_proj.weight, a.v_proj.weight)])  # (2·D·n_layers, D)
        B, n, D = h.shape
        attn = blocks[0]
        kv = (h @ stacked.T).view(B, n, 2 * len(blocks), attn.num_heads, attn.head_dim).transpose(1, 3)  # (B, nh, 2Lk, n, hs)
        keys, values = kv[:, :, 0::2], kv[:, :, 1::2]  # (B, nh, Lk, n, hs)
        heads = keys.transpose(1, 2).reshape(B, len(blocks) * attn.num_heads, n, attn.head_dim)  # layers as heads
        with values_checked():  # the engine's own positions: in range by construction
            rotated, _ = apply_rotary(heads, heads[:, :0], attn.rope.cos, attn.rope.sin, positions=positions)
        rotated = rotated.view(B, len(blocks), attn.num_heads, n, attn.head_dim)
        cache: StaticCache = state.cache
        slots = torch.arange(start, start + n, device=h.device)
        index = slots.view(1, 1, 1, n, 1).expand(len(blocks), B, attn.num_heads, n, attn.head_dim)
        cache.keys[layers.start : layers.stop].scatter_(3, index, rotated.transpose(0, 1))
        cache.values[layers.start : layers.stop].scatter_(3, index, values.permute(2, 0, 1, 3, 4))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.output_head(h)

    def keep(self, state: DecodeState, slots: int) -> None:
        """A static cache keeps every column: later writes overwrite, masks hide what is ahead."""


def _check(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, draft_tokens, generator) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long or 0 in input_ids.shape:
        got = f"{input_ids.dtype} of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty LongTensor (batch, prompt_len); got {got}")
    check_attention_mask(attention_mask, input_ids)
    check_int("max_new_tokens", max_new_tokens, 0)
    total = input_ids.shape[1] + max_new_tokens
    if total > model.max_seq_len:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} is outside "
            f"[1, max_seq_len={model.max_seq_len}]"
        )
    check_sampling(temperature, top_k, top_p, generator, model.vocab_size)
    check_int("draft_tokens", draft_tokens, 1)
    check_token_ids(input_ids, model.vocab_size)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, generator, vocab_size: int) -> None:
    """Raise ``ValueError`` for sampling settings outside their ranges (both ``generate`` functions)."""
    check_real("temperature", temperature, 0.0)  # 0: greedy
    if top_k is not None:
        check_index("top_k", top_k, 1, vocab_size, " (the vocabulary size), or None")
    if top_p is not None:
        check_real("top_p", top_p, 0.0, 1.0, low_open=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def check_attention_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the mask is ``None`` or 0/1 shaped like ``input_ids``, each row
    left-padded (its zeros before its ones) with at least one token."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask shape {shape} must equal input_ids shape {tuple(input_ids.shape)}")
    mask = attention_mask.long()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
    empty = (mask.sum(dim=1) == 0).nonzero()
    if empty.numel():
        raise ValueError(f"row {int(empty[0])} of attention_mask holds no token: every prompt needs at least one")
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise ValueError("attention_mask must be left-padded: in each row, the zeros before the ones")


def decoding_mode(speculative: bool, routing_threshold: float | None, deep_fill: str, exit_batching: str) -> str:
    """The mode :func:`lash.decoding.decode` runs; ``ValueError`` for options that do not go together."""
    check_bool("speculative", speculative)
    if speculative and routing_threshold is not None:
        raise ValueError("choose one mode: speculative=True or a routing_threshold (early exit), not both")
    if deep_fill not in DEEP_FILLS:
        raise ValueError(f"deep_fill={deep_fill!r} must be one of {', '.join(DEEP_FILLS)}")
    if exit_batching not in EXIT_BATCHING:
        raise ValueError(f"exit_batching={exit_batching!r} must be one of {', '.join(EXIT_BATCHING)}")
    return "speculative" if speculative else "early_exit" if routing_threshold is not None else "plain"


def check_exit(exit_layer: int | None, num_layers: int, mode: str) -> None:
    """``ValueError`` for an exit layer outside ``[1, num_layers - 1]``, or none where the mode needs one."""
    if exit_layer is None and mode != "plain":
        raise ValueError("exit_layer is needed for early exit and self-speculative decoding")
    if exit_layer is not None:
        check_exit_layer(exit_layer, num_layers)


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def stopping(
    max_new_tokens: int, eos_token_id: int | list[int] | None, pad_token_id: int | None, vocab_size: int, device
) -> Stop:
    """The :class:`lash.decoding.Stop` of a call: rows padded after their EOS with ``pad_token_id``
    (default: the first EOS id); ``ValueError`` for EOS ids outside ``[0, vocab_size)`` or a pad
    id that is not an int."""
    ids = [] if eos_token_id is None else [eos_token_id] if _is_int(eos_token_id) else eos_token_id
    if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and 0 <= i < vocab_size for i in ids):
        raise ValueError(
            f"eos_token_id={eos_token_id!r} must be None, a token id or a list of token ids (ints) in [0, {vocab_size})"
        )
    if pad_token_id is not None and not (_is_int(pad_token_id) and 0 <= pad_token_id < vocab_size):
        raise ValueError(f"pad_token_id={pad_token_id!r} must be None or a token id (an int) in [0, {vocab_size})")
    eos = torch.tensor(ids, dtype=torch.long, device=device) if ids else None
    pad = pad_token_id if pad_token_id is not None else (ids[0] if ids else 0)
    return Stop(max_new_tokens, eos, pad)


@torch.no_grad()
def generate(
    model: DeepSupervisionTransformer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    exit_layer: int | None = None,
    routing_threshold: ExitRule | float | None = None,
    speculative: bool = False,
    draft_tokens: int = 4,
    deep_fill: str = "recompute",
    exit_batching: str = "row",
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """Decode ``max_new_tokens`` tokens after each prompt with a KV cache (:mod:`lash.decoding`).

    The mode: ``speculative=True`` → self-speculative; else a ``routing_threshold`` → early
    exit; else plain. :func:`lash.hf.generate` takes the same arguments for Hugging Face models.

    Args:
        model: a :class:`DeepSupervisionTransformer` (or any LASH model).
        input_ids: ``(B, T0)`` prompts, left-padded when their lengths differ.
        max_new_tokens: tokens to add; ``T0 + max_new_tokens <= max_seq_len``.
        temperature: 0 for greedy, else sampling at this temperature.
        top_k: sample among the ``top_k`` most likely tokens only (None: all).
        top_p: sample among the most likely tokens holding ``top_p`` of the probability (None: all).
        exit_layer: exit / draft layer in ``[1, num_layers - 1]`` (early exit, speculative);
            default: the model's own ``exit_layer``.
        routing_threshold: early exit's :class:`~lash.exit_rule.ExitRule` (its exit layer wins
            over ``exit_layer``), or its bare confidence threshold in [0, 1]; ``None``: no early exit.
        speculative: self-speculative decoding with ``exit_layer`` as the draft depth.
        draft_tokens: most tokens drafted per verification (speculative).
        deep_fill: early exit's ``"recompute"`` (exact deep states, filled in the next step that
            goes deep) or ``"propagate"`` (projected from the exit state at once).
        exit_batching: ``"row"`` (each row exits on its own confidence) or ``"batch"`` (a step exits
            only when every row is confident).
        attention_mask: ``(B, T0)``, 1 for tokens and 0 for left padding; ``None``: all tokens.
        eos_token_id: stop a row at this id (or any of these); rows that stopped are padded
            with ``pad_token_id`` (default: the first EOS id) until every row stops.
        generator: random source for sampling, on the model's device.
        return_stats: also return ``shallow_ratio``, ``compute_cost``, ``executed_layer_ratio``
            and ``acceptance_rate`` (:mod:`lash.decoding`).

    Returns:
        ``(B, T0 + n)`` ids (the prompts first), ``n <= max_new_tokens`` (fewer only when every
        row stopped), plus the stats with ``return_stats``.
    """
    _check(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, draft_tokens, generator)
    check_bool("return_stats", return_stats)
    if isinstance(routing_threshold, ExitRule):
        exit_layer, routing_threshold = routing_threshold.exit_layer, routing_threshold.threshold
    mode = decoding_mode(speculative, routing_threshold, deep_fill, exit_batching)
    if exit_layer is None and mode != "plain":
        exit_layer = getattr(model, "exit_layer", None)
    check_exit(exit_layer, model.num_layers, mode)
    device = model.output_head.weight.device
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    out, stats = decode(
        LashParts(model), input_ids, mask, stopping(max_new_tokens, eos_token_id, pad_token_id, model.vocab_size, device),
        Sampler(temperature, top_k, top_p, generator), mode=mode, exit_layer=exit_layer,
        routing_threshold=check_threshold(routing_threshold), draft_tokens=draft_tokens, deep_fill=deep_fill,
        exit_batching=exit_batching,
    )  # fmt: skip
    return (out, stats) if return_stats else out
