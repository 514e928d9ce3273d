"""Where a Hugging Face decoder-only causal LM keeps its parts, and running its decoder to a layer.

Every supported family (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma without softcapping) has the
same shape: ``model.get_decoder()`` embeds, runs ``layers`` and applies ``norm``; the causal-LM
model maps the normed state through ``lm_head`` and nothing else. Layer ``l`` (1..L, as in LASH)
is the residual stream after decoder layer ``l``; its exit is ``head(norm(h_l))``.

:func:`decoder_hidden_states` reads hidden states with forward hooks (installed once, idle
outside a run) and stops the decoder
after the deepest requested layer by lowering ``config.num_hidden_layers`` for the call: the
decoders loop over ``layers[: config.num_hidden_layers]``, so no forward is copied. The value is
restored in a ``finally`` (so after an exception too); under ``torch.compile`` Dynamo traces the
attribute store as a side effect and guards on the value, so a training step stays one graph.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

# Config fields that make the logits something other than ``lm_head(norm(h))`` when set.
HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")


class DecoderParts(NamedTuple):
    """The pieces of a causal LM that LASH's exits need."""

    backbone: nn.Module  # the decoder: embeddings → layers → final norm
    embed: nn.Module  # input embeddings (their weight is the head's when tied)
    layers: nn.ModuleList  # decoder layers; layer l is layers[l - 1]
    norm: nn.Module  # final norm, applied once to the last layer by the backbone
    head: nn.Linear  # shared output head [V, D], no bias


@functools.cache
def _takes_cache(fn: object) -> bool:
    return "cache" in inspect.signature(fn).parameters


def cache_keyword(fn: object) -> str:
    """The keyword ``fn`` takes a KV cache under: ``cache`` in current transformers releases,
    ``past_key_values`` in older ones (which newer ones still take, with a deprecation warning)."""
    return "cache" if _takes_cache(getattr(fn, "__func__", fn)) else "past_key_values"


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _refuse(model: nn.Module, reason: str) -> ValueError:
    return ValueError(f"lash.hf cannot serve model_type={_model_type(model)!r} exactly: {reason}")


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Find backbone, embeddings, layers, final norm and head of a decoder-only causal LM.

    Args:
        model: a ``transformers`` ``*ForCausalLM`` (``PreTrainedModel``) instance.

    Raises:
        ValueError: naming the model type and the reason, when the model is an encoder-decoder,
            misses one of the parts, has a head with a bias, or transforms its logits after
            the head (``final_logit_softcapping``, ``logit_scale``, ... set in its config).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_decoder"):
        raise _refuse(model, "not a transformers PreTrainedModel (no config / get_decoder)")
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(model, "encoder-decoder models are not decoder-only causal LMs")
    for name in HEAD_TRANSFORMS:
        if getattr(config, name, None) is not None or getattr(model, name, None) is not None:
            raise _refuse(model, f"{name} is set, so its logits are not lm_head(norm(h)) and the fused loss would differ")
    backbone = model.get_decoder()
    layers, norm = getattr(backbone, "layers", None), getattr(backbone, "norm", None)
    if not isinstance(layers, nn.ModuleList) or not isinstance(norm, nn.Module):
        raise _refuse(model, f"its decoder {type(backbone).__name__} has no `layers` ModuleList and final `norm`")
    if len(layers) != config.num_hidden_layers:
        raise _refuse(model, f"{len(layers)} decoder layers but config.num_hidden_layers={config.num_hidden_layers}")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise _refuse(model, f"the output head {type(head).__name__} is not an nn.Linear without bias")
    return DecoderParts(backbone, model.get_input_embeddings(), layers, norm, head)


@contextlib.contextmanager
def truncated(backbone: nn.Module, depth: int) -> Iterator[None]:
    """Within the block, ``backbone`` runs only its first ``depth`` layers (restored on exit).

    The block must call the backbone itself: the config is shared with the whole model, so
    nothing else should run inside it.
    """
    config = backbone.config
    full = config.num_hidden_layers
    if not 1 <= depth <= full:
        raise ValueError(f"depth={depth} must be in [1, {full}]")
    config.num_hidden_layers = depth
    try:
        yield
    finally:
        config.num_hidden_layers = full


class _Recorder:
    """The layers wanted in the current decoder run and their outputs; the hooks write here."""

    def __init__(self) -> None:
        self.wanted: frozenset[int] = frozenset()
        self.record: dict[int, torch.Tensor] = {}


def _record(recorder: _Recorder, layer: int, module: nn.Module, args: tuple, output) -> None:
    if layer in recorder.wanted:
        recorder.record[layer] = output[0] if isinstance(output, tuple) else output  # (B, T, D)


def layer_recorder(layers: nn.ModuleList) -> _Recorder:
    """The recorder of ``layers``, installing its forward hooks on the first call.

    The hooks stay (they do nothing outside :func:`recording`), so a compiled model never sees
    a hook registered, which ``torch.compile`` cannot trace without breaking the graph.
    """
    recorder = getattr(layers, "_lash_recorder", None)
    if recorder is None:
        recorder = _Recorder()
        for layer, block in enumerate(layers, start=1):
            block.register_forward_hook(functools.partial(_record, recorder, layer))
        layers._lash_recorder = recorder
    return recorder


@contextlib.contextmanager
def recording(layers: nn.ModuleList, wanted: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the outputs of layers ``wanted`` (1-based) into the yielded dict while inside the block."""
    recorder = layer_recorder(layers)
    recorder.wanted, recorder.record = frozenset(wanted), {}
    try:
        yield recorder.record
    finally:
        recorder.wanted, recorder.record = frozenset(), {}


class DecoderRun(NamedTuple):
    """What :func:`decoder_hidden_states` returns."""

    hiddens: dict[int, torch.Tensor]  # layer → (B, T, D) un-normed residual stream after it
    last_normed: torch.Tensor  # (B, T, D) norm(h_deepest): the backbone's own output
    output: object  # the backbone's output object (BaseModelOutputWithPast)


def decoder_hidden_states(model: nn.Module, layers: Sequence[int], **inputs) -> DecoderRun:
    """Run the decoder of ``model`` up to the deepest of ``layers`` and return their hidden states.

    Layers deeper than ``max(layers)`` do not run. No KV cache is built (``use_cache=False``).

    Args:
        model: a causal LM :func:`decoder_parts` accepts.
        layers: 1-based layer numbers in ``[1, L]``.
        **inputs: the backbone's inputs (``input_ids``, ``attention_mask``, ``position_ids``, ...).

    Returns:
        :class:`DecoderRun`; ``hiddens`` holds every requested layer, un-normed.
    """
    parts = decoder_parts(model)
    wanted = sorted(set(layers))
    if not wanted or not 1 <= wanted[0] <= wanted[-1] <= len(parts.layers):
        raise ValueError(f"layers={list(layers)} must be a non-empty list of layers in [1, {len(parts.layers)}]")
    with truncated(parts.backbone, wanted[-1]), recording(parts.layers, wanted) as record:
        output = parts.backbone(**inputs, use_cache=False)
        hiddens = dict(record)
    return DecoderRun(hiddens, output.last_hidden_state, output)
