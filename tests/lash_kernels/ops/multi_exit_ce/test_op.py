"""multi_exit_cross_entropy against F.cross_entropy per exit in float64, on both backends.

The Triton backend runs through the interpreter on the CPU, so shapes stay small; they are not
multiples of the interpreter's tiles (16 tokens × 32 vocab, 64-wide rows, 32-row chunks) so every
mask is used. ``triton-chunked`` forces the regime of wide heads (cuBLAS matmuls and the Triton
row kernel) by lowering ``FUSED_MAX_HIDDEN``, so both regimes run on the same small shapes.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from lash_kernels import MultiExitCEOutput, multi_exit_cross_entropy, multi_exit_cross_entropy_reference
from lash_kernels.ops.multi_exit_ce import chunked, fused, regime, token_weights as token_weights_module
from lash_kernels.ops.multi_exit_ce.chunked import chunk_rows

BACKENDS = ["torch", "triton", "triton-chunked"]
N, V = 37, 203
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}  # fmt: skip


@pytest.fixture(params=BACKENDS)
def kernels(request, monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", request.param.removesuffix("-chunked"))
    if request.param == "triton-chunked":
        monkeypatch.setattr(regime, "FUSED_MAX_HIDDEN", 0)
    return request.param


def make_inputs(K, D, dtype=torch.float32, scale=1.0, ignored=0.2, stacked=False, head_grad=True):
    """Fresh exits, head and targets; ``scale`` multiplies the hiddens (logits grow with it)."""
    exits = [(torch.randn(N, D) * scale).to(dtype) for _ in range(K)]
    weight = (torch.randn(V, D) / D**0.5).to(dtype).requires_grad_(head_grad)
    targets = torch.randint(0, V, (N,))
    targets[torch.rand(N) < ignored] = -100
    hiddens = torch.stack(exits).requires_grad_() if stacked else [h.requires_grad_() for h in exits]
    return hiddens, weight, targets


def float64_reference(hiddens, weight, targets, exit_weights):
    """Eager F.cross_entropy per exit in float64: loss, per-exit means, grads of hiddens and head."""
    exits = [h.detach().double().requires_grad_() for h in hiddens]
    head = weight.detach().double().requires_grad_()
    count = max(int((targets != -100).sum()), 1)
    per_exit = torch.stack([F.cross_entropy(h @ head.T, targets, reduction="sum") / count for h in exits])
    loss = (per_exit * torch.tensor(exit_weights, dtype=torch.float64)).sum()
    loss.backward()
    return loss, per_exit, [h.grad for h in exits], head.grad


def grads_of(hiddens):
    """Per-exit gradients, whether the exits came as a list or stacked."""
    if isinstance(hiddens, torch.Tensor):
        return list(hiddens.grad.unbind(0))
    return [h.grad for h in hiddens]


def assert_matches_reference(hiddens, weight, targets, exit_weights, tol):
    out = multi_exit_cross_entropy(hiddens, weight, targets, exit_weights)
    out.loss.backward()
    loss, per_exit, grad_exits, grad_head = float64_reference(hiddens, weight, targets, exit_weights)
    assert isinstance(out, MultiExitCEOutput) and out.confidence is None and out.predictions is None and out.token_loss is None
    assert out.loss.dtype == torch.float32 and out.per_exit.dtype == torch.float32
    assert not out.per_exit.requires_grad
    torch.testing.assert_close(out.loss.double(), loss, **tol)
    torch.testing.assert_close(out.per_exit.double(), per_exit.detach(), **tol)
    for w, grad, expected in zip(exit_weights, grads_of(hiddens), grad_exits):
        if w == 0:  # no backward work: no gradient at all, or an exact zero
            assert grad is None or not grad.any()
        else:
            assert grad.dtype == weight.dtype
            torch.testing.assert_close(grad.double(), expected, **tol)
    if weight.requires_grad:
        assert weight.grad.dtype == weight.dtype
        torch.testing.assert_close(weight.grad.double(), grad_head, **tol)


@pytest.mark.parametrize(
    "exit_weights, D, stacked, head_grad",
    [
        ([1.0], 24, False, True),
        ([0.7, 1.3], 40, True, True),
        ([1.0, 0.0, 0.5], 24, False, True),
        ([0.0, 0.25, 0.0, 1.0], 40, True, True),
        ([0.5, 2.0], 24, True, False),  # frozen head: only the hidden-state gradients
    ],
)
def test_matches_float64_reference(kernels, exit_weights, D, stacked, head_grad):
    hiddens, weight, targets = make_inputs(len(exit_weights), D, stacked=stacked, head_grad=head_grad)
    assert_matches_reference(hiddens, weight, targets, exit_weights, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(kernels, dtype):
    hiddens, weight, targets = make_inputs(2, 40, dtype=dtype, stacked=True)
    assert_matches_reference(hiddens, weight, targets, [1.0, 0.5], TOL[dtype])


def test_many_rows_take_the_interpreters_large_tiles_and_match_float64(monkeypatch):
    """Above 1024 rows (K·N) the interpreter runs the fused kernels with 64 × 64 tiles, as the
    step-count test's seed-size loss does: they must give float64's answers too, at odd sizes."""
    monkeypatch.setenv("LASH_KERNELS", "triton")
    tiles = []
    pick = fused._interpreter_tiles
    monkeypatch.setattr(fused, "_interpreter_tiles", lambda rows: tiles.append(pick(rows)) or tiles[-1])
    rows, D, vocab = 521, 24, 101
    hiddens = torch.randn(2, rows, D).requires_grad_()
    weight = (torch.randn(vocab, D) / D**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (rows,))
    targets[torch.rand(rows) < 0.2] = -100
    assert_matches_reference(hiddens, weight, targets, [0.6, 1.0], TOL[torch.float32])
    assert tiles and set(tiles) == {(64, 64)}


def test_chunked_fp16_gradients_keep_what_rounds_below_fp16s_smallest_value():
    """G = g·(softmax − onehot) with g ≈ w_k / |valid| falls below fp16's 6e-8 for most entries at
    8K tokens (on a GPU's chunked path, where fp16 is the matmuls' dtype); a small exit weight
    puts it there on a small shape. The gradients must still match float64: ``dW`` in fp32 at its
    size, ``dH`` at ``1 / h_scale`` of it, the factor the backward applies."""
    from lash_kernels.ops.multi_exit_ce.row_kernel import _triton_row_pass

    n, D, v = 48, 16, 96
    h, W = (torch.randn(1, n, D) * 0.01).half(), (torch.randn(v, D) * 100).half()
    y = torch.randint(0, v, (n,))
    g = chunked.token_scales(y, [5e-5], -100)
    *_, grad_h, grad_w, h_scale = chunked.chunked_multi_exit_ce(h, W, y, g, -100, False, True, True,
                                                                _triton_row_pass, 32, torch.float16)  # fmt: skip
    assert grad_h.dtype == torch.float16 and grad_w.dtype == torch.float32 and h_scale == g.max()
    p = (h[0].double() @ W.double().T).softmax(-1)
    G = g[0].double()[:, None] * (p - F.one_hot(y, v))
    assert (G.abs() < 6e-8).float().mean() > 0.9  # what fp16 would have rounded away
    for got, expected in ((grad_h[0].double() * h_scale.double(), G @ W.double()), (grad_w, G.T @ h[0].double())):
        assert ((got.double() - expected).abs().max() / expected.abs().max()) < 1e-2  # 5e-2 / 2.5e-2 when G is rounded


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp16_gradients_keep_their_precision_under_a_loss_scale(kernels, device):
    """A GradScaler multiplies the loss by 2¹⁵ or so, and eager autocast's gradients keep fp16's 11
    bits because they are scaled before they are rounded to fp16. The op forms its gradients in
    the forward, before it sees that scale: at 8K tokens and a head of std 0.02 ``dH`` lies in
    fp16's subnormal range (below 6.1e-5), where rounding it would cost about 3% of its norm, and
    so do most entries of ``dW`` (rare classes' rows), each of which AdamW scales on its own
    (small exit weights put them there on this small shape). Scaled in the backward, both must
    match float64 to fp16's precision, entry by entry for ``dW``."""
    hiddens, weight, targets = make_inputs(2, 40, dtype=torch.float16, stacked=True)
    exit_weights, loss_scale = [2e-3, 1e-3], 2.0**15
    _, _, grad_exits, grad_head = float64_reference(hiddens.unbind(0), weight, targets, exit_weights)
    expected_h, expected_w = torch.stack(grad_exits) * loss_scale, grad_head * loss_scale
    hiddens, weight = (t.detach().to(device).requires_grad_() for t in (hiddens, weight))
    out = multi_exit_cross_entropy(hiddens, weight, targets.to(device), exit_weights)
    out.loss.backward(torch.tensor(loss_scale, device=device))
    entries = expected_w != 0
    # unscaled, every entry of dH and most of dW are subnormal in fp16
    assert expected_h.abs().max() / loss_scale < 6.1e-5 and expected_w.abs()[entries].median() / loss_scale < 6.1e-5
    assert hiddens.grad.dtype == weight.grad.dtype == torch.float16
    assert ((hiddens.grad.cpu().double() - expected_h).norm() / expected_h.norm()) < 1e-3
    error_w = (weight.grad.cpu().double() - expected_w).abs()[entries] / expected_w.abs()[entries]
    assert error_w.median() < 1e-3 and error_w.quantile(0.9) < 4e-3


@pytest.mark.parametrize("dtype, loss_scale", [(torch.float32, 1.0), (torch.float16, 2.0**16)])
def test_all_tokens_ignored_gives_zero_not_nan(kernels, dtype, loss_scale):
    """fp16 under a GradScaler's first scale too: its deferred factor (over no labelled token)
    must not turn the zero gradient into 0 · inf."""
    hiddens, weight, targets = make_inputs(2, 24, dtype=dtype, ignored=1.0)
    out = multi_exit_cross_entropy(hiddens, weight, targets, [3.0, 1.0])
    out.loss.backward(torch.tensor(loss_scale))
    assert out.loss.item() == 0.0 and not out.per_exit.any()
    assert all(not h.grad.any() for h in hiddens) and not weight.grad.any()


def test_no_tokens_gives_zero_loss_and_gradients(kernels):
    hiddens = torch.randn(2, 0, 24, requires_grad=True)
    weight = torch.randn(V, 24, requires_grad=True)
    out = multi_exit_cross_entropy(hiddens, weight, torch.zeros(0, dtype=torch.long), [1.0, 0.5], return_stats=True)
    out.loss.backward()
    assert out.loss.item() == 0.0 and not out.per_exit.any() and out.confidence.shape == (2, 0)
    assert hiddens.grad.shape == (2, 0, 24) and not weight.grad.any()


def test_large_logits_are_stable(kernels):
    hiddens, weight, targets = make_inputs(2, 40, scale=300.0)  # logits of order 1e3
    logits = hiddens[0].detach() @ weight.detach().T
    assert logits.abs().max() > 500
    out = multi_exit_cross_entropy(hiddens, weight, targets, [1.0, 0.5])
    out.loss.backward()
    for t in [out.loss, out.per_exit, weight.grad, *grads_of(hiddens)]:
        assert torch.isfinite(t).all()
    loss, per_exit, grad_exits, grad_head = float64_reference(hiddens, weight, targets, [1.0, 0.5])
    # fp32 logits of size 1e3 carry absolute errors of 1e-4: compare relative to each tensor's scale.
    torch.testing.assert_close(out.per_exit.double(), per_exit.detach(), atol=1e-3, rtol=1e-5)
    for got, expected in zip([weight.grad, *grads_of(hiddens)], [grad_head, *grad_exits]):
        torch.testing.assert_close(got.double(), expected, atol=1e-5 * expected.abs().max(), rtol=1e-3)


def test_confidence_and_predictions(kernels):
    hiddens, weight, targets = make_inputs(3, 24, stacked=True)
    with torch.no_grad():
        # Values on a 1/4 grid make every logit exact in fp32 whatever the summation order, so
        # ties are exact ties for the kernels too. Vocab rows 3, 7 (same tile) and 150 (a later
        # tile and vocab split) are equal, and dominant for exit 0.
        weight.copy_(torch.randint(-4, 5, weight.shape) / 4)
        hiddens.copy_(torch.randint(-4, 5, hiddens.shape) / 4)
        weight[7] = weight[150] = weight[3]
        hiddens[0] = weight[3] * 4 + torch.randint(-1, 2, (N, 24)) / 4
    out = multi_exit_cross_entropy(hiddens, weight, targets, [1.0, 0.0, 1.0], return_stats=True)
    logits = hiddens.detach().double() @ weight.detach().double().T  # (K, N, V)
    assert out.confidence.shape == (3, N) and out.confidence.dtype == torch.float32
    assert out.predictions.dtype == torch.int64
    torch.testing.assert_close(out.confidence.double(), logits.softmax(-1).amax(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.predictions, logits.argmax(-1))
    assert (out.predictions[0] == 3).all()
    reference = multi_exit_cross_entropy_reference(hiddens, weight, targets, [1.0, 0.0, 1.0], return_stats=True)
    torch.testing.assert_close(out.predictions, reference.predictions)
    valid = targets != -100
    token_ce = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0).expand(3, N)[..., None]).squeeze(-1)
    assert out.token_loss.shape == (3, N) and not out.token_loss.requires_grad
    torch.testing.assert_close(out.token_loss.double(), token_ce * valid, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(reference.token_loss.double(), token_ce * valid, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(targets=torch.tensor([5] * (N - 1) + [V])), f"target value {V}"),
        (dict(targets=torch.tensor([-3] + [5] * (N - 1))), "target value -3"),
        (dict(weight=torch.randn(V, 25)), r"\(203, 25\)"),
        (dict(targets=torch.zeros(N + 1, dtype=torch.long)), r"\(38,\)"),
        (dict(exit_weights=[1.0, -0.5]), r"exit_weights\[1\] = -0.5"),
        (dict(exit_weights=[1.0, float("nan")]), "finite"),
        (dict(exit_weights=[1.0, None]), r"exit_weights must be a sequence of real numbers; got \[1.0, None\]"),
        (dict(exit_weights=[1.0, 1.0, 1.0]), "2 exits in hiddens but 3 exit_weights"),
        (dict(hiddens=[torch.randn(N, 24), torch.randn(N + 1, 24)]), r"\(38, 24\)"),
    ],
)
def test_validation_errors(kernels, change, message):
    hiddens, weight, targets = make_inputs(2, 24)
    args = dict(hiddens=hiddens, weight=weight, targets=targets, exit_weights=[1.0, 1.0]) | change
    with pytest.raises(ValueError, match=message):
        multi_exit_cross_entropy(**args)
    with pytest.raises(ValueError, match=message):
        multi_exit_cross_entropy_reference(**args)


def token_weighted_float64(hiddens, weight, targets, exit_weights, token_weights):
    """Σ_k w_k · Σ_n t_n·CE_kn / Σ_valid t_n in float64 by hand: loss and grads of hiddens and head."""
    exits = [h.detach().double().requires_grad_() for h in hiddens]
    head = weight.detach().double().requires_grad_()
    t = token_weights.double() * (targets != -100)  # (N,)
    loss = sum(
        w * (t * F.cross_entropy(h @ head.T, targets, reduction="none")).sum() / t.sum()
        for w, h in zip(exit_weights, exits)
    )
    loss.backward()
    return loss, [h.grad for h in exits], head.grad


def test_token_weights_match_float64(kernels):
    hiddens, weight, targets = make_inputs(2, 24, ignored=0.25)
    weight = weight.detach()[:53].requires_grad_()  # an odd vocabulary: every mask used
    targets = torch.where(targets == -100, -100, targets % 53)
    token_weights = torch.rand(N) * 3
    token_weights[torch.rand(N) < 0.3] = 0.0
    assert (targets == -100).any() and (token_weights[targets != -100] == 0).any()
    out = multi_exit_cross_entropy(hiddens, weight, targets, [1.3, 0.0], token_weights=token_weights)
    out.loss.backward()
    loss, grad_exits, grad_head = token_weighted_float64(hiddens, weight, targets, [1.3, 0.0], token_weights)
    tol = TOL[torch.float32]
    torch.testing.assert_close(out.loss.double(), loss, **tol)
    torch.testing.assert_close(hiddens[0].grad.double(), grad_exits[0], **tol)
    assert hiddens[1].grad is None or not hiddens[1].grad.any()  # the weight-0 exit
    torch.testing.assert_close(weight.grad.double(), grad_head, **tol)
    reference = multi_exit_cross_entropy_reference(
        [h.detach().double() for h in hiddens], weight.detach().double(), targets, [1.3, 0.0],
        token_weights=token_weights.double(),
    )  # fmt: skip
    torch.testing.assert_close(reference.loss, loss.detach())
    unweighted = multi_exit_cross_entropy(hiddens, weight, targets, [1.3, 0.0])
    torch.testing.assert_close(out.per_exit, unweighted.per_exit)  # statistics stay unweighted


def test_unit_token_weights_equal_none_exactly(kernels):
    hiddens, weight, targets = make_inputs(2, 24, stacked=True)
    grads = []
    for token_weights in (None, torch.ones(N)):
        hiddens.grad = weight.grad = None
        out = multi_exit_cross_entropy(hiddens, weight, targets, [0.7, 1.3], token_weights=token_weights)
        out.loss.backward()
        grads.append((out.loss, out.per_exit, hiddens.grad, weight.grad))
    for unweighted, weighted in zip(*grads):
        assert torch.equal(unweighted, weighted)


def test_zero_token_weights_give_zero_loss_and_gradients(kernels):
    hiddens, weight, targets = make_inputs(2, 24)
    out = multi_exit_cross_entropy(hiddens, weight, targets, [1.0, 0.5], token_weights=torch.zeros(N))
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.per_exit.all()  # per_exit stays the unweighted mean
    assert all(not h.grad.any() for h in hiddens) and not weight.grad.any()


@pytest.mark.parametrize(
    "token_weights, message",
    [
        (torch.ones(N + 1), r"token_weights must have shape \(37,\) to match the targets; got \(38,\)"),
        (torch.ones(1, N), r"got \(1, 37\)"),
        (torch.ones(N, dtype=torch.long), "token_weights must be a floating-point tensor; got torch.int64"),
        (torch.tensor([1.0] * (N - 1) + [-0.5]), "token weight -0.5 is negative or not finite"),
        (torch.tensor([float("nan")] + [1.0] * (N - 1)), "token weight nan is negative or not finite"),
        (torch.tensor([1.0, float("inf")] + [1.0] * (N - 2)), "token weight inf is negative or not finite"),
    ],
)
def test_token_weight_errors(kernels, token_weights, message):
    hiddens, weight, targets = make_inputs(2, 24)
    for fn in (multi_exit_cross_entropy, multi_exit_cross_entropy_reference):
        with pytest.raises(ValueError, match=message):
            fn(hiddens, weight, targets, [1.0, 1.0], token_weights=token_weights)


def test_token_weight_check_without_host_sync(monkeypatch):
    """Like the target check: torch._assert_async on a GPU and under torch.compile."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    hiddens, weight, targets = make_inputs(2, 24)
    token_weights = torch.rand(N)
    multi_exit_cross_entropy(hiddens, weight, targets, [1.0, 1.0], token_weights=token_weights)
    token_weights[5] = -1.0
    with pytest.raises(RuntimeError, match="a token weight is negative or not finite"):
        multi_exit_cross_entropy(hiddens, weight, targets, [1.0, 1.0], token_weights=token_weights)


def test_target_check_without_host_sync(monkeypatch):
    """On a GPU and under torch.compile the target check is torch._assert_async, never a sync."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    hiddens, weight, targets = make_inputs(2, 24)
    multi_exit_cross_entropy(hiddens, weight, targets, [1.0, 1.0])  # valid targets pass
    targets[3] = V
    with pytest.raises(RuntimeError, match=f"outside \\[0, {V}\\) or ignore_index=-100"):
        multi_exit_cross_entropy(hiddens, weight, targets, [1.0, 1.0])


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


class KernelCounter(TorchDispatchMode):
    """Torch ops that would launch a kernel (views, allocations and dtype queries launch none)."""

    FREE = {"view", "_unsafe_view", "t", "transpose", "detach", "alias", "empty", "empty_strided", "new_empty",
            "promote_types", "slice", "select", "expand", "reshape", "unsqueeze", "squeeze"}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.split("::")[-1] not in self.FREE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("with_stats, token_weights", [(False, False), (True, True)])
def test_fused_call_launches_at_most_five_kernels(monkeypatch, with_stats, token_weights):
    """One training call of the fused loss (forward, and the backward's scaling) is its Triton
    launches and no torch kernel in between; the op's body runs under the counter too."""
    monkeypatch.setenv("LASH_KERNELS", "triton")
    launches = []
    real_launch = fused.launch

    class CountingLaunch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append(self.kernel.fn.__name__)
                with _disable_current_modes():  # the interpreter's own tensor work is not a launch
                    return real_launch(self.kernel)[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(fused, "launch", CountingLaunch)
    monkeypatch.setattr(token_weights_module, "launch", CountingLaunch)
    hiddens, weight, targets = make_inputs(3, 24, stacked=True)
    weights = torch.rand(N) if token_weights else None
    with KernelCounter() as outside:
        out = multi_exit_cross_entropy(hiddens, weight, targets, [0.5, 1.0, 2.0], return_stats=with_stats,
                                       validate=False, token_weights=weights)  # fmt: skip
    with KernelCounter() as inside:  # what the op's body dispatches, launches aside
        fused.run_fused(hiddens.detach(), weight.detach(), targets, weights, [0.5, 1.0, 2.0], -100, with_stats,
                        True, True)  # fmt: skip
    seed = torch.ones(())
    with KernelCounter() as backward:
        out.loss.backward(seed)
    assert outside.ops == ["lash::multi_exit_ce"] and inside.ops == []
    assert backward.ops == ["aten::_foreach_mul"]  # dH and dW times the incoming gradient, in one launch
    per_call = launches[: len(launches) // 2]
    scaling = ["_token_weights_kernel"] if token_weights else []  # the token weights over their maximum
    rest = ["_fused_merge_kernel", "_fused_grad_kernel", "_fused_finish_kernel"]
    assert per_call == ["_fused_forward_kernel", *scaling, *rest]
    assert len(per_call) + len(backward.ops) <= 6 and len(per_call) <= 5
    expected = multi_exit_cross_entropy_reference(hiddens.detach().double(), weight.detach().double(), targets,
                                                  [0.5, 1.0, 2.0], token_weights=weights)  # fmt: skip
    torch.testing.assert_close(out.loss.double(), expected.loss, **TOL[torch.float32])


def test_torch_path_never_holds_all_logits(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "torch")
    monkeypatch.setattr(chunked, "CPU_CHUNK_BYTES", 2**22)  # 128-row chunks
    K, n, vocab, D = 3, 512, 8192, 32
    hiddens = torch.randn(K, n, D, requires_grad=True)
    weight = torch.randn(vocab, D, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    with LargestTensor() as forward:
        out = multi_exit_cross_entropy(hiddens, weight, targets, [1.0, 1.0, 1.0], validate=False)
    with LargestTensor() as backward:
        out.loss.backward()
    chunk_logits = chunk_rows(vocab) * vocab
    assert chunk_logits <= n * vocab // 4  # the check below would be meaningless otherwise
    # The largest tensor is one chunk's logits: seen (so the mode watched the forward), never more;
    # the backward only scales the gradients the forward formed.
    assert forward.numel == chunk_logits
    assert backward.numel == max(K * n * D, vocab * D)
    expected = multi_exit_cross_entropy_reference(hiddens.detach(), weight.detach(), targets, [1.0, 1.0, 1.0])
    torch.testing.assert_close(out.loss, expected.loss)


def test_torch_path_compiles_without_graph_breaks(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "torch")
    hiddens, weight, targets = make_inputs(3, 24, stacked=True)

    @torch.compile(fullgraph=True)
    def step(hiddens, weight, targets):
        out = multi_exit_cross_entropy(hiddens, weight, targets, [1.0, 0.0, 0.5], return_stats=True)
        return out.loss, out.per_exit, out.confidence, out.predictions

    loss, per_exit, confidence, predictions = step(hiddens, weight, targets)
    loss.backward()
    expected = multi_exit_cross_entropy_reference(hiddens, weight, targets, [1.0, 0.0, 0.5], return_stats=True)
    torch.testing.assert_close(loss, expected.loss)
    torch.testing.assert_close(per_exit, expected.per_exit)
    torch.testing.assert_close(confidence, expected.confidence)
    torch.testing.assert_close(predictions, expected.predictions)
    _, _, grad_exits, grad_head = float64_reference(hiddens, weight, targets, [1.0, 0.0, 0.5])
    torch.testing.assert_close(hiddens.grad.double(), torch.stack(grad_exits), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad.double(), grad_head, atol=1e-5, rtol=1e-5)


def test_a_fullgraph_compile_takes_new_exit_weights(monkeypatch):
    """Dynamo traces the weights as symbolic floats once it has seen two sets; the checks must trace."""
    monkeypatch.setenv("LASH_KERNELS", "torch")
    torch._dynamo.reset()
    hiddens, weight, targets = make_inputs(2, 24, stacked=True)
    step = torch.compile(lambda h, w, y, weights: multi_exit_cross_entropy(h, w, y, weights).loss, fullgraph=True)
    for weights in ([1.0, 0.5], [0.5, 0.5], [0.2, 0.3]):
        expected = multi_exit_cross_entropy_reference(hiddens, weight, targets, weights).loss
        torch.testing.assert_close(step(hiddens, weight, targets, weights), expected)


def test_torch_path_under_cpu_autocast(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "torch")
    hiddens, weight, targets = make_inputs(2, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = multi_exit_cross_entropy(hiddens, weight, targets, [1.0, 1.0])
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and weight.grad.dtype == torch.float32
    expected = multi_exit_cross_entropy_reference(
        [h.detach().bfloat16() for h in hiddens], weight.detach().bfloat16(), targets, [1.0, 1.0]
    )
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 256, 1024])  # fused (bf16 at 256; fp32 from 128 is chunked), chunked
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu_matches_reference_and_compiles(monkeypatch, dtype, D):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    torch._dynamo.reset()  # a worker runs many of these compiles: each starts below the recompile limit
    K, n, vocab, weights = 3, 1000, 32000, [1.0, 0.0, 0.5]
    hiddens = torch.randn(K, n, D, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, D, device="cuda") / D**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    targets[::7] = -100
    tol = TOL[dtype] if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)

    expected = multi_exit_cross_entropy_reference(hiddens, weight, targets, weights, return_stats=True)
    expected_grads = torch.autograd.grad(expected.loss, [hiddens, weight])
    logits = hiddens.detach().float() @ weight.detach().float().T  # (K, n, V)
    step = torch.compile(multi_exit_cross_entropy, fullgraph=True)
    for fn in (multi_exit_cross_entropy, step):
        out = fn(hiddens, weight, targets, weights, return_stats=True)
        grads = torch.autograd.grad(out.loss, [hiddens, weight])
        torch.testing.assert_close(out.loss, expected.loss, **tol)
        torch.testing.assert_close(out.per_exit, expected.per_exit, **tol)
        torch.testing.assert_close(out.confidence, expected.confidence, **tol)
        # Predictions may differ only where the two classes' logits (fp32 from the same inputs) tie
        # within rounding: bf16 inputs give many near-ties among 32000 classes.
        chosen, wanted = (logits.gather(-1, p.unsqueeze(-1)) for p in (out.predictions, expected.predictions))
        # The chunked regime takes the argmax of logits rounded to the input dtype (cuBLAS output).
        assert ((chosen - wanted).abs() <= max(2 * torch.finfo(dtype).eps, 1e-4) * logits.abs().amax()).all()
        for grad, ref in zip(grads, expected_grads):
            torch.testing.assert_close(grad.float(), ref.float(), **tol)
        assert not grads[0][1].any()  # the weight-0 exit


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 1024])  # fused, chunked
def test_compiles_when_shapes_change_on_gpu(monkeypatch, D):
    """Dynamo recompiles with symbolic sizes once tokens, width or vocabulary change between calls."""
    monkeypatch.setenv("LASH_KERNELS", "triton")
    torch._dynamo.reset()  # the sizes this test changes are the only ones dynamo has seen
    step = torch.compile(multi_exit_cross_entropy, fullgraph=True)
    for n, width, vocab in ((300, D, 5000), (517, D + 32, 5000), (411, D + 64, 6000)):
        hiddens = torch.randn(2, n, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = (torch.randn(vocab, width, device="cuda") / width**0.5).bfloat16().requires_grad_()
        targets = torch.randint(0, vocab, (n,), device="cuda")
        expected = multi_exit_cross_entropy_reference(hiddens, weight, targets, [0.5, 0.5])
        out = step(hiddens, weight, targets, [0.5, 0.5])
        torch.testing.assert_close(out.loss, expected.loss, **TOL[torch.bfloat16])
        grads = torch.autograd.grad(out.loss, [hiddens, weight])
        for grad, ref in zip(grads, torch.autograd.grad(expected.loss, [hiddens, weight])):
            torch.testing.assert_close(grad.float(), ref.float(), **TOL[torch.bfloat16])
