"""SwiGLU: output and gradient against float64, both backends, odd shapes and layouts."""

import pytest
import torch
import torch.nn.functional as F

from lash_kernels import swiglu, swiglu_reference
from lash_kernels.ops import swiglu as swiglu_package
from lash_kernels.ops.swiglu import kernels as swiglu_kernels
from tests.lash.counting import OpCounter

from .checks import assert_close_scaled, assert_compiles_like_eager

SHAPES = [(1, 2), (7, 74), (3, 5, 600), (33, 2 * 1500)]  # the last: more than one column block


def _make(shape, dtype, layout):
    *lead, width = shape
    if layout == "contiguous":
        h = torch.randn(shape)
    elif layout == "row_strided":  # rows unit-stride but further apart than 2F, as a slice of a wider GEMM
        h = torch.randn(*lead, width + 6)[..., :width]
    else:  # the last dimension is not unit-stride: the launcher copies
        h = torch.randn(*lead, 2 * width)[..., ::2]
    return (2 * h).to(dtype).requires_grad_()


def _expected(h, dout):
    h64 = h.detach().double().requires_grad_()
    gate, value = h64.chunk(2, dim=-1)
    out = F.silu(gate) * value
    out.backward(dout.double())
    return out, h64.grad


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_float64(monkeypatch, kernels, layout, dtype, shape):
    monkeypatch.setenv("LASH_KERNELS", kernels)
    h = _make(shape, dtype, layout)
    out = swiglu(h)
    dout = torch.randn(out.shape).to(dtype)
    out.backward(dout)
    want_out, want_dh = _expected(h, dout)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert h.grad.shape == h.shape and h.grad.dtype == dtype
    assert_close_scaled(out, want_out, dtype, "out")
    assert_close_scaled(h.grad, want_dh, dtype, "dh")


def test_non_contiguous_output_gradient(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    h = _make((6, 40), torch.float32, "contiguous")
    out = swiglu(h)
    dout = torch.randn(20, 6).t()  # (6, 20), not contiguous
    out.backward(dout)
    assert_close_scaled(h.grad, _expected(h, dout)[1], torch.float32, "dh")


def test_one_launch_each_way_and_one_gradient_for_the_gemm(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    h = _make((4, 9, 64), torch.float32, "contiguous")
    with OpCounter() as counter:
        swiglu(h).sum().backward()
    assert [k for k in counter.kernels if k not in {"sum", "ones_like", "expand"}] == ["lash::swiglu", "lash::swiglu_backward"]


def test_empty_input(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    h = torch.randn(0, 8, requires_grad=True)
    out = swiglu(h)
    out.sum().backward()
    assert out.shape == (0, 4) and h.grad.shape == (0, 8)


def test_triton_path_does_not_call_the_reference(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")

    def fail(*args, **kwargs):
        raise AssertionError("the reference ran on the Triton path")

    monkeypatch.setattr(swiglu_package, "swiglu_reference", fail)
    swiglu(torch.randn(3, 8))


def test_torch_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "torch")
    h = torch.randn(3, 5, 16)
    assert torch.equal(swiglu(h), swiglu_reference(h))


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize(
    "h, message",
    [(torch.randn(3, 7), "even last dimension"), (torch.tensor(1.0), "even last dimension"),
     (torch.ones(3, 8, dtype=torch.long), "floating")],
)  # fmt: skip
def test_bad_input_raises_value_error(monkeypatch, kernels, h, message):
    monkeypatch.setenv("LASH_KERNELS", kernels)
    with pytest.raises(ValueError, match=message):
        swiglu(h)


def test_unsupported_dtype_on_triton_raises(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    with pytest.raises(ValueError, match="float64"):
        swiglu(torch.randn(3, 8, dtype=torch.float64))


@pytest.mark.parametrize("m, f, sms", [(2048, 256, 132), (8192, 8192, 132), (5, 3, 4), (64, 2048, 58)])
def test_plan_fills_every_sm_with_whole_tiles(m, f, sms):
    plan = swiglu_kernels._plan(m, f, sms)
    tile = plan.block_m * plan.block_f
    assert swiglu_kernels.MIN_TILE <= tile <= swiglu_kernels.MAX_TILE
    assert plan.block_f <= 1024 and tile // (32 * plan.num_warps) >= 8  # 16-bit loads 128 bits wide
    programs = plan.grid[0] * plan.grid[1]
    assert programs >= swiglu_kernels.PROGRAMS_PER_SM * sms or tile == swiglu_kernels.MIN_TILE


class _FeedForward(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.up, self.down = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.down(swiglu(self.up(x)))


def test_compiles_without_graph_breaks_cpu(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "torch")
    assert_compiles_like_eager(_FeedForward(16), torch.randn(2, 5, 16), 1e-5, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiles_without_graph_breaks_cuda_triton(monkeypatch, dtype):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    module = _FeedForward(256).to(device="cuda", dtype=dtype)
    assert_compiles_like_eager(module, torch.randn(4, 64, 256, device="cuda", dtype=dtype), 2e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_shapes_cuda_match_float64(monkeypatch, dtype):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    h = (2 * torch.randn(4096, 2 * 5504, device="cuda")).to(dtype).requires_grad_()
    out = swiglu(h)
    dout = torch.randn_like(out)
    out.backward(dout)
    want_out, want_dh = _expected(h, dout)
    assert_close_scaled(out, want_out, dtype, "out")
    assert_close_scaled(h.grad, want_dh, dtype, "dh")
