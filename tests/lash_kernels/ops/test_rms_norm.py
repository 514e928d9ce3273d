"""RMSNorm and add+RMSNorm: outputs and every gradient against float64, both backends."""

import dataclasses

import pytest
import torch
import triton

from lash_kernels._launch import device_arch
from lash_kernels.ops import rms_norm as rms_norm_package
from lash_kernels.ops.rms_norm import kernels as rms_norm_module
from lash_kernels.ops.rms_norm import RMSNorm, add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference

from .checks import assert_close_scaled, assert_compiles_like_eager


EPS = 1e-6
INTERPRETED = device_arch(torch.device("cpu"))  # the limits launchers plan for under the interpreter
SHAPES = [(1, 8), (7, 48), (33, 100), (5, 384), (2, 3, 100)]
LAYOUTS = ["contiguous", "row_strided", "strided_hidden"]


@pytest.fixture(autouse=True)
def fresh_plans():
    """Launch plans are cached per size; tests here change the constants they read."""
    plans = (rms_norm_module._forward_plan, rms_norm_module._backward_plan)
    for plan in plans:
        plan.cache_clear()
    yield
    for plan in plans:
        plan.cache_clear()


def _every_case(test):
    """Parametrize ``test`` over both backends × every layout × fp32/bf16 × every shape."""
    cases = (("shape", SHAPES), ("dtype", [torch.float32, torch.bfloat16]), ("layout", LAYOUTS), ("kernels", ["triton", "torch"]))
    for name, values in cases:  # innermost first, as stacked decorators apply
        test = pytest.mark.parametrize(name, values)(test)
    return test


def _make(shape, dtype, layout):
    """Random input with the requested memory layout and the same values whatever the layout."""
    *lead, n = shape
    if layout == "contiguous":
        x = torch.randn(shape)
    elif layout == "row_strided":  # rows are unit-stride but further apart than N: no copy needed
        x = torch.randn(*lead, n + 5)[..., :n]
    else:  # the hidden dim is not unit-stride: the launcher must copy
        x = torch.randn(*lead, 2 * n)[..., ::2]
    return x.to(dtype).requires_grad_()


def _weight(n, dtype):
    return (torch.rand(n) + 0.5).to(dtype).requires_grad_()  # away from 1 so dweight matters


def _expected_add_rms_norm(x, residual, weight, gy, gs):
    """Float64 autograd of the definition: outputs and gradients (dx, dresidual, dweight)."""
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, residual, weight))
    s = x64 + r64
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * w64
    torch.autograd.backward([y, s], [gy.double(), gs.double()])
    return y, s, x64.grad, r64.grad, w64.grad


@_every_case
def test_add_rms_norm_matches_float64(monkeypatch, kernels, layout, dtype, shape):
    monkeypatch.setenv("LASH_KERNELS", kernels)
    x, residual = _make(shape, dtype, layout), _make(shape, dtype, "contiguous")
    weight = _weight(shape[-1], dtype)
    y, s = add_rms_norm(x, residual, weight, EPS)
    assert y.dtype == s.dtype == dtype and y.shape == s.shape == x.shape
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    torch.autograd.backward([y, s], [gy, gs])
    expected = _expected_add_rms_norm(x, residual, weight, gy, gs)
    actual = (y, s, x.grad, residual.grad, weight.grad)
    for name, got, want in zip(("y", "s", "dx", "dresidual", "dweight"), actual, expected):
        assert got.dtype == dtype, name
        assert_close_scaled(got, want, dtype, name)


@_every_case
def test_rms_norm_matches_float64(monkeypatch, kernels, layout, dtype, shape):
    monkeypatch.setenv("LASH_KERNELS", kernels)
    x, weight = _make(shape, dtype, layout), _weight(shape[-1], dtype)
    y = rms_norm(x, weight, EPS)
    assert y.dtype == dtype and y.shape == x.shape
    gy = torch.randn_like(y)
    y.backward(gy)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * w64
    y64.backward(gy.double())
    for name, actual, want in (("y", y, y64), ("dx", x.grad, x64.grad), ("dweight", weight.grad, w64.grad)):
        assert_close_scaled(actual, want, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 48), (33, 100)])
def test_sliced_backward_matches_float64(monkeypatch, dtype, shape):
    """Rows too wide for registers (16K on a GPU) go in column slices; force them on small rows."""
    monkeypatch.setenv("LASH_KERNELS", "triton")
    monkeypatch.setattr(rms_norm_module, "BACKWARD_MAX_ROW", 32)  # slices of 16 columns
    assert rms_norm_module._backward_plan(shape[0], shape[-1], 4, 3, INTERPRETED).col_blocks > 1
    x, residual = _make(shape, dtype, "row_strided"), _make(shape, dtype, "contiguous")
    weight = _weight(shape[-1], dtype)
    y, s = add_rms_norm(x, residual, weight, EPS)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    torch.autograd.backward([y, s], [gy, gs])
    expected = _expected_add_rms_norm(x, residual, weight, gy, gs)
    for name, got, want in zip(("dx", "dresidual", "dweight"), (x.grad, residual.grad, weight.grad), expected[2:]):
        assert_close_scaled(got, want, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_backward_walks_many_row_blocks(monkeypatch, dtype):
    """Each program's band spans several pipelined steps, the last band is short, and dw sums
    more partial rows than one step of the dw kernel reads."""
    monkeypatch.setenv("LASH_KERNELS", "triton")
    monkeypatch.setattr(rms_norm_module, "SUM_TILE", (4, 16))
    m, n = 811, 72
    plan = rms_norm_module._backward_plan(m, n, dtype.itemsize, 3, INTERPRETED)
    assert plan.rows_per_program >= 3 * plan.block_m and m % plan.rows_per_program and plan.programs > 4
    _check_add_rms_norm((m, n), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_forward_strides_over_many_row_blocks(monkeypatch, dtype):
    """On an SM that holds 2 programs, 3 programs stride over the 13 row blocks of 51 rows: each
    program's loop runs several pipelined steps, and the last block is short."""
    monkeypatch.setenv("LASH_KERNELS", "triton")
    small = dataclasses.replace(INTERPRETED, sms=1, max_blocks_per_sm=3)
    monkeypatch.setattr(rms_norm_module, "device_arch", lambda device: small)
    m, n = 51, 100
    plan = rms_norm_module._forward_plan(m, n, dtype.itemsize, 2, small)
    assert plan.programs == 3 and triton.cdiv(m, plan.block_m) >= 4 * plan.programs and m % plan.block_m
    _check_add_rms_norm((m, n), dtype)


def _check_add_rms_norm(shape, dtype):
    x, residual = _make(shape, dtype, "row_strided"), _make(shape, dtype, "contiguous")
    weight = _weight(shape[-1], dtype)
    y, s = add_rms_norm(x, residual, weight, EPS)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    torch.autograd.backward([y, s], [gy, gs])
    expected = _expected_add_rms_norm(x, residual, weight, gy, gs)
    actual = (y, s, x.grad, residual.grad, weight.grad)
    for name, got, want in zip(("y", "s", "dx", "dresidual", "dweight"), actual, expected):
        assert_close_scaled(got, want, dtype, name)


def test_triton_path_does_not_call_the_reference(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")

    def fail(*args, **kwargs):
        raise AssertionError("the reference ran on the Triton path")

    monkeypatch.setattr(rms_norm_package, "rms_norm_reference", fail)
    monkeypatch.setattr(rms_norm_package, "add_rms_norm_reference", fail)
    x, weight = torch.randn(3, 16), torch.rand(16)
    rms_norm(x, weight)
    add_rms_norm(x, x, weight)


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_mixed_dtypes_follow_the_dtype_rule(monkeypatch, kernels):
    """fp32 weight with bf16 x gives bf16 y and an fp32 dweight; an fp32 residual promotes s and y."""
    monkeypatch.setenv("LASH_KERNELS", kernels)
    x = torch.randn(9, 40, dtype=torch.bfloat16, requires_grad=True)
    residual = torch.randn(9, 40, requires_grad=True)
    weight = _weight(40, torch.float32)
    y = rms_norm(x, weight)
    assert y.dtype == torch.bfloat16
    y.backward(torch.ones_like(y))
    assert x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    weight.grad = None
    y, s = add_rms_norm(x, residual, weight)
    assert y.dtype == s.dtype == torch.float32
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    torch.autograd.backward([y, s], [gy, gs])
    assert residual.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    expected = _expected_add_rms_norm(x, residual, weight, gy, gs)
    # x.grad also holds the rms_norm gradient from above, so only the other results are compared.
    y64, s64, _, dresidual64, dweight64 = expected
    pairs = {"y": (y, y64), "s": (s, s64), "dresidual": (residual.grad, dresidual64)}
    pairs["dweight"] = (weight.grad, dweight64)
    for name, (got, want) in pairs.items():
        assert_close_scaled(got, want, torch.float32, name)


def test_only_one_output_used(monkeypatch):
    """Gradients are right when s (or y) receives no gradient."""
    monkeypatch.setenv("LASH_KERNELS", "triton")
    x, residual = torch.randn(6, 24, requires_grad=True), torch.randn(6, 24)
    weight = _weight(24, torch.float32)
    y, _ = add_rms_norm(x, residual, weight)
    (dx,) = torch.autograd.grad(y.pow(2).sum(), x)
    x64 = x.detach().double().requires_grad_()
    s64 = x64 + residual.double()
    y64 = s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + EPS) * weight.detach().double()
    (dx64,) = torch.autograd.grad(y64.pow(2).sum(), x64)
    assert_close_scaled(dx, dx64, torch.float32, "dx")
    _, s = add_rms_norm(x, residual, weight)  # y unused: its gradient arrives as None
    (dx,) = torch.autograd.grad(s.pow(3).sum(), x)
    (dx64,) = torch.autograd.grad(s64.pow(3).sum(), x64)
    assert_close_scaled(dx, dx64, torch.float32, "dx through s alone")


def test_torch_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "torch")
    x, residual, weight = torch.randn(4, 5, 32), torch.randn(4, 5, 32), torch.rand(32)
    assert torch.equal(rms_norm(x, weight), rms_norm_reference(x, weight))
    for got, want in zip(add_rms_norm(x, residual, weight), add_rms_norm_reference(x, residual, weight)):
        assert torch.equal(got, want)


def test_module_state_dict_and_init():
    norm = RMSNorm(48, eps=1e-5)
    assert set(norm.state_dict()) == {"weight"}
    assert torch.equal(norm.weight, torch.ones(48)) and norm.eps == 1e-5
    seed_style = {"weight": torch.rand(48)}
    norm.load_state_dict(seed_style, strict=True)
    x = torch.randn(3, 48)
    torch.testing.assert_close(norm(x), rms_norm_reference(x, seed_style["weight"], 1e-5))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: rms_norm(torch.randn(4, 8), torch.ones(7)), r"weight shape \(7,\) must be \(8,\)"),
        (lambda: rms_norm(torch.randn(4, 8), torch.ones(8, 1)), r"weight shape \(8, 1\)"),
        (lambda: rms_norm(torch.randn(4, 8), torch.ones(8), eps=-1.0), r"eps=-1.0 must be a finite real number ≥ 0"),
        (lambda: rms_norm(torch.ones(4, 8, dtype=torch.long), torch.ones(8)), r"torch.int64"),
        (
            lambda: add_rms_norm(torch.randn(4, 8), torch.randn(3, 8), torch.ones(8)),
            r"residual shape \(3, 8\) must equal x shape \(4, 8\)",
        ),
        (lambda: rms_norm(torch.randn(2, 8).double(), torch.ones(8)), r"torch.float64 is not supported"),
        (lambda: rms_norm(torch.randn(1, 16385), torch.ones(16385)), r"hidden size 16385 exceeds .* 16384"),
        (lambda: RMSNorm(0), r"dim=0 must be an int ≥ 1"),
    ],
)
def test_bad_input_raises_value_error(monkeypatch, call, message):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    with pytest.raises(ValueError, match=message):
        call()


class _Block(torch.nn.Module):
    """Post-norm residual block in the model's shape: h = norm2(h + f(norm1(h + g(h))))."""

    def __init__(self, dim):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)

    def forward(self, h):
        y, s = add_rms_norm(self.proj(h), h, self.norm1.weight)
        return self.norm2(y + s)


def _check_compiled_block(dim, shape, dtype, device, rtol, atol):
    block = _Block(dim).to(device=device, dtype=dtype)
    assert_compiles_like_eager(block, torch.randn(*shape, dim, device=device, dtype=dtype), rtol, atol)


def test_a_fullgraph_compile_takes_a_new_eps(monkeypatch):
    """Dynamo traces ``eps`` as a symbolic float once it has seen two values; the check must trace."""
    monkeypatch.setenv("LASH_KERNELS", "torch")
    torch._dynamo.reset()
    x, w = torch.randn(4, 8), torch.rand(8) + 0.5
    norm = torch.compile(lambda x, w, eps: rms_norm(x, w, eps), fullgraph=True)
    for eps in (1e-6, 1e-5, 1e-4):
        torch.testing.assert_close(norm(x, w, eps), rms_norm_reference(x, w, eps))


def test_compiles_without_graph_breaks_cpu(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "torch")
    _check_compiled_block(32, (2, 5), torch.float32, "cpu", 1e-5, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [4096, 16384])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiles_without_graph_breaks_cuda_triton(monkeypatch, dim, dtype):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    _check_compiled_block(dim, (4, 64), dtype, "cuda", 2e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [4096, 16384, 1000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_shapes_cuda_match_float64(monkeypatch, dim, dtype):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    x = torch.randn(300, dim, device="cuda", dtype=dtype, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    weight = _weight(dim, dtype).cuda().detach().requires_grad_()
    y, s = add_rms_norm(x, residual, weight)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    torch.autograd.backward([y, s], [gy, gs])
    expected = _expected_add_rms_norm(x, residual, weight, gy, gs)
    actual = (y, s, x.grad, residual.grad, weight.grad)
    for name, got, want in zip(("y", "s", "dx", "dresidual", "dweight"), actual, expected):
        assert_close_scaled(got, want, dtype, name)
