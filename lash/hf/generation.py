"""Decoding Hugging Face decoder-only causal LMs: the adapter of :mod:`lash.decoding`'s engine.

The modes, rules, sampler, stopping and stats are the engine's, shared with LASH models
(:func:`lash.generation.generate` takes the same arguments). :class:`HFParts` steps the model's
own decoder layers over one ``DynamicCache`` (or, with ``cache_implementation="static"``, a
``StaticCache`` preallocated for the whole call, as ``model.generate`` offers): it builds the rotary tables and causal masks for
the positions it runs (``create_causal_mask``, so left padding and sliding windows work as in
``model.generate``), and exits pass through the model's final norm before the head
(``lm_head(norm(h))``). Plain and self-speculative greedy output equal
``model.generate(do_sample=False)``.

A dynamic cache grows per layer, so early exit's deep layers simply lag behind while tokens
exit, and the next step that goes deep appends every pending position. ``deep_fill="propagate"``
fills them from the exit state at once instead; a decoder layer has no keys/values-only call,
so that runs the deep layers over the frozen state and drops their output. Self-speculative
decoding crops every layer back to the kept length after each verification.

Supported: families whose backbone forward is ``embed → layers (one rotary embedding, full or
sliding-window causal masks) → norm`` and whose logits are ``head(norm(h))`` (Llama, Mistral,
Qwen2, Qwen3, Phi-3); softcapped or scaled logits (Gemma 2/3, Cohere, Granite) and embeddings
scaled inside the backbone (Gemma) are refused.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lash import captured
from lash.captured import cuda_graph, outside_inference_mode
from lash.cuda_graphs import MAX_GRAPH_ROWS, Capture, Inputs, graphs_for
from lash.decoding import DecodeState, LayerParts, Sampler, Step, decode
from lash.exit_rule import ExitRule
from lash.generation import check_attention_mask, check_exit, check_prompts, check_sampling, decoding_mode, stopping
from lash.hf.structure import DecoderParts, cache_keyword, decoder_parts
from lash.validation import check_bool, check_int, check_threshold


def _parts(model: nn.Module) -> DecoderParts:
    """:func:`lash.hf.structure.decoder_parts`, plus what stepping the layers by hand needs:
    the backbone's ``rotary_emb``, and embeddings the backbone does not rescale (Gemma does)."""
    parts = decoder_parts(model)
    if not hasattr(parts.backbone, "rotary_emb"):
        raise ValueError(f"{type(model).__name__} has no backbone.rotary_emb: lash.hf.generate steps RoPE decoders only")
    if "gemma" in str(getattr(model.config, "model_type", "")):
        raise ValueError(f"model_type={model.config.model_type!r} scales its embeddings inside the backbone; lash.hf.generate does not")
    return parts


CACHES = ("dynamic", "static")
GRAPHED_ATTENTION = ("sdpa", "eager")  # attention that takes a 4-D mask: no length read on the host


class HFParts(LayerParts):
    """:class:`lash.decoding.Parts` of a Hugging Face causal LM.

    Args:
        model: a decoder-only ``*ForCausalLM`` in eval mode.
        cache_implementation: ``"dynamic"`` (a ``DynamicCache`` grown per layer) or ``"static"``
            (a ``StaticCache`` of the call's full length; full-attention models only).
    """

    def __init__(self, model: nn.Module, cache_implementation: str = "dynamic") -> None:
        self.model, self.parts = model, _parts(model)
        self.num_layers = len(self.parts.layers)
        from transformers import DynamicCache

        if cache_implementation not in CACHES:
            raise ValueError(f"cache_implementation={cache_implementation!r} must be one of {', '.join(CACHES)}")
        # A sliding window counts cache columns, so a row with holes would see fewer tokens in it.
        self.holes = not any(DynamicCache(config=model.config).is_sliding)
        self.static = cache_implementation == "static"
        if self.static and not self.holes:
            raise ValueError(
                f"cache_implementation='static' needs full-attention layers; {type(model).__name__} has sliding-window "
                "layers: use 'dynamic'"
            )

    def new_cache(self, batch: int, slots: int):
        from transformers import DynamicCache, StaticCache

        if self.static:  # its layers allocate on their first write, in the model's dtype and device
            cache = StaticCache(config=self.model.config, max_cache_len=slots)
        else:
            cache = DynamicCache(config=self.model.config)
            cache.activate_past_recording()  # sliding-window layers must be able to roll back rejected drafts
        if len(cache.layers) != self.num_layers:
            raise ValueError(f"the cache has {len(cache.layers)} layers for {self.num_layers} decoder layers")
        return cache

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.parts.embed(ids)

    def run(self, h: torch.Tensor, start: int, positions: torch.Tensor, layers: range, state: DecodeState,
            frozen: torch.Tensor | None = None, outputs: int | None = None) -> torch.Tensor:  # fmt: skip
        end = start + h.shape[1]  # the cache length after the call
        h = self.layers(h, positions, layers, state.cache, state.valid[:, :end], frozen)  # a decoder layer runs every token
        return h if outputs is None else h[:, h.shape[1] - outputs :]

    def layers(self, h: torch.Tensor, positions: torch.Tensor, layers: range, cache, valid: torch.Tensor,
               frozen: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """:meth:`run` over the columns whose validity ``valid`` (B, ≥ end) gives; each layer of
        ``cache`` appends at its own length."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        parts = self.parts
        rotary = parts.backbone.rotary_emb(h, positions)  # (cos, sin), each (B, n, head_dim)
        masks: dict[bool, object] = {}  # sliding? → the mask, sized by the first such layer's cache
        start = h
        for i in layers:
            sliding = cache.is_sliding[i]
            if sliding not in masks:
                make = create_sliding_window_causal_mask if sliding else create_causal_mask
                masks[sliding] = make(
                    config=self.model.config, inputs_embeds=h, attention_mask=valid.long(), position_ids=positions,
                    layer_idx=i, allow_is_causal_skip=False, **{cache_keyword(make): cache},
                )  # fmt: skip  # a skip would be decided by reading the mask back: a host read
            layer = parts.layers[i]
            out = layer(h, attention_mask=masks[sliding], position_embeddings=rotary, position_ids=positions,
                        use_cache=True, **{cache_keyword(layer.forward): cache})  # fmt: skip
            h = out[0] if isinstance(out, tuple) else out  # (B, n, D)
            if frozen is not None:
                h = torch.where(frozen[..., None], start, h)
        return h

    def fill(self, h: torch.Tensor, start: int, positions: torch.Tensor, layers: range, state: DecodeState) -> None:
        frozen = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        self.step(h, start, positions, layers, state, frozen, heads=0)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.parts.head(self.parts.norm(h))

    def serving(self) -> contextlib.AbstractContextManager:
        """What a whole decoding call runs under: nothing here."""
        return contextlib.nullcontext()

    def keep(self, state: DecodeState, slots: int) -> None:
        if self.static:  # each layer's length is a device counter: set, never read
            for layer in state.cache.layers:
                layer.cumulative_length.fill_(slots)
            return
        extra = state.cache.get_seq_length() - slots  # the layers' lengths are shapes: no host read
        if extra:
            state.cache.crop(-extra)


def _parts_for(model: nn.Module, cache_implementation: str | None, graphs: bool | None) -> HFParts:
    """The model's parts for the engine; ``ValueError`` for a cache and graph choice that do not go together.
    Graphs need a static cache, which sliding-window layers do not take, attention that takes a
    4-D mask, and RoPE frequencies that do not depend on the positions; asked for (``True``) they
    must fit, by default (``None``) they are used where they fit."""
    parts = HFParts(model, cache_implementation or "dynamic")
    asked = captured.wanted(graphs, parts.parts.head.weight.device)
    attention = getattr(model.config, "_attn_implementation", None)
    if graphs and not parts.holes:
        raise ValueError(f"cuda_graphs=True needs a static cache, which {type(model).__name__}'s sliding-window layers do not take")
    if graphs and cache_implementation == "dynamic":
        raise ValueError("cuda_graphs=True needs cache_implementation='static' (or None)")
    if graphs and attention not in GRAPHED_ATTENTION:
        raise ValueError(
            f"cuda_graphs=True needs attn_implementation 'sdpa' or 'eager'; the model uses {attention!r}, whose "
            "varying lengths are read on the host"
        )
    rope = _host_chosen_rope(parts.parts.backbone)
    if graphs and rope:
        raise ValueError(
            f"cuda_graphs=True needs RoPE whose frequencies do not depend on the positions; {type(model).__name__} uses "
            f"{rope!r} RoPE, which picks them on the host from the longest position"
        )
    fits = parts.holes and cache_implementation != "dynamic" and attention in GRAPHED_ATTENTION and not rope
    return GraphedHFParts(model) if asked and fits else parts


def _host_chosen_rope(backbone: nn.Module) -> str | None:
    """The RoPE type of ``backbone`` whose frequencies are chosen on the host from the positions
    (dynamic scaling, longrope: a host read, which a graph cannot capture), or ``None``."""
    types = getattr(getattr(backbone, "rotary_emb", None), "rope_type", None)
    for rope in types.values() if isinstance(types, dict) else [types]:
        if isinstance(rope, str) and ("dynamic" in rope or rope == "longrope"):
            return rope
    return None


class GraphedHFParts(HFParts):
    """:class:`HFParts` over a ``StaticCache`` whose short layer calls replay CUDA graphs
    (:mod:`lash.cuda_graphs`), captured once per model, batch and cache length. A graph first sets
    the lengths of the layers it runs to the call's first column (a device copy), so each replay,
    and the warm-up before a capture, appends where the engine writes. The prefill runs eagerly:
    it allocates the cache's layers on their first write."""

    capture: Capture = staticmethod(cuda_graph)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, "static")

    def serving(self) -> contextlib.AbstractContextManager:
        return outside_inference_mode()

    def new_cache(self, batch: int, slots: int):
        dim = self.parts.head.weight.shape[1]
        self.graphs = graphs_for(self.model, batch, slots, lambda columns: super(GraphedHFParts, self).new_cache(batch, columns), dim)
        self.graphs.begin()
        self.graphs.cache.reset()  # in place: the graphs keep reading the same tensors
        return self.graphs.cache

    def step(self, x: torch.Tensor, start: int, positions: torch.Tensor, layers: range, state: DecodeState,
             frozen: torch.Tensor | None = None, heads: int = 1) -> Step:  # fmt: skip
        if start == 0 or x.shape[1] > MAX_GRAPH_ROWS:
            return super().step(x, start, positions, layers, state, frozen, heads)
        return self.graphs.step(self, x, start, positions, layers, state, frozen, heads, self.graphs.slots,
                                x.shape[1])  # fmt: skip  # a static layer appends every row: no padding

    def graph_layers(self, inputs: Inputs, layers: range, frozen: bool, reach: int, embed: bool):  # a static cache is read whole
        graphs, layer_call = self.graphs, super().layers

        def run_layers() -> torch.Tensor:  # every column's validity: the causal mask hides those ahead
            for i in layers:
                graphs.cache.layers[i].cumulative_length.copy_(graphs.first)
            h = self.embed(inputs.ids) if embed else inputs.h
            return layer_call(h, inputs.positions, layers, graphs.cache, graphs.valid, inputs.frozen if frozen else None)

        return run_layers


@torch.no_grad()
def generate(
    model: nn.Module,
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
    cache_implementation: str | None = None,
    cuda_graphs: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """Decode a Hugging Face causal LM: plain, early exit or self-speculative (:mod:`lash.decoding`).

    The arguments are :func:`lash.generation.generate`'s. A Hugging Face model has no exit layer
    of its own: pass ``exit_layer`` for early exit and self-speculative decoding. ``pad_token_id``
    defaults to ``model.generation_config.pad_token_id``, then to the first EOS id.
    ``cache_implementation``: ``"dynamic"`` or ``"static"`` (preallocated for the call;
    full-attention models only), as ``model.generate`` takes it; ``None``: static with CUDA graphs,
    else dynamic. ``cuda_graphs``: replay short layer calls as CUDA graphs over a static cache
    (:mod:`lash.cuda_graphs`); ``None``: on CUDA for full-attention models.

    Returns:
        ``(B, T0 + n)`` ids, ``n <= max_new_tokens`` (fewer only when every row hit an EOS),
        plus the stats with ``return_stats``.
    """
    parts = _parts_for(model, cache_implementation, cuda_graphs)
    if isinstance(routing_threshold, ExitRule):  # the rule carries its own exit layer
        exit_layer, routing_threshold = routing_threshold.exit_layer, routing_threshold.threshold
    mode = decoding_mode(speculative, routing_threshold, deep_fill, exit_batching)
    check_exit(exit_layer, parts.num_layers, mode)
    check_int("max_new_tokens", max_new_tokens, 0)
    check_int("draft_tokens", draft_tokens, 1)
    vocab_size = parts.parts.head.weight.shape[0]
    check_prompts(input_ids, vocab_size)
    check_bool("return_stats", return_stats)
    check_sampling(temperature, top_k, top_p, generator, vocab_size)
    check_attention_mask(attention_mask, input_ids)
    device = parts.parts.head.weight.device
    input_ids = input_ids.to(device, torch.long)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    pad = model.generation_config.pad_token_id if pad_token_id is None else pad_token_id
    with parts.serving():
        out, stats = decode(
            parts, input_ids, mask, stopping(max_new_tokens, eos_token_id, pad, vocab_size, device),
            Sampler(temperature, top_k, top_p, generator), mode=mode, exit_layer=exit_layer,
            routing_threshold=check_threshold(routing_threshold), draft_tokens=draft_tokens, deep_fill=deep_fill,
            exit_batching=exit_batching,
        )  # fmt: skip
    return (out, stats) if return_stats else out
