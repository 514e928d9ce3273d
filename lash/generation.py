"""Autoregressive decoding with a KV cache: plain, early-exit (CALM) and self-speculative (LayerSkip).

* **plain** — every token runs every layer.
* **early exit** — a new token whose exit-layer confidence is ``>= routing_threshold`` is
  emitted from the exit layer; the deeper layers' caches get keys/values projected from its
  exit state (CALM's state propagation). This is exactly :func:`lash.routing.early_exit_forward`
  applied position by position, the prompt included: both share :func:`lash.routing.early_exit_step`.
* **self-speculative** — the first ``exit_layer`` layers plus the shared head draft up to
  ``draft_tokens`` tokens one at a time; the full model verifies them in one pass and the
  longest agreeing prefix is kept, plus the full model's own next token. The verifier reuses
  the draft layers' cache entries (those layers are the same weights) and their exit-layer
  states, so verifying only runs the draft layers for the last draft and the deeper layers for
  all of them. Sampling uses the speculative-sampling rule (Leviathan et al., 2023), so its
  output follows the full model's distribution; greedy output equals plain greedy output.

All prompts in a batch have the same length (``input_ids`` is a ``(B, T0)`` tensor, no padding).
The cache never needs truncating: a rejected draft's entries sit beyond the accepted length and
are overwritten, since every read covers positions ``0..start+n-1`` only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from lash.routing import compute_cost, early_exit_step, run_layers
from lash.validation import check_exit_layer, check_index, check_int, check_real, check_threshold, check_token_ids

if TYPE_CHECKING:
    from lash.models import DeepSupervisionTransformer


class KVCache:
    """Keys and values of every layer for positions ``0..max_len-1``, written in place.

    Args:
        model: the model whose layers it serves.
        batch_size: B.
        max_len: positions to hold.
        dtype: storage dtype (the activations').
    """

    def __init__(self, model: DeepSupervisionTransformer, batch_size: int, max_len: int, dtype: torch.dtype) -> None:
        shape = (batch_size, model.num_heads, max_len, model.dim // model.num_heads)  # (B, nh, S, hs)
        device = model.output_head.weight.device
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write layer ``layer``'s (1-based) ``k, v`` (B, nh, n, hs) at ``start``; return positions ``0..start+n-1``."""
        end = start + k.shape[2]
        keys, values = self.keys[layer - 1], self.values[layer - 1]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]


def token_probabilities(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """The distribution tokens are drawn from: ``(B, V)`` logits → ``(B, V)`` fp32 probabilities.

    Temperature 0 is greedy: a one-hot at the argmax, so the speculative rule below reduces to
    exact argmax matching.
    """
    if temperature == 0:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    # Shift the maximum to 0 and keep it there: a temperature too small for fp32 (even one that
    # rounds to 0) then gives -inf for every other logit, never inf - inf or 0 / 0.
    shifted = logits.float() - logits.float().amax(-1, keepdim=True)  # (B, V), <= 0
    logits = torch.where(shifted == 0, shifted, shifted / temperature)
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    return logits.softmax(dim=-1)


def sample(probs: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row from ``probs`` (B, V): ``(B,)``; greedy takes the argmax."""
    if temperature == 0:
        return probs.argmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    return sample(token_probabilities(logits, temperature, top_k), temperature, generator)  # (B,)


def _decode(model, prompt, max_new_tokens, step, temperature, top_k, generator) -> torch.Tensor:
    """The plain loop: ``step(tokens (B, n), start) → logits (B, V)`` of the last position."""
    tokens = [prompt]
    start, x = 0, prompt
    for _ in range(max_new_tokens):
        nxt = _next_token(step(x, start), temperature, top_k, generator)  # (B,)
        start, x = start + x.shape[1], nxt.unsqueeze(1)
        tokens.append(x)
    return torch.cat(tokens, dim=1)


def plain_decode(model, prompt, max_new_tokens, temperature, top_k, generator) -> tuple[torch.Tensor, dict[str, float]]:
    """Every token through every layer."""
    cache = KVCache(model, prompt.shape[0], prompt.shape[1] + max_new_tokens, model.embedding.weight.dtype)
    layers = range(1, model.num_layers + 1)

    def step(x, start):
        return model.output_head(run_layers(model, model.embed(x), start, layers, cache)[:, -1])  # (B, V)

    return _decode(model, prompt, max_new_tokens, step, temperature, top_k, generator), {}


def early_exit_decode(model, prompt, max_new_tokens, temperature, top_k, generator, exit_layer, threshold):
    """CALM decoding: confident tokens are emitted from the exit layer (see the module docstring)."""
    cache = KVCache(model, prompt.shape[0], prompt.shape[1] + max_new_tokens, model.embedding.weight.dtype)
    exits = []  # (B,) per emitted token: did the position that predicted it exit?

    def step(x, start):
        logits, exited, _ = early_exit_step(model, x, threshold, exit_layer, start, cache)
        exits.append(exited[:, -1])
        return logits[:, -1]  # (B, V)

    tokens = _decode(model, prompt, max_new_tokens, step, temperature, top_k, generator)
    shallow = torch.stack(exits).float().mean().item() if exits else 0.0
    return tokens, {"shallow_ratio": shallow, "compute_cost": compute_cost(shallow, exit_layer, model.num_layers)}


def _accepted(drafts, draft_probs, verify_probs, temperature, generator) -> tuple[int, torch.Tensor]:
    """How many drafts every row keeps, and each row's next token after them.

    Speculative sampling: row ``b`` keeps draft ``i`` with probability ``min(1, p_i(d)/q_i(d))``;
    at its first rejection it draws from ``norm(max(p_i - q_i, 0))``. The batch keeps the
    fewest drafts any row kept (``m``); a row that accepted draft ``m`` too takes it as its next
    token, which is still a draw from the full model, so every row stays exact.

    Args:
        drafts: ``(B, k)``; ``draft_probs``: ``(B, k, V)``; ``verify_probs``: ``(B, k+1, V)``.

    Returns:
        ``m`` and the ``(B,)`` token at the first position after the kept drafts.
    """
    B, k = drafts.shape
    p = verify_probs[:, :k].gather(2, drafts.unsqueeze(2)).squeeze(2)  # (B, k)
    q = draft_probs.gather(2, drafts.unsqueeze(2)).squeeze(2)  # (B, k)
    if temperature == 0:
        keep = p > 0  # one-hot distributions: the draft is the full model's argmax
    else:
        keep = torch.rand(p.shape, generator=generator, device=p.device) * q < p
    kept = keep.long().cumprod(dim=1).sum(dim=1)  # (B,) per-row accepted prefix length
    m = int(kept.min())
    if m == k:
        return m, sample(verify_probs[:, k], temperature, generator)
    residual = (verify_probs[:, m] - draft_probs[:, m]).clamp_min(0)  # (B, V)
    # Rows that kept draft m may have p == q there (no residual mass); they take the draft anyway.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, verify_probs[:, m])
    correction = sample(residual / residual.sum(-1, keepdim=True), temperature, generator)
    return m, torch.where(kept > m, drafts[:, m], correction)


def speculative_decode(model, prompt, max_new_tokens, temperature, top_k, generator, exit_layer, draft_tokens):
    """LayerSkip self-speculative decoding (see the module docstring)."""
    B, T0 = prompt.shape
    cache = KVCache(model, B, T0 + max_new_tokens, model.embedding.weight.dtype)
    draft_layers, deep_layers = range(1, exit_layer + 1), range(exit_layer + 1, model.num_layers + 1)

    def probs_at(h):  # (B, n, D) → (B, n, V)
        logits = model.output_head(h)
        return token_probabilities(logits.flatten(0, 1), temperature, top_k).view(*logits.shape[:2], -1)

    last = model.output_head(run_layers(model, model.embed(prompt), 0, range(1, model.num_layers + 1), cache)[:, -1])
    tokens = [prompt, _next_token(last, temperature, top_k, generator).unsqueeze(1)]
    pos, emitted, drafted, accepted = T0, 1, 0, 0  # pos: position of the newest token, not yet cached
    while emitted < max_new_tokens:
        k = min(draft_tokens, max_new_tokens - emitted - 1)
        x, states, drafts, draft_probs = tokens[-1], [], [], []
        for i in range(k + 1):  # k drafts, then the draft layers for the last one (the verifier's)
            states.append(run_layers(model, model.embed(x), pos + i, draft_layers, cache))  # (B, 1, D)
            if i < k:
                draft_probs.append(probs_at(states[-1]))
                x = sample(draft_probs[-1][:, 0], temperature, generator).unsqueeze(1)
                drafts.append(x)
        verify = probs_at(run_layers(model, torch.cat(states, dim=1), pos, deep_layers, cache))  # (B, k+1, V)
        if k:
            m, nxt = _accepted(torch.cat(drafts, dim=1), torch.cat(draft_probs, dim=1), verify, temperature, generator)
        else:
            m, nxt = 0, sample(verify[:, 0], temperature, generator)
        tokens += drafts[:m] + [nxt.unsqueeze(1)]
        pos, emitted, drafted, accepted = pos + m + 1, emitted + m + 1, drafted + k, accepted + m
    stats = {"acceptance_rate": accepted / drafted if drafted else 0.0, "drafted": float(drafted), "accepted": float(accepted)}
    return torch.cat(tokens, dim=1)[:, : T0 + max_new_tokens], stats


def _check(model, input_ids, max_new_tokens, temperature, top_k, draft_tokens, generator) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long or 0 in input_ids.shape:
        raise ValueError("input_ids must be a non-empty LongTensor (batch, prompt_len) (all prompts the same length)")
    check_int("max_new_tokens", max_new_tokens, 0)
    total = input_ids.shape[1] + max_new_tokens
    if total > model.max_seq_len:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} is outside "
            f"[1, max_seq_len={model.max_seq_len}]"
        )
    check_real("temperature", temperature, 0.0)  # 0: greedy
    if top_k is not None:
        check_index("top_k", top_k, 1, model.vocab_size, " (the vocabulary size), or None")
    check_int("draft_tokens", draft_tokens, 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    check_token_ids(input_ids, model.vocab_size)


@torch.no_grad()
def generate(
    model: DeepSupervisionTransformer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    exit_layer: int | None = None,
    routing_threshold: float | None = None,
    speculative: bool = False,
    draft_tokens: int = 4,
    generator: torch.Generator | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """Decode ``max_new_tokens`` tokens after each prompt with a KV cache.

    The mode: ``speculative=True`` → self-speculative; else a ``routing_threshold`` → early
    exit; else plain.

    Args:
        model: a :class:`DeepSupervisionTransformer`.
        input_ids: ``(B, T0)`` prompts, all the same length.
        max_new_tokens: tokens to add; ``T0 + max_new_tokens <= max_seq_len``.
        temperature: 0 for greedy, else sampling at this temperature.
        top_k: sample among the ``top_k`` most likely tokens only (None: all).
        exit_layer: exit / draft layer in ``[1, num_layers - 1]`` (early exit, speculative);
            default ``model.exit_layer``.
        routing_threshold: early exit's confidence threshold in [0, 1] (the rule of
            :mod:`lash.routing`); ``None``: no early exit.
        speculative: self-speculative decoding with ``exit_layer`` as the draft model.
        draft_tokens: most tokens drafted per verification (speculative).
        generator: random source for sampling, on the model's device.
        return_stats: also return a stats dict: early exit ``shallow_ratio``/``compute_cost``
            over the emitted tokens; speculative ``acceptance_rate``/``drafted``/``accepted``.

    Returns:
        ``(B, T0 + max_new_tokens)`` ids (the prompts first), plus the stats with ``return_stats``.
    """
    _check(model, input_ids, max_new_tokens, temperature, top_k, draft_tokens, generator)
    if speculative and routing_threshold is not None:
        raise ValueError("choose one mode: speculative=True or a routing_threshold (early exit), not both")
    args = (model, input_ids.to(model.output_head.weight.device), max_new_tokens, temperature, top_k, generator)
    exit_layer = model.exit_layer if exit_layer is None else exit_layer
    if max_new_tokens == 0:
        tokens, stats = args[1], {}
    elif speculative:
        tokens, stats = speculative_decode(*args, check_exit_layer(exit_layer, model.num_layers), draft_tokens)
    elif routing_threshold is not None:
        threshold = check_threshold(routing_threshold)
        tokens, stats = early_exit_decode(*args, check_exit_layer(exit_layer, model.num_layers), threshold)
    else:
        tokens, stats = plain_decode(*args)
    return (tokens, stats) if return_stats else tokens
