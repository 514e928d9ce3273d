"""RoPE on q and k: outputs and both gradients against float64, both backends."""

import pytest
import torch

from lash_kernels.ops import rotary as rotary_module
from lash_kernels.ops.rotary import kernels as rotary_kernels
from lash_kernels.ops.rotary import apply_rotary, apply_rotary_reference

from .checks import assert_close_scaled, assert_compiles_like_eager


# (B, Hq, Hk, T, D): odd lengths, grouped keys, head dims that are not powers of two.
SHAPES = [(1, 1, 1, 1, 8), (2, 3, 1, 7, 12), (1, 4, 2, 33, 64), (2, 2, 2, 5, 100)]
LAYOUTS = ["contiguous", "transposed", "strided_head_dim"]


def _tables(t, d, kind):
    """RoPE tables: the model's ``cat(freqs, freqs)`` form ("rope", "half"), or arbitrary values in every column."""
    if kind == "random":
        return torch.randn(t, d), torch.randn(t, d)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)  # (D/2,)
    angles = torch.outer(torch.arange(t).float(), inv_freq)  # (T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def _make(b, h, t, d, dtype, layout):
    """A [B, H, T, D] tensor in the requested memory layout."""
    if layout == "contiguous":
        x = torch.randn(b, h, t, d)
    elif layout == "transposed":  # the usual view of a [B, T, H, D] projection
        x = torch.randn(b, t, h, d).transpose(1, 2)
    else:  # the head dim is not unit-stride: the launcher must copy
        x = torch.randn(b, h, t, 2 * d)[..., ::2]
    return x.to(dtype).requires_grad_()


def _rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


def _expected(q, k, cos, sin, gq, gk):
    """Float64 autograd of the definition: rotated q, k and their gradients."""
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    c64, s64 = cos.double(), sin.double()
    q_rot, k_rot = q64 * c64 + _rotate_half(q64) * s64, k64 * c64 + _rotate_half(k64) * s64
    torch.autograd.backward([q_rot, k_rot], [gq.double(), gk.double()])
    return q_rot, k_rot, q64.grad, k64.grad


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("tables", ["rope", "random", "half"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_apply_rotary_matches_float64(monkeypatch, kernels, tables, layout, dtype, shape):
    monkeypatch.setenv("LASH_KERNELS", kernels)
    b, hq, hk, t, d = shape
    q, k = _make(b, hq, t, d, dtype, layout), _make(b, hk, t, d, dtype, "contiguous")
    cos, sin = _tables(t, d, tables)
    if tables == "half":  # c for cat(c, c): strided views of the full tables' first half
        q_rot, k_rot = apply_rotary(q, k, cos[:, : d // 2], sin[:, : d // 2])
    else:
        q_rot, k_rot = apply_rotary(q, k, cos, sin)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    assert q_rot.dtype == k_rot.dtype == dtype
    gq, gk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    torch.autograd.backward([q_rot, k_rot], [gq, gk])
    expected = _expected(q, k, cos, sin, gq, gk)
    for name, actual, want in zip(("q_rot", "k_rot", "dq", "dk"), (q_rot, k_rot, q.grad, k.grad), expected):
        assert_close_scaled(actual, want, dtype, name)


def test_transposed_input_keeps_its_layout(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    q = torch.randn(2, 9, 3, 16).transpose(1, 2)  # (B, H, T, D) view of (B, T, H, D)
    k = torch.randn(2, 1, 9, 16)
    q_rot, _ = apply_rotary(q, k, *_tables(9, 16, "rope"))
    assert q_rot.stride() == q.stride()


def test_non_contiguous_output_gradients(monkeypatch):
    """Upstream gradients arrive as views (here from a transpose back to [B, T, H, D])."""
    monkeypatch.setenv("LASH_KERNELS", "triton")
    q, k = _make(2, 4, 6, 8, torch.float32, "contiguous"), _make(2, 2, 6, 8, torch.float32, "contiguous")
    cos, sin = _tables(6, 8, "random")
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    weights_q, weights_k = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 2, 8)
    loss = (q_rot.transpose(1, 2) * weights_q).sum() + (k_rot.transpose(1, 2) * weights_k).sum()
    loss.backward()
    expected = _expected(q, k, cos, sin, weights_q.transpose(1, 2), weights_k.transpose(1, 2))
    assert_close_scaled(q.grad, expected[2], torch.float32, "dq")
    assert_close_scaled(k.grad, expected[3], torch.float32, "dk")


def test_triton_path_does_not_call_the_reference(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")

    def fail(*args, **kwargs):
        raise AssertionError("the reference ran on the Triton path")

    monkeypatch.setattr(rotary_module, "apply_rotary_reference", fail)
    apply_rotary(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), *_tables(3, 8, "rope"))


def test_torch_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "torch")
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = _tables(5, 16, "rope")
    for got, want in zip(apply_rotary(q, k, cos, sin), apply_rotary_reference(q, k, cos, sin)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("rows", [1, 3])
def test_per_row_tables_match_float64(monkeypatch, kernels, rows):
    """(B, T, D) tables (per-row positions, e.g. left padding) and (1, T, D) ones, forward and backward."""
    monkeypatch.setenv("LASH_KERNELS", kernels)
    q, k = _make(3, 4, 7, 12, torch.float32, "transposed"), _make(3, 2, 7, 12, torch.float32, "contiguous")
    cos, sin = torch.randn(rows, 7, 12), torch.randn(rows, 7, 12)  # different values in every row
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    gq, gk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    torch.autograd.backward([q_rot, k_rot], [gq, gk])
    expected = _expected(q, k, cos.unsqueeze(1), sin.unsqueeze(1), gq, gk)
    for name, actual, want in zip(("q_rot", "k_rot", "dq", "dk"), (q_rot, k_rot, q.grad, k.grad), expected):
        assert_close_scaled(actual, want, torch.float32, name)


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("per_row", [False, True])
def test_positions_pick_table_rows(monkeypatch, kernels, per_row):
    """Tokens at arbitrary positions (decoding, early exit): the kernel reads rows of (S, D) tables."""
    monkeypatch.setenv("LASH_KERNELS", kernels)
    b, t, d, s = 3, 5, 12, 40
    q, k = _make(b, 4, t, d, torch.float32, "transposed"), _make(b, 2, t, d, torch.float32, "contiguous")
    cos, sin = _tables(s, d, "random")
    positions = torch.randint(0, s, (b, t) if per_row else (t,))
    q_rot, k_rot = apply_rotary(q, k, cos, sin, positions=positions)
    gq, gk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    torch.autograd.backward([q_rot, k_rot], [gq, gk])
    rows_cos, rows_sin = cos[positions], sin[positions]  # (T, D) or (B, T, D)
    if per_row:
        rows_cos, rows_sin = rows_cos.unsqueeze(1), rows_sin.unsqueeze(1)
    expected = _expected(q, k, rows_cos, rows_sin, gq, gk)
    for name, actual, want in zip(("q_rot", "k_rot", "dq", "dk"), (q_rot, k_rot, q.grad, k.grad), expected):
        assert_close_scaled(actual, want, torch.float32, name)
    with pytest.raises(ValueError, match=r"positions must be an int64 tensor of shape \(T,\) = \(5,\)"):
        apply_rotary(q, k, cos, sin, positions=positions.int())
    with pytest.raises(ValueError, match=r"with positions, cos \(40, 5\)"):
        apply_rotary(q, k, cos[:, :5], sin[:, :5], positions=positions)


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_half_tables_with_positions_and_several_heads_per_program(monkeypatch, kernels):
    """Half tables read at per-row positions; 4 heads per program, so q's second chunk holds 2
    heads and k's one chunk 3: the masked tail of a chunk."""
    monkeypatch.setenv("LASH_KERNELS", kernels)
    monkeypatch.setattr(rotary_kernels, "MIN_PROGRAMS_PER_SM", 0)
    assert rotary_kernels._plan(9, 2, 6, 3, 6, 4).heads == 4
    b, t, d, s = 2, 9, 12, 30
    q, k = _make(b, 6, t, d, torch.bfloat16, "transposed"), _make(b, 3, t, d, torch.bfloat16, "contiguous")
    cos, sin = _tables(s, d, "rope")
    positions = torch.randint(0, s, (b, t))
    q_rot, k_rot = apply_rotary(q, k, cos[:, : d // 2], sin[:, : d // 2], positions=positions)
    gq, gk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    torch.autograd.backward([q_rot, k_rot], [gq, gk])
    expected = _expected(q, k, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1), gq, gk)
    for name, actual, want in zip(("q_rot", "k_rot", "dq", "dk"), (q_rot, k_rot, q.grad, k.grad), expected):
        assert_close_scaled(actual, want, torch.bfloat16, name)


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_batch_rows_and_position_blocks_share_the_grids_first_axis(monkeypatch, kernels):
    """3 rows of 37 positions in tiles of 32: 6 programs on the first axis, each with its own row
    and block. The second axis holds head chunks only, so a batch of 70,000 rows stays within
    CUDA's cap of 65535 there."""
    monkeypatch.setenv("LASH_KERNELS", kernels)
    b, h, t, d = 3, 2, 37, 64
    assert rotary_kernels._plan(t, b, h, h, d // 2, 4).grid == (b * 2, 2 * h)  # a head a program: too few for more
    assert rotary_kernels._plan(1, 70_000, 32, 8, 64, 132).grid == (70_000, 10)
    q, k = _make(b, h, t, d, torch.float32, "contiguous"), _make(b, h, t, d, torch.float32, "transposed")
    cos, sin = _tables(t, d, "random")
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    gq, gk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    torch.autograd.backward([q_rot, k_rot], [gq, gk])
    expected = _expected(q, k, cos, sin, gq, gk)
    for name, actual, want in zip(("q_rot", "k_rot", "dq", "dk"), (q_rot, k_rot, q.grad, k.grad), expected):
        assert_close_scaled(actual, want, torch.float32, name)


def _eager(x, cos, sin):
    """What a Hugging Face model computes: the formula in x's dtype, tables cast to it."""
    cos, sin = cos.to(x.dtype).unsqueeze(1), sin.to(x.dtype).unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _check_eager_rounding(b, hq, hk, t, d, dtype, device):
    """Outputs and gradients equal eager torch's bit for bit (fp32 tables rounded like a model's)."""
    q = torch.randn(b, t, hq, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, hk, t, d, device=device, dtype=dtype, requires_grad=True)
    cos, sin = torch.randn(b, t, d, device=device), torch.randn(b, t, d, device=device)
    q_rot, k_rot = apply_rotary(q, k, cos, sin, eager_rounding=True)
    gq, gk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    dq, dk = torch.autograd.grad([q_rot, k_rot], [q, k], [gq, gk])
    want_q, want_k = _eager(q, cos, sin), _eager(k, cos, sin)
    want_dq, want_dk = torch.autograd.grad([want_q, want_k], [q, k], [gq, gk])
    for name, actual, want in zip(("q_rot", "k_rot", "dq", "dk"), (q_rot, k_rot, dq, dk),
                                  (want_q, want_k, want_dq, want_dk)):  # fmt: skip
        assert actual.dtype == dtype
        assert torch.equal(actual, want), f"{name}: {(actual.float() - want.float()).abs().max()}"
    if dtype != torch.float32:  # one rounding differs from three somewhere: the flag has an effect
        assert not torch.equal(apply_rotary(q, k, cos, sin)[0], q_rot)
    if device == "cuda":  # compiled, the launch loses enable_fp_fusion=False: within a rounding step
        compiled = torch.compile(lambda q, k: apply_rotary(q, k, cos, sin, eager_rounding=True), fullgraph=True)
        for actual, want in zip(compiled(q, k), (want_q, want_k)):
            scale = torch.finfo(dtype).eps * want.detach().abs().max().item()
            torch.testing.assert_close(actual, want, rtol=0, atol=scale)


# The interpreter converts fp32 to bf16 by truncation, not round-to-nearest-even as GPUs do:
# bf16 is checked bitwise on CUDA (below) and through the torch backend here.
@pytest.mark.parametrize(
    "kernels, dtype",
    [("triton", torch.float32), ("triton", torch.float16), ("torch", torch.float32), ("torch", torch.float16),
     ("torch", torch.bfloat16)],
)  # fmt: skip
def test_eager_rounding_is_bitwise_eager_torch(monkeypatch, kernels, dtype):
    monkeypatch.setenv("LASH_KERNELS", kernels)
    _check_eager_rounding(2, 4, 2, 9, 16, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_eager_rounding_is_bitwise_eager_torch_cuda(monkeypatch, dtype):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    _check_eager_rounding(2, 32, 8, 1000, 128, dtype, "cuda")


@pytest.mark.parametrize(
    "q_shape, k_shape, table_shape, message",
    [
        ((1, 2, 5, 16), (1, 2, 5, 16), (5, 7), r"cos \(5, 7\) and sin \(5, 7\) must have one shape of .* head_dim 16 or its half 8"),
        ((1, 2, 5, 16), (1, 2, 5, 16), (6, 16), r"one shape of \(T, W\) = \(5, W\)"),
        ((1, 2, 5, 16), (1, 2, 5, 16), (6, 8), r"cos \(6, 8\).* \(T, W\) = \(5, W\)"),
        ((2, 2, 5, 16), (2, 2, 5, 16), (3, 5, 16), r"cos \(3, 5, 16\).* \(B, T, W\) = \(2, 5, W\)"),
        ((1, 2, 5, 16), (1, 2, 5, 8), (5, 16), r"q \(1, 2, 5, 16\) and k \(1, 2, 5, 8\) must agree"),
        ((1, 2, 5, 16), (2, 2, 5, 16), (5, 16), r"must agree in batch"),
        ((2, 5, 16), (2, 5, 16), (5, 16), r"must be \[B, H, T, D\]; got shapes \(2, 5, 16\)"),
        ((1, 2, 5, 15), (1, 2, 5, 15), (5, 15), r"head_dim=15 must be even"),
    ],
)
def test_bad_shapes_raise_value_error(monkeypatch, q_shape, k_shape, table_shape, message):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    with pytest.raises(ValueError, match=message):
        cos, sin = torch.randn(table_shape), torch.randn(table_shape)
        apply_rotary(torch.randn(q_shape), torch.randn(k_shape), cos, sin)


def test_tables_that_require_grad_are_refused(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "torch")
    cos, sin = _tables(5, 16, "rope")
    with pytest.raises(ValueError, match="must not require grad"):
        apply_rotary(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), cos.requires_grad_(), sin)


def test_unsupported_dtype_on_triton_raises(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    q = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"q dtype torch.float64 is not supported"):
        apply_rotary(q, q, *_tables(5, 16, "rope"))


class _Attention(torch.nn.Module):
    """The q/k half of the model's attention: project, split heads, rotate, score."""

    def __init__(self, dim, heads, seq_len):
        super().__init__()
        self.heads = heads
        self.q_proj = torch.nn.Linear(dim, dim, bias=False)
        self.k_proj = torch.nn.Linear(dim, dim, bias=False)
        cos, sin = _tables(seq_len, dim // heads, "rope")
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, x):
        b, t, dim = x.shape
        q = self.q_proj(x).view(b, t, self.heads, dim // self.heads).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(b, t, self.heads, dim // self.heads).transpose(1, 2)  # (B, H, T, hd)
        q, k = apply_rotary(q, k, self.cos.to(q.dtype), self.sin.to(q.dtype))
        return q @ k.transpose(-1, -2)  # (B, H, T, T)


def _check_compiled_attention(dim, heads, seq_len, dtype, device, rtol, atol):
    module = _Attention(dim, heads, seq_len).to(device=device, dtype=dtype)
    assert_compiles_like_eager(module, torch.randn(2, seq_len, dim, device=device, dtype=dtype), rtol, atol)


def test_compiles_without_graph_breaks_cpu(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "torch")
    _check_compiled_attention(32, 4, 6, torch.float32, "cpu", 1e-5, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiles_without_graph_breaks_cuda_triton(monkeypatch, dtype):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    _check_compiled_attention(1024, 8, 512, dtype, "cuda", 2e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_shapes_cuda_match_float64(monkeypatch, dtype):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    q = torch.randn(4, 2048, 32, 128, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(4, 8, 2048, 128, device="cuda", dtype=dtype, requires_grad=True)
    cos, sin = (t.cuda() for t in _tables(2048, 128, "rope"))
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    gq, gk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    torch.autograd.backward([q_rot, k_rot], [gq, gk])
    expected = _expected(q, k, cos, sin, gq, gk)
    for name, actual, want in zip(("q_rot", "k_rot", "dq", "dk"), (q_rot, k_rot, q.grad, k.grad), expected):
        assert_close_scaled(actual, want, dtype, name)
