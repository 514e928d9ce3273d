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
from torch import nn

from lash.losses import head_confidence
from lash.modules import TransformerBlock
from lash.exit_rule import ExitRule, routing_rule
from lash.validation import check_exit_layer, check_index, check_int, check_optional_int, check_threshold, check_token_ids


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
        """Check the input ids (any integer dtype) and embed them: ``(B, T)`` → ``(B, T, D)``."""
        if x.dim() != 2:
            raise ValueError(f"input ids must have shape (batch, seq_len); got {tuple(x.shape)}")
        if not 1 <= x.shape[1] <= self.max_seq_len:
            raise ValueError(f"sequence length {x.shape[1]} is outside [1, max_seq_len={self.max_seq_len}]")
        check_token_ids(x, self.vocab_size)
        h = self.embedding(x.long())  # nn.Embedding refuses uint8, int8 and int16 ids
        device = h.device.type
        if torch.is_autocast_enabled(device):
            # The residual stream in the autocast dtype (as Megatron-LM runs it by default): the
            # fused add+norms then take and give bf16, and no cast surrounds any layer's GEMMs.
            h = h.to(torch.get_autocast_dtype(device))
        return h

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
            check_index("layer", layer, 1, self.num_layers)
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

    The routing rule is :mod:`lash.routing`'s: a token exits when its confidence at
    ``exit_layer`` is ``>= routing_threshold``. :func:`lash.routing.forward_inference` (selection),
    :func:`lash.routing.early_exit_forward` (real early exit) and :func:`lash.generation.generate`
    (decoding) take the model as an argument.

    Args:
        exit_layer: the layer confident tokens exit at, in ``[1, num_layers - 1]``.
        routing_threshold: the confidence (max softmax probability) needed to exit, in (0, 1];
            ``None`` or 0 (the original API's "off") for no rule of its own (:attr:`exit_rule`).
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
        routing_threshold: float | None = 0.8,
    ) -> None:
        super().__init__(vocab_size, dim, num_layers, num_heads, ffn_dim, max_seq_len)
        if num_layers > 1:  # a one-layer model has no shallower layer to exit at: it never routes
            check_exit_layer(exit_layer, num_layers)
        self.exit_layer = exit_layer
        self.routing_threshold = check_threshold(routing_threshold)

    @property
    def exit_rule(self) -> ExitRule | None:
        """The model's own early-exit rule, from ``routing_threshold`` and ``exit_layer`` (``None``: off)."""
        return routing_rule(self.routing_threshold, self.exit_layer)

    def compute_confidence(self, h: torch.Tensor) -> torch.Tensor:
        """Max softmax probability of the shared head at hidden state ``h``: ``(B, T, D)`` → ``(B, T)``.

        From the fused statistics (:func:`lash.losses.head_confidence`), as every routing
        decision and evaluation computes it, so they all split tokens the same way.
        """
        return head_confidence(h, self.output_head.weight)

    def forward_train(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every layer (for deep supervision), as :meth:`forward_all_layers`."""
        return self.forward_all_layers(x)
