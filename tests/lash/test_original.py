import math

import torch

from lash.original import OriginalModel, OriginalRMSNorm, OriginalRoPE


def test_all_logits_one_per_layer_and_causal():
    model = OriginalModel(vocab_size=31, dim=16, num_layers=3, num_heads=2, max_len=12)
    x = torch.randint(0, 31, (2, 10))
    logits = model.all_logits(x)
    assert len(logits) == 3 and all(t.shape == (2, 10, 31) for t in logits)
    changed = x.clone()
    changed[:, 7] = (x[:, 7] + 1) % 31
    later = model.all_logits(changed)
    for before, after in zip(logits, later):
        torch.testing.assert_close(after[:, :7], before[:, :7])  # earlier positions never see token 7
        assert not torch.allclose(after[:, 7:], before[:, 7:])


def test_state_dict_keeps_the_original_buffers():
    state = OriginalModel(vocab_size=31, dim=16, num_layers=2, num_heads=2, max_len=12).state_dict()
    for i in range(2):
        assert state[f"layers.{i}.attn.causal_mask"].shape == (12, 12)
        assert state[f"layers.{i}.attn.causal_mask"].dtype == torch.bool
        assert state[f"layers.{i}.attn.rope.inv_freq"].shape == (4,)  # head_dim 8 → 4 frequencies


def test_rms_norm_and_rope_by_their_definitions():
    x = torch.randn(3, 5, 8)
    norm = OriginalRMSNorm(8)
    torch.testing.assert_close(norm(x).pow(2).mean(-1), torch.ones(3, 5), atol=1e-4, rtol=1e-4)
    rope = OriginalRoPE(8)
    rotated = rope(x)
    torch.testing.assert_close(rotated[:, 0], x[:, 0])  # position 0: no rotation
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps lengths
    # Pair (0, 4) at position 1 turns by the first frequency, 1 radian.
    c, s = math.cos(1.0), math.sin(1.0)
    torch.testing.assert_close(rotated[:, 1, 0], x[:, 1, 0] * c - x[:, 1, 4] * s)
    torch.testing.assert_close(rotated[:, 1, 4], x[:, 1, 4] * c + x[:, 1, 0] * s)
