"""LASH's layer-wise loss on a Hugging Face causal LM: :func:`apply_lash` patches its forward.

With ``labels`` the patched forward runs the decoder only up to the deepest weighted layer
(:func:`~lash.hf.structure.decoder_hidden_states`), normalises each exit with the model's own
final norm (the deepest exit of a full-depth config is the backbone's output, normed once) and
sends them all through :func:`lash_kernels.multi_exit_cross_entropy` with the shared head: no
``[tokens, vocab]`` logits are formed. Without ``labels`` the model's own forward runs unchanged.

Labels follow Hugging Face's convention: position ``t`` predicts ``labels[t + 1]`` (or
``shift_labels[t]`` when given), ``-100`` carries no loss. ``num_items_in_batch`` (what
``transformers.Trainer`` passes under gradient accumulation) makes each exit's loss a sum over
tokens divided by it, as Hugging Face's own loss does, so accumulated micro-batches add up to the
large batch's loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from lash.config import TrainingConfig
from lash.hf.structure import cache_keyword, decoder_hidden_states, decoder_parts, layer_recorder
from lash_kernels import IGNORE_INDEX, multi_exit_cross_entropy



@dataclass
class LashCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``exit_losses``: layer → detached fp32 mean CE of that exit.

    With labels, ``logits`` is None (never formed) and ``loss`` is LASH's weighted loss.
    """

    exit_losses: dict[int, torch.Tensor] | None = None


@dataclass
class _Patch:
    """What a patched model keeps: the LASH config and the forward it had before."""

    config: TrainingConfig
    inner_forward: MethodType  # bound to the model, so deepcopy rebinds it to the copy


def apply_lash(model: nn.Module, config: TrainingConfig) -> nn.Module:
    """Make ``model``'s loss LASH's: Σ_l w_l · CE(head(norm(h_l)), shifted labels), in place.

    Afterwards ``model(input_ids, labels=..., attention_mask=..., num_items_in_batch=...)``
    returns a :class:`LashCausalLMOutput` (``loss``, ``exit_losses``, no logits); calls without
    ``labels`` behave exactly as before. Applying again replaces the config. Labels mean LASH's
    loss in eval mode too, so ``Trainer.evaluate`` gets the loss but no logits
    (``prediction_loss_only=True``).

    Args:
        model: a decoder-only ``transformers`` causal LM that :func:`~lash.hf.structure.decoder_parts`
            accepts (Llama, Mistral, Qwen2, Qwen3, Phi-3, ...).
        config: LASH's options; layers are numbered 1..L (layer l = output of decoder layer l).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: a model that cannot be served exactly, or a config that does not fit its depth.
    """
    parts = decoder_parts(model)
    _check_config(config)
    config.validate_for(len(parts.layers))
    previous = getattr(model, "_lash_patch", None)
    inner = previous.inner_forward if previous is not None else model.forward
    layer_recorder(parts.layers)  # its hooks now, outside any compiled region
    model._lash_patch = _Patch(config, inner)
    model.forward = MethodType(_lash_forward, model)
    return model


def _check_config(config: object) -> None:
    if not isinstance(config, TrainingConfig):
        raise ValueError(f"config must be a lash.TrainingConfig, got {type(config).__name__}")


def _check_num_items(value: int | torch.Tensor) -> None:
    """``ValueError`` unless ``value`` is a positive int or a one-element tensor holding a positive
    finite number (``transformers.Trainer`` passes a float tensor: the count divided by the
    parallel group sizes).

    A tensor's value is read on the CPU only: on a GPU the check is ``torch._assert_async`` (no
    host sync), and it is skipped while ``torch.compile`` traces.
    """
    allowed = "must be a positive int or a one-element tensor holding a positive number"
    if torch.is_tensor(value):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"num_items_in_batch={value!r} {allowed}")
        if torch.compiler.is_compiling():
            return
        positive = torch.isfinite(value) & (value > 0)
        if value.device.type != "cpu":
            torch._assert_async(positive.reshape(()), f"num_items_in_batch {allowed}")
        elif not bool(positive):
            raise ValueError(f"num_items_in_batch={value.item()} {allowed}")
    elif isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"num_items_in_batch={value!r} {allowed}")


def _lash_forward(
    self: nn.Module,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values=None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    **kwargs,
):
    """The patched forward: the signature of Hugging Face's causal LMs (``Trainer`` reads it)."""
    patch: _Patch = self._lash_patch
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds)
    # Current transformers releases name the KV cache `cache`, older ones `past_key_values`.
    cache = kwargs.pop("cache", None) if past_key_values is None else past_key_values
    if labels is None:
        given = {} if cache is None else {cache_keyword(patch.inner_forward): cache}
        return patch.inner_forward(**inputs, use_cache=use_cache, logits_to_keep=logits_to_keep, **given, **kwargs)
    if cache is not None:
        raise ValueError("lash.hf computes the training loss without a KV cache: pass labels or a cache, not both")
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    kwargs.pop("return_dict", None)
    loss, exit_losses, run = lash_loss(self, patch.config, labels, num_items_in_batch, shift_labels, **inputs, **kwargs)
    return LashCausalLMOutput(
        loss=loss,
        logits=None,
        hidden_states=getattr(run.output, "hidden_states", None),
        attentions=getattr(run.output, "attentions", None),
        exit_losses=exit_losses,
    )


def lash_loss(
    model: nn.Module,
    config: TrainingConfig,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    **inputs,
):
    """LASH's loss of a Hugging Face causal LM on one batch, without logits.

    Args:
        model: a causal LM :func:`~lash.hf.structure.decoder_parts` accepts (patched or not).
        config: the layer weights (validated against the model's depth).
        labels: ``(B, T)`` token ids, ``-100`` where no loss; position t predicts labels[t + 1].
        num_items_in_batch: a positive int or one-element tensor; when given, each exit's CE is summed
            over tokens and divided by it instead of averaged (Hugging Face's gradient-accumulation
            convention); no host sync.
        shift_labels: ``(B, T)`` targets already shifted (position t predicts shift_labels[t]);
            replaces the shift of ``labels``.
        **inputs: the decoder's inputs (``input_ids``, ``attention_mask``, ...).

    Returns:
        ``(loss, exit_losses, run)``: the () fp32 weighted loss, ``{layer: mean CE}`` detached,
        and the :class:`~lash.hf.structure.DecoderRun` of the decoder.
    """
    parts = decoder_parts(model)
    depth = len(parts.layers)
    _check_config(config)
    config.validate_for(depth)
    if num_items_in_batch is not None:
        _check_num_items(num_items_in_batch)
    exits = config.active_layers  # (K,) shallow to deep
    run = decoder_hidden_states(model, exits, **inputs)
    # The backbone norms its last state itself: at full depth that is exit L, never normed twice.
    hiddens = [run.last_normed if layer == depth else parts.norm(run.hiddens[layer]) for layer in exits]  # K × (B, T, D)
    tokens = tuple(hiddens[0].shape[:-1])  # (B, T)
    for name, given in (("labels", labels), ("shift_labels", shift_labels)):
        if given is not None and (not isinstance(given, torch.Tensor) or tuple(given.shape) != tokens):
            shape = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            raise ValueError(f"{name} must have the inputs' shape {tokens}; got {shape}")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # (B, T): position t predicts t + 1
    targets = shift_labels.reshape(-1).to(parts.head.weight.device)  # (N,)
    flat = [h.reshape(-1, h.shape[-1]) for h in hiddens]  # K × (N, D)
    out = multi_exit_cross_entropy(flat, parts.head.weight, targets, [config.weight(layer) for layer in exits], IGNORE_INDEX)
    loss = out.loss
    if num_items_in_batch is not None:
        # The op averages over the valid tokens; Σ CE / num_items = mean · valid / num_items.
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss * ((targets != IGNORE_INDEX).sum() / num_items_in_batch)
    return loss, dict(zip(exits, out.per_exit.unbind())), run
