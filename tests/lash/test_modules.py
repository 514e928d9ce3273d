import pytest
import torch
import torch.nn.functional as F

from lash import DeepSupervisionTransformer, StandardTransformer
from lash.modules import GatedLinearUnit, MultiHeadAttention, RMSNorm, RotaryPositionalEmbedding, TransformerBlock
from lash.modules.projection import project

from lash.original import OriginalModel
from tests.lash.counting import OpCounter


def test_rms_norm_matches_formula_in_float64():
    norm = RMSNorm(37, eps=1e-6).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 37, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert list(norm.state_dict()) == ["weight"]
    torch.testing.assert_close(RMSNorm(7).weight, torch.ones(7))


def test_rms_norm_keeps_low_precision_dtype():
    norm = RMSNorm(16)
    x = torch.randn(4, 16).bfloat16()
    assert norm(x).dtype == torch.bfloat16
    torch.testing.assert_close(norm(x).float(), norm(x.float()), atol=2e-2, rtol=2e-2)


def test_rope_rotates_half_with_inverse_frequencies():
    head_dim, T = 6, 5
    rope = RotaryPositionalEmbedding(head_dim, max_seq_len=16).double()
    q, k = torch.randn(2, 3, T, head_dim, dtype=torch.float64), torch.randn(2, 3, T, head_dim, dtype=torch.float64)
    qr, kr = rope(q, k)
    for t in range(T):
        for i in range(head_dim // 2):
            angle = torch.tensor(t / 10000 ** (2 * i / head_dim), dtype=torch.float64)
            c, s = angle.cos(), angle.sin()
            a, b = q[..., t, i], q[..., t, i + head_dim // 2]
            torch.testing.assert_close(qr[..., t, i], a * c - b * s)
            torch.testing.assert_close(qr[..., t, i + head_dim // 2], b * c + a * s)
    # A rotation keeps norms; position 0 is the identity.
    torch.testing.assert_close(kr.norm(dim=-1), k.norm(dim=-1))
    torch.testing.assert_close(qr[..., 0, :], q[..., 0, :])
    assert rope.state_dict() == {}


def test_attention_is_causal_and_matches_manual_softmax():
    attn = MultiHeadAttention(24, 3, max_seq_len=32).double()
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    y = attn(x)
    x2 = x.clone()
    x2[:, 6:] += 1.0  # future tokens change ...
    torch.testing.assert_close(attn(x2)[:, :6], y[:, :6])  # ... earlier outputs do not
    q, k = attn.rope(attn.split_heads(attn.q_proj(x)), attn.split_heads(attn.k_proj(x)))
    v = attn.split_heads(attn.v_proj(x))
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(torch.ones(9, 9).triu(1).bool(), float("-inf"))
    manual = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 24))
    torch.testing.assert_close(y, manual)


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="dim=10 must be divisible by num_heads=3"):
        MultiHeadAttention(10, 3)


def test_glu_and_block_formulas():
    ffn = GatedLinearUnit(12, 20).double()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    torch.testing.assert_close(ffn(x), ffn.w2(F.silu(ffn.w1(x)) * ffn.w3(x)))
    assert GatedLinearUnit(8).w1.out_features == 32
    block = TransformerBlock(12, 2).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    h = block.norm1(x + block.attn(x))
    torch.testing.assert_close(block(x), block.norm2(h + block.ffn(h)))


def test_state_dict_keys_match_reference_layout():
    model = StandardTransformer(vocab_size=50, dim=16, num_layers=2, num_heads=2)
    expected = {"embedding.weight", "output_head.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"layers.{i}.ffn.w{j}.weight" for j in (1, 2, 3)}
        expected |= {f"layers.{i}.norm{j}.weight" for j in (1, 2)}
    assert set(model.state_dict()) == expected


@pytest.mark.parametrize("model_cls", [StandardTransformer, DeepSupervisionTransformer])
def test_reference_checkpoint_loads_strictly_with_same_logits(model_cls, tmp_path):
    ref = OriginalModel(vocab_size=97, dim=32, num_layers=3, num_heads=4)
    assert any(k.endswith("causal_mask") for k in ref.state_dict())
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    model = model_cls(vocab_size=97, dim=32, num_layers=3, num_heads=4)
    model.load_state_dict(torch.load(tmp_path / "ref.pt"), strict=True)
    x = torch.randint(0, 97, (2, 13))
    expected = ref.all_logits(x)
    got = model.forward_all_layers(x)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model(x), expected[-1], atol=1e-4, rtol=1e-4)


def test_strict_load_still_rejects_unknown_keys():
    model = StandardTransformer(vocab_size=20, dim=8, num_layers=1, num_heads=2)
    state = model.state_dict() | {"layers.0.attn.extra": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="extra"):
        model.load_state_dict(state)


@pytest.mark.parametrize("uses", ["both", "projection", "residual"])
def test_projection_gradients_match_autograd_in_float64(uses):
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(o, 5, dtype=torch.float64, requires_grad=True) for o in (4, 3)]

    def through_project(x, *weights):
        y, residual = project(x, weights)
        return {"both": (y, residual), "projection": (y,), "residual": (residual,)}[uses]

    assert torch.autograd.gradcheck(through_project, (x, *weights))
    y, residual = project(x, weights)
    torch.testing.assert_close(y, F.linear(x, torch.cat(weights)))
    assert residual.data_ptr() == x.data_ptr()


def test_projection_adds_the_residual_gradient_in_the_gemm():
    x = torch.randn(4, 6, requires_grad=True)
    weights = [torch.randn(8, 6, requires_grad=True), torch.randn(8, 6, requires_grad=True)]
    y, residual = project(x, weights)
    loss = y.sum() + (3 * residual).sum()
    with OpCounter() as counter:
        loss.backward()
    assert counter.kernels.count("addmm") == 1 and "add" not in counter.kernels  # dx = dresidual + dy·W
    assert counter.kernels.count("cat") == 0  # the weights' gradients are views of one GEMM's output


def test_projection_under_no_grad_or_autocast_is_plain_linear():
    x, weights = torch.randn(3, 4), (torch.randn(2, 4), torch.randn(5, 4))
    with torch.no_grad():
        y, residual = project(x, weights)
    assert residual is x and y.grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, residual = project(x, tuple(w.requires_grad_() for w in weights))
    assert residual is x and y.dtype == torch.bfloat16


def test_a_frozen_layer_projects_plainly_and_compiles_in_one_graph():
    """ASHEM's phase 2 freezes the lower layers: their projections need no gradient and go through
    plain ``F.linear`` (torch 2.11's dynamo fails on a Function none of whose inputs needs one)."""
    x, weights = torch.randn(3, 4), (torch.randn(2, 4), torch.randn(5, 4))
    y, residual = project(x, weights)
    assert residual is x and y.grad_fn is None
    torch._dynamo.reset()
    model = DeepSupervisionTransformer(vocab_size=37, dim=24, num_layers=3, num_heads=2)
    for p in (*model.embedding.parameters(), *model.layers[0].parameters()):
        p.requires_grad_(False)
    forward = torch.compile(lambda ids: model.hidden_states(ids, [3])[0].sum(), fullgraph=True)
    forward(torch.randint(0, 37, (2, 9))).backward()
    frozen, trained = model.layers[0].parameters(), model.layers[2].parameters()
    assert all(p.grad is None for p in frozen) and all(p.grad is not None for p in trained)
