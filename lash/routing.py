"""Real early exit: confident tokens stop at ``exit_layer`` and the deeper layers skip their work.

The original implementation's routing (:func:`forward_inference`, ``Trainer.evaluate``)
*selects* between the exit layer's and the last layer's predictions after running every layer
for every token. :func:`early_exit_forward` runs the deeper layers only for the tokens that did
not exit:

1. Layers ``1..exit_layer`` run for every token (the training path: fused RoPE, causal SDPA).
   Their confidence (max softmax probability of the shared head) comes from the fused loss
   statistics, which never hold ``[tokens, vocab]`` logits.
2. A token exits when its confidence is ``>= threshold``. Its state stays its exit-layer state
   for good (CALM's state propagation, Schuster et al., 2022): at a deeper layer its key and
   value are that layer's projections of it. They come for every deep layer at once from one
   GEMM over the layers' stacked ``k_proj``/``v_proj`` weights, rotated in one launch.
3. The other tokens are packed per row into a ``(B, W)`` batch (``W`` the most of any row,
   rounded up to a power of two; padding goes to a spare column that no query reads) and run
   through the deeper blocks' own ``forward(h, positions, cache)``: their queries read every
   token's keys of their row up to their own position through one additive mask, each block
   writing the packed tokens' fresh keys and values over the frozen ones.
4. Exited tokens answer with the exit layer's logits, the others with the last layer's.

Deep tokens attend to the propagated (exit-layer) states of exited tokens, not their true deep
states, so the answer differs from the selection-only routing. The call reads back from the
device once: how many tokens go deep, and the most of any row.

Also here: the original implementation's cost accounting (:func:`compute_cost`) and
:func:`calibrate_threshold`, which picks a threshold on held-out batches. The rule itself is
:class:`lash.exit_rule.ExitRule`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from lash.exit_rule import ExitRule, as_rule
from lash.modules import inference_weights
from lash.modules.attention import LayerCache, additive_mask
from lash.validation import check_exit_layer, check_real, check_token_ids
from lash_kernels import IGNORE_INDEX, apply_rotary, values_checked

if TYPE_CHECKING:
    from lash.models import DeepSupervisionTransformer


def _check_input_shape(x: torch.Tensor) -> None:
    """``ValueError`` unless ``x`` holds ids of shape ``(batch >= 1, seq_len >= 1)``: routing
    statistics are ratios over the tokens."""
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"input ids must have shape (batch >= 1, seq_len >= 1); got {tuple(x.shape)}")


def compute_cost(shallow_ratio: float, exit_layer: int, num_layers: int) -> float:
    """The original implementation's cost: (shallow · exit_layer + deep · num_layers) / (tokens · num_layers)."""
    return (shallow_ratio * exit_layer + (1 - shallow_ratio) * num_layers) / num_layers


@torch.no_grad()
def forward_inference(
    model: DeepSupervisionTransformer, x: torch.Tensor, threshold: ExitRule | float | None, exit_layer: int | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The original implementation's two-stage routing: confident tokens take the exit layer's logits, the rest the last layer's.

    Every token still attends over the full sequence, so the deeper layers run for the whole
    sequence unless every token exits (then they are skipped).

    Args:
        model: a :class:`DeepSupervisionTransformer`.
        x: token ids ``(B, T)``, B and T at least 1.
        threshold: an :class:`ExitRule`, or a bare threshold in [0, 1] (exit when confidence
            ``>= threshold``) at ``exit_layer``; ``None``: routing off.
        exit_layer: in ``[1, num_layers - 1]`` with a bare threshold; default ``model.exit_layer``.

    Returns:
        ``(logits (B, T, V), stats)`` with ``shallow_ratio`` and ``compute_cost`` (:func:`compute_cost`).
    """
    _check_input_shape(x)
    if threshold is None or model.num_layers == 1:
        return model(x), {"shallow_ratio": 0.0, "compute_cost": 1.0}
    rule = as_rule(threshold, model.exit_layer if exit_layer is None else exit_layer, model.num_layers)
    exit_layer = rule.exit_layer
    h = model.hidden_states(x, [exit_layer])[0]  # (B, T, D)
    shallow_logits = model.output_head(h)  # (B, T, V)
    exited = rule.exits(model.compute_confidence(h))  # (B, T)
    shallow_ratio = exited.sum().item() / exited.numel()
    if shallow_ratio < 1.0:
        for block in model.layers[exit_layer:]:
            h = block(h)
        logits = torch.where(exited.unsqueeze(-1), shallow_logits, model.output_head(h))
    else:
        logits = shallow_logits
    return logits, {"shallow_ratio": shallow_ratio, "compute_cost": compute_cost(shallow_ratio, exit_layer, model.num_layers)}


def _packed(exited: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-exited tokens of each row, packed to ``(B, width)``: their columns (the spare
    column ``T`` for padding) and whether each slot holds a token."""
    B, T = exited.shape
    order = torch.argsort(exited.to(torch.uint8), dim=1, stable=True)[:, :width]  # (B, W): deep tokens first
    real = torch.arange(width, device=exited.device) < (~exited).sum(dim=1, keepdim=True)  # (B, W)
    return order.masked_fill(~real, T), real


def _frozen_keys_values(model: DeepSupervisionTransformer, h: torch.Tensor, layers: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Every deep layer's keys and values of the exit states ``h`` (B, T+1, D): one GEMM, one
    rotation. Returns two ``(B, Ld·nh, T+1, hs)`` tensors, layer ``l``'s heads at ``[l·nh, (l+1)·nh)``."""
    B, S, D = h.shape
    attn = model.layers[0].attn
    nh, hs = attn.num_heads, attn.head_dim
    stacked = torch.cat([w for i in layers for w in (model.layers[i].attn.k_proj.weight, model.layers[i].attn.v_proj.weight)])
    kv = (h @ stacked.T).view(B, S, len(layers), 2, nh, hs)  # (B, T+1, Ld, 2, nh, hs)
    keys = kv[:, :, :, 0].permute(0, 2, 3, 1, 4).reshape(B, len(layers) * nh, S, hs)
    values = kv[:, :, :, 1].permute(0, 2, 3, 1, 4).reshape(B, len(layers) * nh, S, hs)
    positions = torch.arange(S, device=h.device).clamp_max(S - 2)  # the spare column's key is never read
    with values_checked():  # the tokens' own positions: in range by construction
        keys, _ = apply_rotary(keys, keys[:, :0], attn.rope.cos, attn.rope.sin, positions=positions)
    return keys, values


def _matmul_flops(model: DeepSupervisionTransformer, B: int, T: int, exit_layer: int, deep: int, width: int) -> tuple[int, int]:
    """Matmul FLOPs of :func:`early_exit_forward` and of the full forward on the same ``(B, T)`` tokens.

    Counted: every projection, the attention's QKᵀ and AV (the full forward's causal pairs; the
    packed path's ``W × (T+1)`` pairs, which its masked attention computes), the head (the
    exit statistics for every token, then the logits of each token once).
    """
    D, L, V = model.dim, model.num_layers, model.vocab_size
    ffn = model.layers[0].ffn.w1.out_features
    tokens, proj = B * T, 2 * D * D  # proj: FLOPs per token of one D×D projection
    layer = 4 * proj + 3 * 2 * D * ffn
    causal = tokens * layer + B * T * (T + 1) // 2 * 4 * D
    head = 2 * D * V
    full = L * causal + tokens * head
    routed = exit_layer * causal + 2 * tokens * head
    if deep:
        frozen = B * (T + 1) * 2 * proj  # every token's keys and values, per deep layer
        packed = B * width * (layer + (T + 1) * 4 * D)
        routed += (L - exit_layer) * (frozen + packed)
    return routed, full


@torch.no_grad()
def early_exit_forward(
    model: DeepSupervisionTransformer, x: torch.Tensor, threshold: ExitRule | float | None, exit_layer: int | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Early-exit inference that skips the deeper layers' work for confident tokens.

    See the module docstring for the rule. Unlike the original implementation's selection-only
    routing, non-exited tokens attend to exited tokens' propagated exit-layer states, so their
    logits differ from the full model's whenever any earlier token exited.

    Args:
        model: a :class:`DeepSupervisionTransformer`.
        x: token ids ``(B, T)``, B and T at least 1.
        threshold: an :class:`ExitRule`, or a bare threshold in [0, 1] (exit when confidence
            ``>= threshold``; 0: every token exits) at ``exit_layer``; ``None``: none does, and
            the result is :meth:`forward`'s.
        exit_layer: in ``[1, num_layers - 1]`` with a bare threshold; default ``model.exit_layer``.

    Returns:
        ``(logits (B, T, V), stats)``: ``shallow_ratio``; ``compute_cost`` (:func:`compute_cost`);
        ``flop_ratio``, matmul FLOPs executed (exit statistics, exited tokens' deeper keys and
        values, padding included) over those of the full forward.
    """
    exit_layer = model.exit_layer if exit_layer is None else exit_layer
    rule = as_rule(threshold, exit_layer, model.num_layers)
    exit_layer = check_exit_layer(exit_layer if rule is None else rule.exit_layer, model.num_layers)
    _check_input_shape(x)
    B, T = x.shape
    with inference_weights(model):
        h = model.hidden_states(x, [exit_layer])[0]  # (B, T, D)
        confidence = model.compute_confidence(h)  # (B, T), fused statistics
        exited = rule.exits(confidence) if rule is not None else torch.zeros_like(confidence, dtype=torch.bool)
        count = (~exited).sum(dim=1)  # (B,)
        deep, most = divmod(int(count.sum() * 2**32 + count.max()), 2**32)  # the one host read
        flat = torch.argsort(exited.flatten().to(torch.uint8), stable=True)  # (B·T,): deep tokens first
        logits = h.new_empty(B * T, model.vocab_size)
        shallow = flat[deep:]
        logits[shallow] = model.output_head(h.flatten(0, 1)[shallow])
        width = 0
        if deep:
            width = min(1 << (most - 1).bit_length(), T)  # a power-of-two bucket of query rows
            columns, real = _packed(exited, width)  # (B, W)
            h = torch.cat((h, h.new_zeros(B, 1, h.shape[-1])), dim=1)  # (B, T+1, D): the spare column
            layers = range(exit_layer, model.num_layers)
            keys, values = _frozen_keys_values(model, h, layers)
            allowed = torch.arange(T + 1, device=x.device) <= columns.masked_fill(~real, T - 1)[:, :, None]
            mask = additive_mask(allowed.unsqueeze(1), h.dtype)  # (B, 1, W, T+1)
            positions = columns.masked_fill(~real, 0)
            hd = h.gather(1, columns[:, :, None].expand(-1, -1, h.shape[-1]))  # (B, W, D)
            nh = model.layers[0].attn.num_heads
            for j, i in enumerate(layers):
                heads = slice(j * nh, (j + 1) * nh)
                hd = model.layers[i](hd, positions, LayerCache(keys[:, heads], values[:, heads], columns, mask))
            pick = torch.argsort((~real).flatten().to(torch.uint8), stable=True)[:deep]  # the real slots, in order
            rows = (torch.arange(B, device=x.device)[:, None] * T + columns).flatten()[pick]
            logits.index_copy_(0, rows, model.output_head(hd.flatten(0, 1)[pick]))
    routed, full = _matmul_flops(model, B, T, exit_layer, deep, width)
    shallow_ratio = 1.0 - deep / (B * T)
    stats = {"shallow_ratio": shallow_ratio, "compute_cost": compute_cost(shallow_ratio, exit_layer, model.num_layers),
             "flop_ratio": routed / full}  # fmt: skip
    return logits.view(B, T, -1), stats


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
        # The routing paths' own confidence, so the threshold splits tokens exactly as they will.
        confidences.append(model.compute_confidence(h_exit).reshape(-1)[valid])
        exit_logits = model.output_head(h_exit).reshape(-1, model.vocab_size)[valid]  # (N, V)
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
    ignore_index: int = IGNORE_INDEX,
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
            (the original implementation's ``Trainer.evaluate`` rule: exited tokens scored with the exit layer's
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
