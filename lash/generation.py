"""Decoding LASH models: :func:`generate`, and the argument checks both ``generate`` functions share.

The model takes part in :mod:`lash.decoding`'s engine through :class:`lash.decoding_parts.LashParts`
(its own blocks over a static KV cache); on CUDA its short layer calls replay CUDA graphs
(:mod:`lash.cuda_graphs`).
"""

from __future__ import annotations

from numbers import Integral
from typing import TYPE_CHECKING

import torch

from lash import captured, cuda_graphs
from lash.decoding import DEEP_FILLS, EXIT_BATCHING, Sampler, Stop, decode
from lash.decoding_parts import LashParts
from lash.exit_rule import ExitRule
from lash.validation import check_bool, check_exit_layer, check_index, check_int, check_real, check_threshold, check_token_ids

if TYPE_CHECKING:
    from lash.models import DeepSupervisionTransformer


def check_prompts(input_ids: torch.Tensor, vocab_size: int) -> None:
    """``ValueError`` unless ``input_ids`` is a non-empty ``(batch, prompt_len)`` tensor of ids in
    ``[0, vocab_size)``, of any integer dtype (both ``generate`` functions decode them as int64)."""
    tensor = isinstance(input_ids, torch.Tensor)
    integer = tensor and not (input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool)
    if not integer or input_ids.dim() != 2 or 0 in input_ids.shape:
        got = f"{input_ids.dtype} of shape {tuple(input_ids.shape)}" if tensor else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty integer tensor (batch, prompt_len); got {got}")
    check_token_ids(input_ids, vocab_size)


def _check(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, draft_tokens, generator) -> None:
    check_prompts(input_ids, model.vocab_size)
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
    cuda_graphs: bool | None = None,
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
        cuda_graphs: replay each short layer call as a CUDA graph, captured once per model, batch
            and cache length (:mod:`lash.cuda_graphs`); ``None``: when the model is on CUDA.

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
    parts = _parts(model, device, cuda_graphs)
    input_ids = input_ids.to(device, torch.long)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    with parts.serving():
        out, stats = decode(
            parts, input_ids, mask, stopping(max_new_tokens, eos_token_id, pad_token_id, model.vocab_size, device),
            Sampler(temperature, top_k, top_p, generator), mode=mode, exit_layer=exit_layer,
            routing_threshold=check_threshold(routing_threshold), draft_tokens=draft_tokens, deep_fill=deep_fill,
            exit_batching=exit_batching,
        )  # fmt: skip
    return (out, stats) if return_stats else out


def _parts(model: DeepSupervisionTransformer, device: torch.device, graphs: bool | None) -> LashParts:
    """The model's parts for the engine: graphed where ``graphs`` asks (``None``: wherever they can be)."""
    return cuda_graphs.GraphedParts(model) if captured.wanted(graphs, device) else LashParts(model)
