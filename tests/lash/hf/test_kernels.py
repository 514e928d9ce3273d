"""lash.hf.kernels: LashRMSNorm and LASH's RoPE equal each family's own, outputs and gradients."""

import copy
import sys

import pytest
import torch

pytest.importorskip("transformers")

from lash.config import TrainingConfig  # noqa: E402
from lash.hf import LashRMSNorm, apply_lash, use_lash_kernels  # noqa: E402
from lash.hf.kernels import RMS_NORMS, lash_rotary_pos_emb  # noqa: E402
from lash_kernels.ops.rotary import kernels as rotary_kernels  # noqa: E402
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
    assert use_lash_kernels(holder) == {"RMSNorm": 1, "RoPE": 0}
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


@pytest.fixture
def restore_rope():
    """Put back every family's own ``apply_rotary_pos_emb`` (use_lash_kernels swaps module globals)."""
    modules = {name: module for name, module in sys.modules.items() if name.startswith("transformers.models.")}
    # vars(), not hasattr: a lazy transformers module imports its submodules on an attribute lookup
    # (some need packages this machine may not have, e.g. torchvision).
    saved = {name: vars(module)["apply_rotary_pos_emb"] for name, module in modules.items()
             if "apply_rotary_pos_emb" in vars(module)}  # fmt: skip
    yield
    for name, function in saved.items():
        sys.modules[name].apply_rotary_pos_emb = function


def _rope_of(family: str):
    model = tiny_model(family)
    return sys.modules[type(model.model.layers[0].self_attn).__module__].apply_rotary_pos_emb


def _rope_inputs(dtype: torch.dtype, table_rows: int = 3, rotary_dim: int = 8):
    """(B, H, T, D) q and k (q a transposed view, as attention makes it) and (rows, T, rotary_dim) tables."""
    q = torch.randn(3, 6, 4, 8).transpose(1, 2).to(dtype).requires_grad_()  # (B, H, T, D)
    k = torch.randn(3, 2, 6, 8, dtype=dtype, requires_grad=True)
    cos, sin = (torch.randn(table_rows, 6, rotary_dim).to(dtype) for _ in range(2))
    return q, k, cos, sin


# The interpreter rounds fp32 → bf16 by truncation (GPUs round to nearest even), so bit-for-bit
# bf16 is checked on CUDA (tests/lash_kernels/ops/test_rotary.py) and fp16 stands in for it here.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma"])
def test_lash_rope_is_bitwise_the_familys(family, rows, dtype, monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    original = _rope_of(family)
    calls = []
    monkeypatch.setattr(rotary_kernels, "rotary_op", lambda *a: calls.append(1) or _op(*a))
    q, k, cos, sin = _rope_inputs(dtype, rows)
    got = lash_rotary_pos_emb(original)(q, k, cos, sin)
    want = original(q, k, cos, sin)
    dy = [torch.randn_like(t) for t in want]
    for a, b in zip(got + torch.autograd.grad(got, (q, k), dy), want + torch.autograd.grad(want, (q, k), dy)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert calls, "the kernel did not run"


_op = rotary_kernels.rotary_op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_lash_rope_on_the_torch_backend_is_bitwise_the_familys(dtype, monkeypatch):
    """Where LASH's dispatch picks torch, apply_rotary's eager-rounding reference is the model's formula."""
    monkeypatch.setenv("LASH_KERNELS", "torch")
    original = _rope_of("llama")
    q, k, cos, sin = _rope_inputs(dtype)
    got = lash_rotary_pos_emb(original)(q, k, cos, sin)
    want = original(q, k, cos, sin)
    dy = [torch.randn_like(t) for t in want]
    for a, b in zip(got + torch.autograd.grad(got, (q, k), dy), want + torch.autograd.grad(want, (q, k), dy)):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "inputs"),
    [
        ({"unsqueeze_dim": 2}, dict(dtype=torch.float32)),  # (B, T, H, D) layout
        ({}, dict(dtype=torch.float32, rotary_dim=4)),  # partial rotary
        ({}, dict(dtype=torch.float64)),  # no kernel dtype
    ],
)
def test_lash_rope_leaves_what_it_does_not_cover_to_the_family(kwargs, inputs, monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    original = _rope_of("phi3")  # Phi-3's function handles partial rotary
    monkeypatch.setattr(rotary_kernels, "rotary_op", lambda *a: pytest.fail("the kernel ran outside its envelope"))
    q, k, cos, sin = _rope_inputs(**inputs)
    if kwargs:
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, T, H, D)
    for a, b in zip(lash_rotary_pos_emb(original)(q, k, cos, sin, **kwargs), original(q, k, cos, sin, **kwargs)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_with_lash_kernels_trains_as_before(family, monkeypatch, restore_rope):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    model = apply_lash(tiny_model(family), TrainingConfig({1: 0.3, 2: 0.2, 3: 0.5}))
    plain = copy.deepcopy(model)
    input_ids, labels = batch()
    want = plain(input_ids=input_ids, labels=labels).loss  # before the swap: RoPE is a module global
    want.backward()
    want_grads, want_logits = grads(plain), plain(input_ids=input_ids).logits
    keys = list(model.state_dict())
    norms = sum(type(m).__name__ in RMS_NORMS for m in model.modules())
    layers = model.config.num_hidden_layers
    assert use_lash_kernels(model) == {"RMSNorm": norms, "RoPE": layers} and norms > 0
    assert use_lash_kernels(model) == {"RMSNorm": 0, "RoPE": layers}  # nothing swapped twice
    assert not hasattr(_rope_of(family).lash_original, "lash_original")
    assert list(model.state_dict()) == keys
    assert not any(type(m).__name__ in RMS_NORMS for m in model.modules())
    calls = []
    monkeypatch.setattr(rotary_kernels, "rotary_op", lambda *a: calls.append(1) or _op(*a))
    got = model(input_ids=input_ids, labels=labels).loss
    assert len(calls) == layers  # one RoPE launch per layer
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    for a, b in zip(grads(model), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(input_ids=input_ids).logits, want_logits, rtol=1e-5, atol=1e-5)


def test_left_padded_generation_is_unchanged_by_lash_kernels(monkeypatch, restore_rope):
    """Left padding gives every row its own positions: (B, T, D) tables through the kernel."""
    monkeypatch.setenv("LASH_KERNELS", "triton")
    model = tiny_model("llama").eval()
    input_ids = torch.randint(3, 64, (3, 6))
    mask = torch.ones_like(input_ids)
    mask[0, :2] = mask[2, :1] = 0
    want = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=5, output_logits=True,
                          return_dict_in_generate=True)  # fmt: skip
    use_lash_kernels(model)
    got = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=5, output_logits=True,
                         return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
