"""Probes of the kernel ops' inputs: every bad input gets a named ValueError, every odd one the right result.

Each probe runs on both backends where both apply (the Triton one through the interpreter, so
shapes stay tiny); ``triton-chunked`` forces the loss's chunked Triton regime on the same shapes.
"""

import math
import re

import pytest
import torch

from lash_kernels import (
    RMSNorm,
    add_rms_norm,
    apply_rotary,
    multi_exit_cross_entropy,
    multi_exit_cross_entropy_reference,
    rms_norm,
)
from lash_kernels.ops.multi_exit_ce import regime

N, V, D = 9, 11, 8  # 7 labelled tokens: token weights ≥ 6e37 overflow an fp32 sum


@pytest.fixture(params=["torch", "triton"])
def kernels(request, monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", request.param)
    return request.param


@pytest.fixture(params=["torch", "triton", "triton-chunked", "reference"])
def loss_fn(request, monkeypatch):
    """The loss on each backend (``triton-chunked``: the chunked Triton regime), or its reference."""
    if request.param == "reference":
        return multi_exit_cross_entropy_reference
    monkeypatch.setenv("LASH_KERNELS", request.param.removesuffix("-chunked"))
    if request.param == "triton-chunked":
        monkeypatch.setattr(regime, "FUSED_MAX_HIDDEN", 0)
    return multi_exit_cross_entropy


@pytest.fixture(params=["torch", "triton", "reference"])
def checked_loss(request, monkeypatch):
    """The loss on each backend, or its reference: the functions that check the loss's inputs."""
    if request.param == "reference":
        return multi_exit_cross_entropy_reference
    monkeypatch.setenv("LASH_KERNELS", request.param)
    return multi_exit_cross_entropy


def loss_inputs(K=2):
    """Stacked exits, head and targets (one ignored) of a tiny problem."""
    hiddens = torch.randn(K, N, D, requires_grad=True)
    weight = (torch.randn(V, D) / D**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[2] = -100
    return hiddens, weight, targets


def loss_and_grads(loss_fn, hiddens, weight, targets, token_weights):
    """The loss of ``loss_fn`` with ``token_weights`` and its gradients in both inputs."""
    hiddens.grad = weight.grad = None
    loss = loss_fn(hiddens, weight, targets, [1.0, 0.5], token_weights=token_weights).loss
    loss.backward()
    return loss.detach(), hiddens.grad, weight.grad


@pytest.mark.parametrize(
    "dtype, scale",
    [(torch.float32, 6e37), (torch.float32, 1e-42), (torch.float64, 1e300), (torch.float64, 1e-310)],
    ids=["fp32-overflowing-sum", "fp32-subnormal", "fp64-above-fp32", "fp64-subnormal"],
)
def test_token_weight_scale_does_not_change_the_loss(loss_fn, dtype, scale):
    """Token weights of any finite scale give the loss and gradients of the same weights scaled to max 1."""
    hiddens, weight, targets = loss_inputs()
    token_weights = (torch.rand(N, dtype=dtype) + 1.0) * scale  # (N,) each in [scale, 2·scale)
    token_weights[4] = 0.0
    unit = (token_weights.double() / token_weights.double().max()).float()  # the same weights, max 1
    got = loss_and_grads(loss_fn, hiddens, weight, targets, token_weights)
    want = loss_and_grads(loss_fn, hiddens, weight, targets, unit)
    assert want[0] > 0.1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * w.abs().max().item())


def test_strided_token_weights_give_the_contiguous_result(loss_fn):
    """Token weights that are a strided view weigh the tokens as their contiguous copy does."""
    hiddens, weight, targets = loss_inputs()
    token_weights = torch.rand(N, 2)[:, 0]  # stride 2
    got = loss_and_grads(loss_fn, hiddens, weight, targets, token_weights)
    want = loss_and_grads(loss_fn, hiddens, weight, targets, token_weights.contiguous())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("hiddens", [[], torch.zeros(0, N, D)], ids=["empty-list", "stacked-K0"])
def test_no_exits_is_a_named_error(checked_loss, hiddens):
    """K = 0 exits raise ValueError naming hiddens, exit_weights and the least number of exits, 1."""
    weight, targets = torch.randn(V, D), torch.randint(0, V, (N,))
    with pytest.raises(ValueError, match=r"hiddens hold 0 exits and exit_weights 0; the number of exits must be ≥ 1"):
        checked_loss(hiddens, weight, targets, [])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_targets_of_any_dtype_give_the_int64_result(checked_loss, dtype):
    """Targets of any integer dtype give the loss and statistics of the same targets in int64."""
    hiddens, weight, targets = loss_inputs()
    targets[2] = 3  # uint8 has no -100
    got = checked_loss(hiddens, weight, targets.to(dtype), [1.0, 0.5], return_stats=True)
    want = checked_loss(hiddens, weight, targets, [1.0, 0.5], return_stats=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("ignore_index", [-100.0, 0.5, True, None, "-100"])
def test_non_int_ignore_index_is_a_named_error(checked_loss, ignore_index):
    """An ignore_index that is not an int (a float, a bool, None, a string) raises ValueError naming it."""
    hiddens, weight, targets = loss_inputs()
    with pytest.raises(ValueError, match=rf"ignore_index={ignore_index!r} must be an int"):
        checked_loss(hiddens, weight, targets, [1.0, 0.5], ignore_index=ignore_index)


def re_escape(value) -> str:
    """``repr(value)`` as a regular expression."""
    return re.escape(repr(value))


BAD_EPS = [math.inf, -math.inf, math.nan, -1e-6, True, None, "1e-6", torch.tensor(1e-6)]
NORMS = {
    "rms_norm": lambda eps: rms_norm(torch.randn(3, D), torch.ones(D), eps=eps),
    "add_rms_norm": lambda eps: add_rms_norm(torch.randn(3, D), torch.randn(3, D), torch.ones(D), eps=eps),
    "RMSNorm": lambda eps: RMSNorm(D, eps=eps),
}


@pytest.mark.parametrize("eps", BAD_EPS, ids=repr)
@pytest.mark.parametrize("norm", NORMS)
def test_eps_outside_finite_non_negative_reals_is_a_named_error(kernels, norm, eps):
    """An eps that is not a finite real ≥ 0 (inf, nan, negative, bool, not a number) raises ValueError naming it."""
    with pytest.raises(ValueError, match=rf"eps={re_escape(eps)} must be a finite real number ≥ 0"):
        NORMS[norm](eps)


@pytest.mark.parametrize("norm", NORMS)
def test_integer_eps_gives_the_float_result(kernels, norm):
    """An integer eps (an int is a finite real) gives the result of the same eps as a float."""
    torch.manual_seed(0)
    got = NORMS[norm](1)
    torch.manual_seed(0)
    want = NORMS[norm](1.0)
    if norm == "RMSNorm":
        got, want = got(torch.ones(2, D)), want(torch.ones(2, D))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
@pytest.mark.parametrize("norm", ["rms_norm", "add_rms_norm"])
def test_non_floating_norm_weight_is_a_named_error(kernels, norm, dtype):
    """A weight of a non-floating dtype raises ValueError naming weight and its dtype."""
    x, weight = torch.randn(3, D), torch.ones(D, dtype=dtype)
    call = (lambda: rms_norm(x, weight)) if norm == "rms_norm" else (lambda: add_rms_norm(x, x, weight))
    with pytest.raises(ValueError, match=rf"weight must be a floating tensor; got {dtype}"):
        call()


@pytest.mark.parametrize("dim", [8.0, True, 0, -1, "8", None])
def test_rmsnorm_dim_must_be_an_int_of_at_least_1(dim):
    """RMSNorm(dim) with a dim that is not an int ≥ 1 (a float, a bool, a string) raises ValueError naming it."""
    with pytest.raises(ValueError, match=rf"dim={re_escape(dim)} must be an int ≥ 1"):
        RMSNorm(dim)


def rope_call(**change):
    """``apply_rotary`` on tiny CPU q, k and tables, with ``change`` applied to its arguments."""
    args = dict(q=torch.randn(1, 2, 3, D), k=torch.randn(1, 1, 3, D), cos=torch.randn(3, D), sin=torch.randn(3, D))
    return lambda: apply_rotary(**args | change)


def loss_call(**change):
    """``multi_exit_cross_entropy`` on a tiny CPU problem, with ``change`` applied to its arguments."""
    hiddens, weight, targets = loss_inputs()
    args = dict(hiddens=hiddens.detach(), weight=weight.detach(), targets=targets, exit_weights=[1.0, 0.5])
    return lambda: multi_exit_cross_entropy(**args | change)


META = torch.device("meta")
TWO_DEVICES = {  # case: (call, the start of its error message)
    "rms_norm-weight": (
        lambda: rms_norm(torch.randn(3, D), torch.ones(D, device=META)), "weight is on meta but x is on cpu"
    ),
    "rms_norm-x": (lambda: rms_norm(torch.randn(3, D, device=META), torch.ones(D)), "weight is on cpu but x is on meta"),
    "add_rms_norm-residual": (
        lambda: add_rms_norm(torch.randn(3, D), torch.randn(3, D, device=META), torch.ones(D)),
        "residual is on meta but x is on cpu",
    ),
    "add_rms_norm-weight": (
        lambda: add_rms_norm(torch.randn(3, D), torch.randn(3, D), torch.ones(D, device=META)),
        "weight is on meta but x is on cpu",
    ),
    "rotary-tables": (
        rope_call(cos=torch.randn(3, D, device=META), sin=torch.randn(3, D, device=META)), "cos is on meta but q is on cpu"
    ),
    "rotary-k": (rope_call(k=torch.randn(1, 1, 3, D, device=META)), "k is on meta but q is on cpu"),
    "rotary-positions": (rope_call(positions=torch.arange(3, device=META)), "positions is on meta but q is on cpu"),
    "loss-head": (loss_call(weight=torch.randn(V, D, device=META)), "weight is on meta but hiddens is on cpu"),
    "loss-targets": (
        loss_call(targets=torch.zeros(N, dtype=torch.long, device=META)), "targets is on meta but hiddens is on cpu"
    ),
    "loss-token-weights": (
        loss_call(token_weights=torch.ones(N, device=META)), "token_weights is on meta but hiddens is on cpu"
    ),
    "loss-one-exit": (
        loss_call(hiddens=[torch.randn(N, D), torch.randn(N, D, device=META)]),
        r"hiddens\[1\] is on meta but hiddens\[0\] is on cpu",
    ),
}


@pytest.mark.parametrize("case", TWO_DEVICES)
def test_inputs_on_two_devices_are_a_named_error(kernels, case):
    """Tensor inputs of one op on two devices raise ValueError naming the argument and both devices."""
    call, message = TWO_DEVICES[case]
    with pytest.raises(ValueError, match=f"^{message}; they must be on one device$"):
        call()
