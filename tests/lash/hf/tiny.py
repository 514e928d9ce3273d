"""Tiny random Hugging Face causal LMs of every family lash.hf supports, and the loss reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers

VOCAB, LAYERS = 64, 3

# family → (config class, model class, extra config fields)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),  # scaled embeddings live in the backbone: exact
}


def tiny_model(family: str, **fields) -> torch.nn.Module:
    """A float32 ``family`` causal LM with 3 layers, D=32, V=64, built without any download."""
    config_class, model_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
        pad_token_id=2, **extra | fields,
    )  # fmt: skip
    return getattr(transformers, model_class)(config).float().train()


def batch(rows: int = 2, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(input_ids, labels)`` (B, T) with a few ignored labels."""
    input_ids = torch.randint(0, VOCAB, (rows, length))  # (B, T)
    labels = input_ids.clone()
    labels[0, :2] = -100
    return input_ids, labels


def reference_loss(model, input_ids, labels, weights: dict[int, float], num_items=None) -> torch.Tensor:
    """Σ_l w_l · CE(head(norm(h_l)), shifted labels) from ``output_hidden_states`` and full logits.

    ``hs[L]`` already has the final norm, so the last layer's exit is not normed again.
    """
    out = model(input_ids=input_ids, output_hidden_states=True)  # no labels: the model's own forward
    hs = out.hidden_states  # L + 1 × (B, T, D)
    norm, head = model.get_decoder().norm, model.get_output_embeddings()
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)  # (N,)
    total = 0.0
    for layer, weight in weights.items():
        normed = hs[layer] if layer == len(hs) - 1 else norm(hs[layer])  # (B, T, D)
        logits = head(normed).reshape(-1, VOCAB).float()  # (N, V)
        if num_items is None:
            total = total + weight * F.cross_entropy(logits, targets)
        else:
            total = total + weight * F.cross_entropy(logits, targets, reduction="sum") / num_items
    return total


def grads(model) -> list[torch.Tensor]:
    """Every parameter's gradient (zeros where none), then cleared."""
    out = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out
