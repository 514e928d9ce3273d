"""Transformer language models with one output head shared by every layer.

Layout (fixed so reference checkpoints load): ``embedding`` → ``layers`` (post-norm
:class:`TransformerBlock`) → ``output_head`` (``Linear(dim, vocab, bias=False)``), no final norm.
Any layer's hidden state goes through the same head, which is what makes layer-wise supervision
and early exit possible. Layers are numbered from 1 in every public method.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lash import generation, routing
from lash.modules import TransformerBlock
from lash.validation import check_int, check_optional_int, check_real, check_token_ids


class StandardTransformer(nn.Module):
    """A decoder-only LM; trained conventionally it uses only the last layer's output.

    Args:
        vocab_size: number of token ids.
        dim: model width.
        num_layers: number of transformer blocks.
        num_heads: attention heads per block.
        ffn_dim: FFN hidden width (default ``4 * dim``).
        max_seq_len: the longest input sequence accepted.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 64,
        num_layers: int = 3,
        num_heads: int = 4,
        ffn_dim: int | None = None,
        max_seq_len: int = 1024,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("num_layers", num_layers),
                            ("num_heads", num_heads), ("max_seq_len", max_seq_len)):  # fmt: skip
            check_int(name, value, 1)
        check_optional_int("ffn_dim", ffn_dim, 1)
        self.vocab_size = vocab_size
        self.dim = dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.max_seq_len = max_seq_len
        self.embedding = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(TransformerBlock(dim, num_heads, ffn_dim, max_seq_len) for _ in range(num_layers))
        self.output_head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=1.0 / math.sqrt(self.dim))
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=0.02)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Check the input ids and embed them: ``(B, T)`` → ``(B, T, D)``."""
        if x.dim() != 2:
            raise ValueError(f"input ids must have shape (batch, seq_len); got {tuple(x.shape)}")
        if not 1 <= x.shape[1] <= self.max_seq_len:
            raise ValueError(f"sequence length {x.shape[1]} is outside [1, max_seq_len={self.max_seq_len}]")
        check_token_ids(x, self.vocab_size)
        return self.embedding(x)

    def hidden_states(self, x: torch.Tensor, layers: Iterable[int] | None = None) -> list[torch.Tensor]:
        """Hidden states after the given layers, running no layer deeper than the deepest asked.

        Args:
            x: token ids ``(B, T)``.
            layers: 1-based layer indices (default: all layers).

        Returns:
            One ``(B, T, D)`` tensor per requested layer, in the order requested.
        """
        wanted = list(range(1, self.num_layers + 1)) if layers is None else list(layers)
        if not wanted:
            raise ValueError("layers must name at least one layer")
        for layer in wanted:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= self.num_layers:
                raise ValueError(f"layer {layer!r} is outside [1, {self.num_layers}]")
        h = self.embed(x)  # (B, T, D)
        kept: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.layers[: max(wanted)], start=1):
            h = block(h)
            if index in wanted:
                kept[index] = h
        return [kept[layer] for layer in wanted]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the last layer, ``(B, T, V)``."""
        return self.output_head(self.hidden_states(x, [self.num_layers])[0])

    def forward_all_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every layer through the shared head: a list of ``num_layers`` ``(B, T, V)``."""
        return [self.output_head(h) for h in self.hidden_states(x)]


class DeepSupervisionTransformer(StandardTransformer):
    """A :class:`StandardTransformer` whose intermediate layers are trained and can answer early.

    Args:
        exit_layer: the layer confident tokens exit at in :meth:`forward_inference`.
        routing_threshold: the confidence (max softmax probability) needed to exit, in [0, 1].
        Other arguments as :class:`StandardTransformer`.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 64,
        num_layers: int = 3,
        num_heads: int = 4,
        ffn_dim: int | None = None,
        max_seq_len: int = 1024,
        exit_layer: int = 1,
        routing_threshold: float = 0.8,
    ) -> None:
        super().__init__(vocab_size, dim, num_layers, num_heads, ffn_dim, max_seq_len)
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer <= num_layers:
            raise ValueError(f"exit_layer={exit_layer!r} is outside [1, {num_layers}]")
        check_real("routing_threshold", routing_threshold, 0.0, 1.0)
        self.exit_layer = exit_layer
        self.routing_threshold = routing_threshold

    def compute_confidence(self, h: torch.Tensor) -> torch.Tensor:
        """Max softmax probability of the shared head at hidden state ``h``: ``(B, T, D)`` → ``(B, T)``."""
        return F.softmax(self.output_head(h).float(), dim=-1).amax(dim=-1)

    def forward_train(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every layer (for deep supervision), as :meth:`forward_all_layers`."""
        return self.forward_all_layers(x)

    @torch.no_grad()
    def forward_inference(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Two-stage routing: confident tokens take the exit layer's logits, the rest the last layer's.

        Every token still attends over the full sequence, so the deeper layers run for the whole
        sequence unless every token exits (then they are skipped). ``compute_cost`` is the seed's
        accounting, (shallow · exit_layer + deep · num_layers) / (tokens · num_layers).

        Returns:
            ``(logits (B, T, V), stats)`` with ``shallow_ratio`` and ``compute_cost``.
        """
        h = self.hidden_states(x, [self.exit_layer])[0]  # (B, T, D)
        shallow_logits = self.output_head(h)  # (B, T, V)
        confidence = F.softmax(shallow_logits.float(), dim=-1).amax(dim=-1)  # (B, T)
        exits = confidence >= self.routing_threshold if self.routing_threshold > 0 else torch.zeros_like(confidence, dtype=torch.bool)
        shallow_ratio = exits.float().mean().item()
        if shallow_ratio < 1.0:
            for block in self.layers[self.exit_layer :]:
                h = block(h)
            logits = torch.where(exits.unsqueeze(-1), shallow_logits, self.output_head(h))
        else:
            logits = shallow_logits
        compute_cost = (shallow_ratio * self.exit_layer + (1 - shallow_ratio) * self.num_layers) / self.num_layers
        return logits, {"shallow_ratio": shallow_ratio, "compute_cost": compute_cost}

    def forward_early_exit(
        self, x: torch.Tensor, routing_threshold: float | None = None, exit_layer: int | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Real early exit: the deeper layers run only for tokens that did not exit.

        Exited tokens keep their exit-layer state (CALM's state propagation): deeper layers see
        their keys/values from it, so deep tokens' logits differ from :meth:`forward_inference`,
        which selects after running every layer for every token. See :mod:`lash.routing`.

        Args:
            x: token ids ``(B, T)``.
            routing_threshold: exit when confidence ``>= threshold``, any number >= 0 (0: all
                exit; > 1: none); default ``self.routing_threshold``.
            exit_layer: in ``[1, num_layers - 1]``; default ``self.exit_layer``.

        Returns:
            ``(logits (B, T, V), stats)`` with ``shallow_ratio``, ``compute_cost``, ``flop_ratio``.
        """
        threshold = self.routing_threshold if routing_threshold is None else routing_threshold
        return routing.early_exit_forward(self, x, threshold, self.exit_layer if exit_layer is None else exit_layer)

    def generate(
        self,
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
        """Autoregressive decoding with a KV cache: plain, early-exit or self-speculative.

        See :func:`lash.generation.generate` for the modes and arguments; ``exit_layer``
        defaults to ``self.exit_layer``.

        Returns:
            ``(B, T0 + max_new_tokens)`` token ids, and a stats dict with ``return_stats``.
        """
        return generation.generate(
            self, input_ids, max_new_tokens, temperature, top_k, self.exit_layer if exit_layer is None else exit_layer,
            routing_threshold, speculative, draft_tokens, generator, return_stats,
        )
