"""Real early exit: confident tokens stop at ``exit_layer`` and the deeper layers skip their work.

The original description's routing (:func:`forward_inference`, ``Trainer.evaluate``)
*selects* between the exit layer's and the last layer's predictions after running every layer
for every token. Here the deeper layers really run only for the tokens that did not exit:

1. Layers ``1..exit_layer`` run for every token; the shared head gives the exit logits and the
   confidence (max softmax probability).
2. A token exits when its confidence is ``>= threshold``. Its hidden state stays its exit-layer
   state for good (CALM's state propagation, Schuster et al., 2022), so at a deeper layer ``l``
   its key and value are ``k_proj_l``/``v_proj_l`` of that state, rotated at its own position.
3. In each deeper layer, keys and values are projected for every token (two of the layer's
   projections), while queries, attention, output projection, norms and FFN run only for the
   non-exited tokens, gathered from the whole ``[B, T]`` into a compact batch (padded per row
   for the attention, whose queries read their own row's keys causally).
4. Exited tokens answer with the exit logits, the others with the last layer's.

The answer differs from the original description's selection-only routing: a deep token's attention reads the
propagated (exit-layer) states of exited tokens instead of their true deep states.

Also here: :func:`calibrate_threshold`, which picks a threshold on held-out batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import torch

from lash.modules.attention import causal_mask
from lash.losses import confidence
from lash.validation import check_exit_layer, check_real, check_threshold, check_token_ids
from lash_kernels import add_rms_norm

if TYPE_CHECKING:
    from lash.models import DeepSupervisionTransformer
    from lash.modules import TransformerBlock


class KeyValueStore(Protocol):
    """Where a layer's keys and values for all positions so far live (see :class:`lash.generation.KVCache`)."""

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def exits(confidence: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """The routing rule: which tokens exit early, ``confidence >= threshold`` (none when ``None``)."""
    if threshold is None:
        return torch.zeros_like(confidence, dtype=torch.bool)
    return confidence >= threshold


def compute_cost(shallow_ratio: float, exit_layer: int, num_layers: int) -> float:
    """The original description's cost: (shallow · exit_layer + deep · num_layers) / (tokens · num_layers)."""
    return (shallow_ratio * exit_layer + (1 - shallow_ratio) * num_layers) / num_layers


def _kv(cache: KeyValueStore | None, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
    """The layer's keys/values for positions 0..start+n-1: this call's alone, or the cache's."""
    return (k, v) if cache is None else cache.update(layer, start, k, v)


def _residual_and_ffn(block: TransformerBlock, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The rest of a post-norm block after attention, on any ``(..., D)`` rows."""
    h, _ = add_rms_norm(attn_out, h, block.norm1.weight, block.norm1.eps)
    h, _ = add_rms_norm(block.ffn(h), h, block.norm2.weight, block.norm2.eps)
    return h


def run_layers(
    model: DeepSupervisionTransformer,
    h: torch.Tensor,
    start: int,
    layers: range,
    cache: KeyValueStore | None = None,
) -> torch.Tensor:
    """Run ``layers`` (1-based) for every token of ``h`` (B, n, D) at positions start..start+n-1.

    With a cache, each layer's keys/values are written into it and the queries read every
    position before them; without one, ``start`` must be 0 and this is :meth:`forward`'s maths.
    """
    positions = torch.arange(start, start + h.shape[1], device=h.device)  # (n,)
    mask = causal_mask(positions, start + h.shape[1])  # (n, start+n)
    for layer in layers:
        attn = model.layers[layer - 1].attn
        k, v = _kv(cache, layer, start, *attn.keys_values(h, positions))  # (B, nh, start+n, hs)
        h = _residual_and_ffn(model.layers[layer - 1], h, attn.attend(attn.queries(h, positions), k, v, mask))
    return h


def _layout(exits: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the non-exited tokens go: flat indices, slots in a per-row padded batch, positions.

    Args:
        exits: ``(B, n)`` boolean.
        start: position of the first column.

    Returns:
        ``deep`` (N,) indices into the flattened ``B*n`` tokens (row-major); ``slot`` (N,)
        indices into the flattened ``(B, Tq)`` padded layout, ``Tq`` the most deep tokens of any
        row; ``q_positions`` ``(B, Tq)`` (padding at position 0, whose key always exists).
    """
    B, n = exits.shape
    deep = (~exits).reshape(-1).nonzero().squeeze(1)  # (N,), sorted by row
    rows = deep // n
    counts = torch.bincount(rows, minlength=B)  # (B,)
    width = int(counts.max())
    rank = torch.arange(deep.numel(), device=deep.device) - (counts.cumsum(0) - counts)[rows]
    slot = rows * width + rank  # (N,)
    q_positions = torch.zeros(B * width, dtype=torch.long, device=deep.device)
    q_positions[slot] = start + deep % n
    return deep, slot, q_positions.view(B, width)


def _deep_layers(
    model: DeepSupervisionTransformer,
    h: torch.Tensor,
    exits: torch.Tensor,
    start: int,
    exit_layer: int,
    cache: KeyValueStore | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Layers ``exit_layer+1..L`` with exited tokens frozen at their exit state.

    Args:
        h: ``(B, n, D)`` exit-layer hidden states.
        exits: ``(B, n)`` which tokens exited.

    Returns:
        ``deep`` (N,) flat indices of the non-exited tokens, their last-layer states ``(N, D)``
        and ``Tq``, the padded query width per row.
    """
    B, n, D = h.shape
    deep, slot, q_positions = _layout(exits, start)
    positions = torch.arange(start, start + n, device=h.device)  # (n,)
    mask = causal_mask(q_positions, start + n)  # (B, 1, Tq, start+n)
    state = h.reshape(B * n, D).clone()  # every token's input to the current layer
    hd = state[deep]  # (N, D)
    for layer in range(exit_layer + 1, model.num_layers + 1):
        block = model.layers[layer - 1]
        k, v = _kv(cache, layer, start, *block.attn.keys_values(state.view(B, n, D), positions))
        if deep.numel():
            hq = h.new_zeros(B * q_positions.shape[1], D)
            hq[slot] = hd
            attn_out = block.attn.attend(block.attn.queries(hq.view(B, -1, D), q_positions), k, v, mask)  # (B, Tq, D)
            hd = _residual_and_ffn(block, hd, attn_out.reshape(-1, D)[slot])  # (N, D)
            state.index_copy_(0, deep, hd)
    return deep, hd, q_positions.shape[1]


def _matmul_flops(model: DeepSupervisionTransformer, B: int, n: int, exit_layer: int, deep: int | None, width: int) -> tuple[int, int]:
    """Matmul FLOPs of the routed step and of the full forward on the same ``(B, n)`` tokens.

    Counted: every projection, the attention's QKᵀ and AV (the full forward's causal pairs; the
    compact path's padded ``Tq × n`` pairs, which its masked attention computes), the head.
    ``deep=None`` means the deeper layers did not run at all.
    """
    D, L = model.dim, model.num_layers
    ffn = model.layers[0].ffn.w1.out_features
    tokens, proj = B * n, 2 * D * D  # proj: FLOPs per token of one D×D projection
    layer = 4 * proj + 3 * 2 * D * ffn
    causal = tokens * layer + B * n * (n + 1) // 2 * 4 * D
    head = 2 * D * model.vocab_size
    full = L * causal + tokens * head
    routed = exit_layer * causal + tokens * head
    if deep is not None:
        per_layer = tokens * 2 * proj + B * width * (2 * proj + n * 4 * D) + deep * (layer - 4 * proj)
        routed += (L - exit_layer) * per_layer + deep * head
    return routed, full


def early_exit_step(
    model: DeepSupervisionTransformer,
    x: torch.Tensor,
    threshold: float | None,
    exit_layer: int,
    start: int = 0,
    cache: KeyValueStore | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Routed forward of tokens ``x`` (B, n) at positions start..start+n-1 (the shared core).

    Without a cache this is :func:`early_exit_forward`'s computation (``start`` 0); with one,
    every layer's keys/values for these positions are written to it (exited tokens' from their
    exit state), which is how early-exit decoding follows the same rule.

    Returns:
        ``logits (B, n, V)``, ``exits (B, n)`` and ``(routed, full)`` matmul FLOPs.
    """
    if cache is None:
        h = model.hidden_states(x, [exit_layer])[0]  # (B, n, D): forward's own path, fused causal attention
    else:
        h = run_layers(model, model.embed(x), start, range(1, exit_layer + 1), cache)
    logits = model.output_head(h)  # (B, n, V)
    exited = exits(confidence(logits), threshold)  # (B, n)
    B, n, V = logits.shape
    if cache is None and bool(exited.all()):
        return logits, exited, _matmul_flops(model, B, n, exit_layer, None, 0)
    deep, hd, width = _deep_layers(model, h, exited, start, exit_layer, cache)
    logits.view(B * n, V).index_copy_(0, deep, model.output_head(hd))
    return logits, exited, _matmul_flops(model, B, n, exit_layer, deep.numel(), width)


@torch.no_grad()
def forward_inference(
    model: DeepSupervisionTransformer, x: torch.Tensor, threshold: float | None, exit_layer: int | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The original description's two-stage routing: confident tokens take the exit layer's logits, the rest the last layer's.

    Every token still attends over the full sequence, so the deeper layers run for the whole
    sequence unless every token exits (then they are skipped).

    Args:
        model: a :class:`DeepSupervisionTransformer`.
        x: token ids ``(B, T)``.
        threshold: exit when confidence ``>= threshold``, in [0, 1]; ``None``: routing off.
        exit_layer: in ``[1, num_layers - 1]``; default ``model.exit_layer``.

    Returns:
        ``(logits (B, T, V), stats)`` with ``shallow_ratio`` and ``compute_cost`` (:func:`compute_cost`).
    """
    threshold = check_threshold(threshold)
    if threshold is None or model.num_layers == 1:
        return model(x), {"shallow_ratio": 0.0, "compute_cost": 1.0}
    exit_layer = check_exit_layer(model.exit_layer if exit_layer is None else exit_layer, model.num_layers)
    h = model.hidden_states(x, [exit_layer])[0]  # (B, T, D)
    shallow_logits = model.output_head(h)  # (B, T, V)
    exited = exits(confidence(shallow_logits), threshold)  # (B, T)
    shallow_ratio = exited.float().mean().item()
    if shallow_ratio < 1.0:
        for block in model.layers[exit_layer:]:
            h = block(h)
        logits = torch.where(exited.unsqueeze(-1), shallow_logits, model.output_head(h))
    else:
        logits = shallow_logits
    return logits, {"shallow_ratio": shallow_ratio, "compute_cost": compute_cost(shallow_ratio, exit_layer, model.num_layers)}


@torch.no_grad()
def early_exit_forward(
    model: DeepSupervisionTransformer, x: torch.Tensor, threshold: float | None, exit_layer: int | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Early-exit inference that skips the deeper layers' work for confident tokens.

    See the module docstring for the rule. Unlike the original description's selection-only routing, non-exited
    tokens attend to exited tokens' propagated exit-layer states, so their logits differ from
    the full model's whenever any earlier token exited.

    Args:
        model: a :class:`DeepSupervisionTransformer`.
        x: token ids ``(B, T)``.
        threshold: exit when confidence ``>= threshold``, in [0, 1] (0: every token exits);
            ``None``: none does, and the result is :meth:`forward`'s.
        exit_layer: in ``[1, num_layers - 1]``; default ``model.exit_layer``.

    Returns:
        ``(logits (B, T, V), stats)``: ``shallow_ratio``; ``compute_cost`` (:func:`compute_cost`); ``flop_ratio``,
        matmul FLOPs executed (exit head, exited tokens' deeper keys/values, padding included)
        over those of the full forward.
    """
    threshold = check_threshold(threshold)
    exit_layer = check_exit_layer(model.exit_layer if exit_layer is None else exit_layer, model.num_layers)
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"input ids must have shape (batch >= 1, seq_len >= 1); got {tuple(x.shape)}")
    logits, exited, (routed, full) = early_exit_step(model, x, threshold, exit_layer)
    shallow = exited.float().mean().item()
    return logits, {
        "shallow_ratio": shallow,
        "compute_cost": compute_cost(shallow, exit_layer, model.num_layers),
        "flop_ratio": routed / full,
    }


def _exit_statistics(
    model: DeepSupervisionTransformer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], exit_layer: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exit-layer confidence and correctness of the exit and last layers over labelled tokens."""
    confidences, exit_hit, last_hit = [], [], []
    device = model.output_head.weight.device
    for x, y in batches:
        x, y = x.to(device), y.to(device).reshape(-1)
        check_token_ids(y, model.vocab_size, "target value", ignore_index)
        h_exit, h_last = model.hidden_states(x, [exit_layer, model.num_layers])
        valid = y != ignore_index
        # The forward's own confidence on materialised logits, so the threshold splits tokens
        # exactly as early_exit_forward will (the fused fp32 statistics can differ by an ulp).
        exit_logits = model.output_head(h_exit).reshape(-1, model.vocab_size)[valid]  # (N, V)
        confidences.append(confidence(exit_logits))
        exit_hit.append(exit_logits.argmax(-1) == y[valid])
        last_hit.append(model.output_head(h_last).reshape(-1, model.vocab_size)[valid].argmax(-1) == y[valid])
    if not confidences or not sum(c.numel() for c in confidences):
        raise ValueError("batches held no token with a label")
    return torch.cat(confidences), torch.cat(exit_hit).double(), torch.cat(last_hit).double()


@torch.no_grad()
def calibrate_threshold(
    model: DeepSupervisionTransformer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    exit_layer: int,
    target_shallow_ratio: float | None = None,
    max_accuracy_drop: float | None = None,
    ignore_index: int = -100,
) -> float | None:
    """Pick a routing threshold on held-out ``(x, y)`` batches; give exactly one target.

    Args:
        model: a :class:`DeepSupervisionTransformer`.
        batches: held-out ``(x, y)`` pairs ``(B, T)``; tokens with ``y == ignore_index`` are
            left out.
        exit_layer: in ``[1, num_layers - 1]``.
        target_shallow_ratio: in [0, 1]: the threshold at which this fraction of the tokens has
            exit confidence ``>= threshold`` (ties may add a few).
        max_accuracy_drop: in [0, 1]: the lowest threshold whose *selection-based* accuracy
            (the original description's ``Trainer.evaluate`` rule: exited tokens scored with the exit layer's
            prediction, the rest with the last layer's, all layers computed normally) is at
            least the last layer's accuracy minus this drop. The early-exit path
            (:func:`early_exit_forward`) can score a little differently, since deep tokens see
            propagated states; check it on the chosen threshold.

    Returns:
        The threshold, or ``None`` (routing off) when no token should exit.
    """
    if (target_shallow_ratio is None) == (max_accuracy_drop is None):
        raise ValueError("give exactly one of target_shallow_ratio and max_accuracy_drop")
    for name, value in (("target_shallow_ratio", target_shallow_ratio), ("max_accuracy_drop", max_accuracy_drop)):
        if value is not None:
            check_real(name, value, 0.0, 1.0)
    check_exit_layer(exit_layer, model.num_layers)
    confidences, exit_hit, last_hit = _exit_statistics(model, batches, exit_layer, ignore_index)
    order = confidences.argsort(descending=True)
    ranked = confidences[order]  # (N,) fp32, most confident first: exiting the top k tokens
    N = ranked.numel()
    if target_shallow_ratio is not None:
        k = round(target_shallow_ratio * N)
    else:
        # Selection accuracy with the top k exiting = last-layer accuracy + cumulative gain.
        gain = torch.cat((exit_hit.new_zeros(1), (exit_hit[order] - last_hit[order]).cumsum(0)))  # (N+1,)
        ok = gain / N >= -max_accuracy_drop - 1e-12  # (N+1,)
        # Only cut between distinct confidences: a threshold cannot split tied tokens.
        ok[1:N] &= ranked[:-1] > ranked[1:]
        k = int(ok.nonzero().max())
    return float(ranked[k - 1]) if k else None
