"""lash.hf.kernels: LashRMSNorm equals each family's own RMSNorm, output and gradients."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from lash.config import TrainingConfig  # noqa: E402
from lash.hf import LashRMSNorm, apply_lash, use_lash_kernels  # noqa: E402
from lash.hf.kernels import RMS_NORMS  # noqa: E402
from tests.lash.hf.tiny import FAMILIES, batch, grads, tiny_model  # noqa: E402

NORMS = {"llama": "LlamaRMSNorm", "qwen3": "Qwen3RMSNorm", "phi3": "Phi3RMSNorm", "gemma": "GemmaRMSNorm"}
# (input dtype, weight dtype): bf16 activations with fp32 weights is mixed precision's case.
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


def _norm_pair(family: str, weight_dtype: torch.dtype):
    original = copy.deepcopy(tiny_model(family).model.norm).to(weight_dtype)
    assert type(original).__name__ == NORMS[family]
    with torch.no_grad():
        original.weight.normal_()
    replaced = copy.deepcopy(original)
    holder = torch.nn.Sequential(replaced)
    assert use_lash_kernels(holder) == 1
    return original, holder[0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("x_dtype", "w_dtype"), DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("family", NORMS)
def test_lash_rms_norm_equals_the_familys_norm(family, x_dtype, w_dtype, backend, monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", backend)
    original, replaced = _norm_pair(family, w_dtype)
    assert isinstance(replaced, LashRMSNorm) and replaced.weight is not original.weight
    x = torch.randn(3, 5, 32, dtype=x_dtype) * 3  # (B, T, D), D of the tiny models
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    want, got = original(x_ref), replaced(x)
    assert got.dtype == want.dtype
    # The torch backend does Hugging Face's operations in its order: bit for bit. Triton's 1/rms
    # may differ in its last fp32 bit, which can move a value rounded to bf16 by one bf16 ulp.
    if backend == "torch":
        tol = dict(rtol=0, atol=0)
    else:
        tol = dict(rtol=1.6e-2, atol=1e-5) if x_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    dy = torch.randn_like(want)
    want.backward(dy)
    got.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, **({} if x_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)))
    if x_dtype == w_dtype == torch.float32 or backend == "torch":
        torch.testing.assert_close(replaced.weight.grad, original.weight.grad, rtol=1e-5, atol=1e-5)
    else:
        # The weight's gradient sums dy · (normalised x rounded to bf16) over 15 rows; where Triton's
        # rounding differs by one bf16 ulp, single elements can cancel to a large relative error,
        # so the whole vector is compared.
        error = (replaced.weight.grad.float() - original.weight.grad.float()).norm()
        assert error <= 1e-2 * original.weight.grad.float().norm()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_with_lash_norms_trains_as_before(family):
    model = apply_lash(tiny_model(family), TrainingConfig({1: 0.3, 2: 0.2, 3: 0.5}))
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    norms = sum(type(m).__name__ in RMS_NORMS for m in model.modules())
    assert use_lash_kernels(model) == norms > 0
    assert list(model.state_dict()) == keys
    assert not any(type(m).__name__ in RMS_NORMS for m in model.modules())
    input_ids, labels = batch()
    got, want = model(input_ids=input_ids, labels=labels).loss, plain(input_ids=input_ids, labels=labels).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    want.backward()
    for a, b in zip(grads(model), grads(plain)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(input_ids=input_ids).logits, plain(input_ids=input_ids).logits, rtol=1e-5, atol=1e-5)
