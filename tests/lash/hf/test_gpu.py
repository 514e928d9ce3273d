"""lash.hf on CUDA with the Triton kernels: an LLM-shaped Llama in bf16 and greedy decoding in fp32."""

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from lash.config import TrainingConfig  # noqa: E402
from lash.hf import apply_lash, generate, use_lash_kernels  # noqa: E402

pytestmark = pytest.mark.gpu
VOCAB, LAYERS = 4096, 4


def _llama(dtype: torch.dtype) -> torch.nn.Module:
    """Head dim 128 and grouped keys, as in Llama 3; random weights, no download."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # model.generate stops at no id that lash.hf ignores
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to("cuda", dtype)


def _grads(model) -> list[torch.Tensor]:
    out = [p.grad.float().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


def test_bf16_multi_exit_loss_with_lash_kernels_matches_a_logits_reference(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    exits = {1: 0.2, 2: 0.3, 4: 0.5}
    model = _llama(torch.bfloat16)
    plain = copy.deepcopy(model)
    input_ids = torch.randint(0, VOCAB, (4, 256), device="cuda")  # (B, T)
    labels = input_ids.masked_fill(torch.rand(input_ids.shape, device="cuda") < 0.1, -100)
    hs = plain(input_ids=input_ids, output_hidden_states=True).hidden_states  # before any module global changes
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)  # (N,)
    want = sum(
        w * F.cross_entropy(plain.lm_head(hs[k] if k == LAYERS else plain.model.norm(hs[k])).float().flatten(0, 1),
                            targets)
        for k, w in exits.items()
    )  # fmt: skip
    want.backward()
    want_grads = _grads(plain)
    apply_lash(model, TrainingConfig(exits))
    assert use_lash_kernels(model) == {"RMSNorm": 2 * LAYERS + 1, "RoPE": LAYERS}
    out = model(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(out.loss, want, rtol=2e-2, atol=2e-2)
    out.loss.backward()
    got_grads = _grads(model)
    assert len(got_grads) == len(want_grads)
    for got, ref in zip(got_grads, want_grads):  # bf16 end to end: compare each tensor as a whole
        assert (got - ref).norm() <= 5e-2 * ref.norm() + 1e-6
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(input_ids=input_ids, labels=labels).loss, out.loss, rtol=2e-2, atol=2e-2)


def test_fp32_speculative_and_early_exit_generation_with_lash_kernels(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    model = _llama(torch.float32).eval()
    prompt = torch.randint(0, VOCAB, (3, 16), device="cuda")
    mask = torch.ones_like(prompt)
    mask[0, :5] = 0  # left padding: per-row positions, (B, T, D) RoPE tables
    want = model.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=24)
    use_lash_kernels(model)
    plain = generate(model, prompt, 24, exit_layer=2, attention_mask=mask)
    fast = generate(model, prompt, 24, exit_layer=2, attention_mask=mask, speculative=True, draft_tokens=4)
    assert torch.equal(plain, want) and torch.equal(fast, want)
    early, stats = generate(model, prompt, 24, exit_layer=2, routing_threshold=0.0, attention_mask=mask,
                            return_stats=True)  # fmt: skip
    assert early.shape == want.shape and stats["shallow_ratio"] == 23 / 24  # the first new token comes from the prefill
