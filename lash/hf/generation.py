"""Greedy early-exit and self-speculative decoding for Hugging Face decoder-only causal LMs.

The modes and their rules are :mod:`lash.generation`'s, run on a transformers model and one
``DynamicCache`` shared by every layer:

* **plain** — every token runs every layer; the output equals ``model.generate(do_sample=False)``.
* **early exit** — layers ``1..exit_layer`` run for each new token; a row whose exit-layer
  confidence (max softmax of ``head(norm(h))``) is ``>= routing_threshold`` takes the exit
  prediction (:func:`lash.routing.exits`, the prompt's tokens routed too). An exited token's
  state stays its exit state in every deeper layer, so a deeper layer's cache holds the
  keys/values that layer projects from the exit state (LASH's rule). The deeper layers run
  lazily: while every row's newest token exits, their caches lag behind; the first token that
  needs them runs them once over all the positions they lack, exited (row, position) pairs
  held at their exit state after each layer. Causal attention makes that equal to running
  them position by position. The catch-up pass runs whole layers for exited positions too
  (a decoder layer has no keys/values-only call; their outputs are dropped), so the saving is
  fewer, wider deep calls, and none at all for positions after the last deep prediction;
  ``compute_cost`` in the stats is :func:`lash.routing.compute_cost`'s nominal count.
* **self-speculative** — layers ``1..exit_layer`` (+ norm + head) draft up to ``draft_tokens``
  tokens; the deeper layers verify them in one pass over the draft layers' states (the first
  layers are the full model's, so their cache entries and states are reused), the batch keeps
  the shortest prefix any row agrees with plus the full model's next token, and every layer's
  cache is cropped back to the kept length. Output equals plain greedy output.

Supported: families whose backbone forward is ``embed → layers (one rotary embedding, full or
sliding-window causal masks) → norm`` and whose logits are ``head(norm(h))`` (Llama, Mistral,
Qwen2); softcapped or scaled logits (Gemma 2/3, Cohere, Granite) are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from lash.hf.structure import DecoderParts, cache_keyword, decoder_parts
from lash.losses import confidence
from lash.routing import compute_cost, exits
from lash.validation import check_exit_layer, check_int, check_threshold


def _parts(model: nn.Module) -> DecoderParts:
    """:func:`lash.hf.structure.decoder_parts`, plus what stepping the layers by hand needs:
    the backbone's ``rotary_emb``, and embeddings the backbone does not rescale (Gemma does)."""
    parts = decoder_parts(model)
    if not hasattr(parts.backbone, "rotary_emb"):
        raise ValueError(f"{type(model).__name__} has no backbone.rotary_emb: lash.hf.generate steps RoPE decoders only")
    if "gemma" in str(getattr(model.config, "model_type", "")):
        raise ValueError(f"model_type={model.config.model_type!r} scales its embeddings inside the backbone; lash.hf.generate does not")
    return parts


def _logits(parts: DecoderParts, h: torch.Tensor) -> torch.Tensor:
    """Any layer's states ``(B, n, D)`` → logits ``(B, n, V)``: the shared norm and head."""
    return parts.head(parts.norm(h))


def _run(
    parts: DecoderParts,
    cache,
    h: torch.Tensor,
    layers: range,
    positions: torch.Tensor,
    mask: torch.Tensor,
    frozen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run decoder layers ``layers`` (0-based) on ``h`` (B, n, D), appending to their caches.

    Every layer in ``layers`` must hold the same number of cached positions, those before
    ``positions`` (B, n); ``mask`` is the 2-D padding mask ``(B, cached + n)``. Where ``frozen``
    (B, n) is set, a token's state is put back to its input state after each layer, so each
    layer caches the keys/values of that state (LASH's rule for exited tokens).
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = parts.backbone.config
    rotary = parts.backbone.rotary_emb(h, positions)  # (cos, sin), each (B, n, head_dim)
    masks: dict[bool, object] = {}  # sliding? → the mask, sized by the first such layer's cache
    start = h
    for i in layers:
        sliding = cache.is_sliding[i]
        if sliding not in masks:
            make = create_sliding_window_causal_mask if sliding else create_causal_mask
            masks[sliding] = make(
                config=config, inputs_embeds=h, attention_mask=mask, position_ids=positions, layer_idx=i,
                **{cache_keyword(make): cache},
            )  # fmt: skip
        layer = parts.layers[i]
        out = layer(h, attention_mask=masks[sliding], position_embeddings=rotary, position_ids=positions,
                    use_cache=True, **{cache_keyword(layer.forward): cache})  # fmt: skip
        h = out[0] if isinstance(out, tuple) else out  # (B, n, D)
        if frozen is not None:
            h = torch.where(frozen.unsqueeze(-1), start, h)
    return h


class _Context(NamedTuple):
    """What every decoding loop shares."""

    parts: DecoderParts
    cache: object  # the one DynamicCache
    mask: torch.Tensor  # (B, T0 + room) padding mask: the prompt's, then ones
    positions: torch.Tensor  # (B, T0 + room) position ids, as generate derives them from the mask


def _first_eos(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Per row, 1 + the index of the first eos in ``tokens`` (B, n), or n + 1 where none is."""
    n = tokens.shape[1]
    hit = torch.isin(tokens, eos)  # (B, n)
    index = torch.where(hit, torch.arange(1, n + 1, device=tokens.device), n + 1)
    return index.amin(dim=1)  # (B,)


def _finish(out: torch.Tensor, T0: int, max_new_tokens: int, eos: torch.Tensor | None, pad: int) -> torch.Tensor:
    """Cut to ``T0 + max_new_tokens``; with an eos, pad each row after its first eos and stop
    once every row has one, as ``generate`` does."""
    out = out[:, : T0 + max_new_tokens]
    if eos is None:
        return out
    ends = _first_eos(out[:, T0:], eos)  # (B,)
    generated = out.shape[1] - T0
    after = torch.arange(1, generated + 1, device=out.device) > ends.unsqueeze(1)  # (B, new)
    out[:, T0:] = out[:, T0:].masked_fill(after, pad)
    return out[:, : T0 + min(int(ends.max()), generated)]


def _all_done(tokens: list[torch.Tensor], eos: torch.Tensor | None) -> bool:
    if eos is None:
        return False
    generated = torch.cat(tokens[1:], dim=1)
    return bool((_first_eos(generated, eos) <= generated.shape[1]).all())


def _greedy_loop(prompt, max_new_tokens, eos, step: Callable) -> list[torch.Tensor]:
    """One token per step: ``step(x (B, n), start, end) → logits (B, V)`` of the newest position."""
    tokens, start, x = [prompt], 0, prompt
    for _ in range(max_new_tokens):
        end = start + x.shape[1]
        x = step(x, start, end).argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(x)
        start = end
        if _all_done(tokens, eos):
            break
    return tokens


def _plain(ctx: _Context, prompt, max_new_tokens, eos) -> tuple[list[torch.Tensor], dict[str, float]]:
    every = range(len(ctx.parts.layers))

    def step(x, start, end):
        h = _run(ctx.parts, ctx.cache, ctx.parts.embed(x), every, ctx.positions[:, start:end], ctx.mask[:, :end])
        return _logits(ctx.parts, h[:, -1:])[:, 0]

    return _greedy_loop(prompt, max_new_tokens, eos, step), {}


def _early_exit(ctx: _Context, prompt, max_new_tokens, eos, exit_layer, threshold):
    """Early-exit decoding (see the module docstring): the deeper layers catch up lazily."""
    parts, L = ctx.parts, len(ctx.parts.layers)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (exit states (B, n, D), exited (B, n)) not yet in the deep caches
    exited_rows = []  # (B,) per emitted token: did the position that predicted it exit?

    def step(x, start, end):
        h = _run(parts, ctx.cache, parts.embed(x), range(exit_layer), ctx.positions[:, start:end], ctx.mask[:, :end])
        logits = _logits(parts, h)  # (B, n, V)
        exited = exits(confidence(logits), threshold)  # (B, n)
        pending.append((h, exited))
        exited_rows.append(exited[:, -1])
        if bool(exited[:, -1].all()):
            return logits[:, -1]
        states, frozen = (torch.cat(t, dim=1) for t in zip(*pending))  # (B, m, D), (B, m)
        pending.clear()
        lag = end - states.shape[1]  # the deep caches' length
        deep = _run(parts, ctx.cache, states, range(exit_layer, L), ctx.positions[:, lag:end], ctx.mask[:, :end], frozen)
        return torch.where(exited[:, -1:], logits[:, -1], _logits(parts, deep[:, -1:])[:, 0])  # (B, V)

    tokens = _greedy_loop(prompt, max_new_tokens, eos, step)
    shallow = torch.stack(exited_rows).float().mean().item()
    return tokens, {
        "exited": float(torch.stack(exited_rows).sum()),
        "shallow_ratio": shallow,
        "compute_cost": compute_cost(shallow, exit_layer, L),
    }


def _speculative(ctx: _Context, prompt, max_new_tokens, eos, exit_layer, draft_tokens):
    """Self-speculative decoding (see the module docstring)."""
    parts, cache, L = ctx.parts, ctx.cache, len(ctx.parts.layers)
    T0 = prompt.shape[1]
    h = _run(parts, cache, parts.embed(prompt), range(L), ctx.positions[:, :T0], ctx.mask[:, :T0])
    tokens = [prompt, _logits(parts, h[:, -1:]).argmax(-1)]  # each (B, n)
    pos, emitted, drafted, accepted = T0, 1, 0, 0  # pos: the newest token's position, not yet cached
    while emitted < max_new_tokens and not _all_done(tokens, eos):
        k = min(draft_tokens, max_new_tokens - emitted - 1)
        x, states, drafts = tokens[-1], [], []
        for i in range(k + 1):  # k drafts, then the draft layers for the last one (the verifier's input)
            at = pos + i
            states.append(_run(parts, cache, parts.embed(x), range(exit_layer), ctx.positions[:, at : at + 1], ctx.mask[:, : at + 1]))
            if i < k:
                x = _logits(parts, states[-1]).argmax(-1)  # (B, 1)
                drafts.append(x)
        end = pos + k + 1
        deep = _run(parts, cache, torch.cat(states, dim=1), range(exit_layer, L), ctx.positions[:, pos:end], ctx.mask[:, :end])
        verified = _logits(parts, deep).argmax(-1)  # (B, k+1): the full model's next token after each position
        m = 0
        if k:
            drafts = torch.cat(drafts, dim=1)  # (B, k)
            m = int((verified[:, :k] == drafts).long().cumprod(dim=1).sum(dim=1).min())
            tokens.append(drafts[:, :m])
        tokens.append(verified[:, m : m + 1])  # a row that kept draft m+1 too gets that same token
        # Every layer cached positions pos..pos+k; keep those of the newest token and the m kept drafts.
        cache.crop(m - k)
        pos, emitted, drafted, accepted = pos + m + 1, emitted + m + 1, drafted + k, accepted + m
    stats = {"acceptance_rate": accepted / drafted if drafted else 0.0, "drafted": float(drafted), "accepted": float(accepted)}
    return tokens, stats


def _context(model: nn.Module, parts: DecoderParts, input_ids: torch.Tensor, attention_mask, room: int) -> _Context:
    """A fresh cache; the padding mask and position ids for the prompt and ``room`` more positions."""
    from transformers import DynamicCache

    B, T0 = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
    mask = torch.cat((attention_mask.long(), attention_mask.new_ones(B, room, dtype=torch.long)), dim=1)  # (B, T0 + room)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # left padding: each row counts from its first token
    cache = DynamicCache(config=model.config)
    if len(cache.layers) != len(parts.layers):
        raise ValueError(f"the cache has {len(cache.layers)} layers for {len(parts.layers)} decoder layers")
    return _Context(parts, cache, mask, positions)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    exit_layer: int,
    routing_threshold: float | None = None,
    speculative: bool = False,
    draft_tokens: int = 4,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """Greedy decoding of a Hugging Face causal LM: plain, early exit or self-speculative.

    The mode: ``speculative=True`` → self-speculative; else a ``routing_threshold`` → early
    exit; else plain (every layer). See the module docstring for the rules.

    Args:
        model: a decoder-only ``*ForCausalLM`` (Llama, Mistral, Qwen2, ...) in eval mode.
        input_ids: ``(B, T0)`` prompts, left-padded when their lengths differ.
        max_new_tokens: tokens to add, >= 0.
        exit_layer: exit / draft layer in ``[1, L - 1]`` (1-based: layers 1..exit_layer run).
        routing_threshold: early exit's confidence threshold in [0, 1]; ``None``: no early exit.
        speculative: draft with the first ``exit_layer`` layers, verify with all of them.
        draft_tokens: most drafts per verification, >= 1.
        attention_mask: ``(B, T0)`` 1 for tokens, 0 for (left) padding; ``None``: all tokens.
        eos_token_id: stop a row at this token (or any of these), padding it afterwards with
            ``model.generation_config.pad_token_id`` (else the first eos) until every row stops;
            ``None``: never stop early.
        return_stats: also return a stats dict: early exit ``exited`` (emitted tokens predicted
            at the exit layer), ``shallow_ratio``, ``compute_cost``; speculative ``drafted``,
            ``accepted``, ``acceptance_rate``.

    Returns:
        ``(B, T0 + n)`` ids, ``n <= max_new_tokens`` (fewer only when every row hit an eos),
        plus the stats with ``return_stats``.
    """
    parts = _parts(model)
    L = len(parts.layers)
    check_exit_layer(exit_layer, L)
    check_int("max_new_tokens", max_new_tokens, 0)
    check_int("draft_tokens", draft_tokens, 1)
    threshold = check_threshold(routing_threshold)
    if speculative and threshold is not None:
        raise ValueError("choose one mode: speculative=True or a routing_threshold (early exit), not both")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long or 0 in input_ids.shape:
        raise ValueError("input_ids must be a non-empty LongTensor (batch, prompt_len)")
    device = parts.head.weight.device
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    eos = None if eos_token_id is None else torch.tensor(eos_token_id, device=device).reshape(-1)
    if max_new_tokens == 0:
        return (input_ids, {}) if return_stats else input_ids
    pad = model.generation_config.pad_token_id
    pad = int(eos[0]) if pad is None and eos is not None else pad
    ctx = _context(model, parts, input_ids, attention_mask, max_new_tokens + draft_tokens)
    if speculative:
        ctx.cache.activate_past_recording()  # sliding-window layers must be able to roll back
        tokens, stats = _speculative(ctx, input_ids, max_new_tokens, eos, exit_layer, draft_tokens)
    elif threshold is not None:
        tokens, stats = _early_exit(ctx, input_ids, max_new_tokens, eos, exit_layer, threshold)
    else:
        tokens, stats = _plain(ctx, input_ids, max_new_tokens, eos)
    out = _finish(torch.cat(tokens, dim=1), input_ids.shape[1], max_new_tokens, eos, pad)
    return (out, stats) if return_stats else out
