import pytest
import torch
import torch.nn.functional as F

from lash.losses import exit_statistics, multi_exit_loss


def reference(hiddens, weight, targets, weights):
    valid = targets != -100
    total = 0.0
    for h, w in zip(hiddens, weights):
        logp = torch.log_softmax(h.double().reshape(-1, h.shape[-1]) @ weight.double().T, dim=-1)
        nll = -logp[valid.reshape(-1)].gather(1, targets.reshape(-1)[valid.reshape(-1)][:, None])
        total = total + w * nll.mean()
    return total


@pytest.mark.parametrize("K", [1, 2, 4])
def test_multi_exit_loss_and_grads_match_float64(K):
    N, D, V = 29, 11, 37
    hiddens = [torch.randn(N, D, requires_grad=True) for _ in range(K)]
    weight = torch.randn(V, D, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[::5] = -100
    weights = [0.0 if k == 1 else 0.3 + k for k in range(K)]
    loss = multi_exit_loss(hiddens, weight, targets, weights)
    leaves64 = [t.detach().double().requires_grad_() for t in hiddens + [weight]]
    expected = reference(leaves64[:-1], leaves64[-1], targets, weights)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(loss, hiddens + [weight], allow_unused=True)
    expected_grads = torch.autograd.grad(expected, leaves64, allow_unused=True)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(torch.zeros_like(e) if g is None else g.double(), e, atol=1e-5, rtol=1e-5)
    if K > 1:
        assert grads[1] is None  # the weight-0 exit had no backward work


def test_shapes_errors_and_all_ignored():
    h = torch.randn(2, 3, 4)
    w = torch.randn(5, 4)
    y = torch.randint(0, 5, (2, 3))
    torch.testing.assert_close(multi_exit_loss([h], w, y, [1.0]), F.cross_entropy(h.reshape(6, 4) @ w.T, y.reshape(6)))
    assert multi_exit_loss([h], w, torch.full((2, 3), -100), [1.0]).item() == 0.0
    with pytest.raises(ValueError, match="2 exits in hiddens but 1 exit_weights"):
        multi_exit_loss([h, h], w, y, [1.0])
    with pytest.raises(ValueError, match=r"targets must have shape \(6,\)"):
        multi_exit_loss([h], w, y.reshape(-1)[:5], [1.0])
    y[0, 0] = 5
    with pytest.raises(ValueError, match=r"target value 5 is outside \[0, 5\)"):
        multi_exit_loss([h], w, y, [1.0])


def test_exit_statistics_match_softmax():
    hiddens = [torch.randn(2, 7, 6) for _ in range(3)]
    w = torch.randn(13, 6)
    y = torch.randint(0, 13, (2, 7))
    y[0, 2] = -100
    stats = exit_statistics(hiddens, w, y)
    for k, h in enumerate(hiddens):
        logits = h.reshape(14, 6) @ w.T
        torch.testing.assert_close(stats.confidence[k], logits.softmax(-1).amax(-1))
        assert torch.equal(stats.predictions[k], logits.argmax(-1))
        torch.testing.assert_close(stats.token_loss[k], F.cross_entropy(logits, y.reshape(-1), reduction="none"))
    assert stats.valid.sum() == 13 and not stats.valid[2]


def test_token_weights_give_the_weighted_mean_per_exit():
    hiddens = [torch.randn(3, 7, 6, requires_grad=True) for _ in range(2)]
    w = torch.randn(13, 6, requires_grad=True)
    y = torch.randint(0, 13, (3, 7))
    y[0, :3] = -100
    t = torch.rand(3, 7)
    t[1, ::2] = 0.0
    loss = multi_exit_loss(hiddens, w, y, [0.4, 1.0], token_weights=t)
    leaves64 = [p.detach().double().requires_grad_() for p in hiddens + [w]]
    t64 = t.double().reshape(-1) * (y.reshape(-1) != -100)
    expected = sum(
        k_weight * (t64 * F.cross_entropy(h.reshape(21, 6) @ leaves64[-1].T, y.reshape(-1), reduction="none")).sum() / t64.sum()
        for k_weight, h in zip([0.4, 1.0], leaves64[:-1])
    )
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-6)
    for g, e in zip(torch.autograd.grad(loss, hiddens + [w]), torch.autograd.grad(expected, leaves64)):
        torch.testing.assert_close(g.double(), e, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"token_weights must have the targets' shape \(3, 7\); got \(7, 3\)"):
        multi_exit_loss(hiddens, w, y, [0.4, 1.0], token_weights=t.T)
