"""Eager CUDA calls take each op's twin ``autograd.Function``; it must give the op's results exactly.

Under the interpreter calls take the registered ops (``lash_kernels._launch.through_op``); here the
choice is forced both ways on the same inputs, and outputs and every gradient must be equal.
"""

import inspect
import sys

import pytest
import torch

from lash_kernels import _launch, add_rms_norm, apply_rotary, multi_exit_cross_entropy, rms_norm, swiglu
from tests.lash.counting import OpCounter


def _cases():
    x, r, w = torch.randn(5, 37), torch.randn(5, 37), torch.rand(37) + 0.5
    q, k = torch.randn(2, 3, 7, 16), torch.randn(2, 1, 7, 16)
    angles = torch.arange(7)[:, None] * torch.rand(8)[None, :]  # half tables
    hiddens, head, targets = torch.randn(2, 9, 16), torch.randn(40, 16) / 4, torch.randint(0, 40, (9,))
    return {
        "rms_norm": (lambda x, w: rms_norm(x, w), (x, w)),
        "add_rms_norm": (lambda x, r, w: add_rms_norm(x, r, w), (x, r, w)),
        "rotary": (lambda q, k: apply_rotary(q, k, angles.cos(), angles.sin()), (q, k)),
        "swiglu": (swiglu, (torch.randn(3, 5, 38),)),
        "multi_exit_ce": (lambda h, W, y=targets: multi_exit_cross_entropy(h, W, y, [0.3, 0.7]).loss, (hiddens, head)),
    }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_twin_function_equals_the_op(case, monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    fn, inputs = _cases()[case]
    results = {}
    for via_op in (True, False):
        monkeypatch.setattr(_launch, "through_op", lambda via_op=via_op: via_op)
        leaves = [t.clone().requires_grad_() for t in inputs]
        with OpCounter() as counter:
            out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
        results[via_op] = (outs, grads, [k for k in counter.kernels if k.startswith("lash::")])
    (op_out, op_grads, op_kernels), (twin_out, twin_grads, twin_kernels) = results[True], results[False]
    assert op_kernels and not twin_kernels  # each path really taken
    for a, b in zip(op_out + op_grads, twin_out + twin_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", sorted(_cases()))
def test_the_twin_launches_its_kernels_directly_forward_and_backward(case, monkeypatch):
    """On CUDA ``wrap_triton`` routes a launch through torch's higher-order op (about a
    millisecond of host time and a record kept per launch); an eager twin call, its backward
    included, must launch the kernel itself, as a ``triton_op`` does for real tensors. Here the
    launcher decides as on CUDA (not interpreting), and the kernels still run in the interpreter."""
    monkeypatch.setenv("LASH_KERNELS", "triton")
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(_launch, "wrap_triton", lambda kernel: pytest.fail("a launch went through wrap_triton"))
    direct = []

    def recording_launch(kernel):
        launched = _launch.launch(kernel)
        direct.append(launched is kernel)
        return launched

    modules = [m for name, m in sys.modules.items() if name.startswith("lash_kernels.ops") and getattr(m, "launch", None) is _launch.launch]
    assert len(modules) >= 4
    for module in modules:
        monkeypatch.setattr(module, "launch", recording_launch)
    fn, inputs = _cases()[case]
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    forward_launches = len(direct)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    assert forward_launches > 0 and (len(direct) > forward_launches or case == "multi_exit_ce")  # its gradients come from the forward
    assert all(direct), direct
    assert not getattr(_launch._direct, "on", False)  # the flag does not outlive the call


@pytest.mark.parametrize("case", sorted(_cases()))
def test_a_twin_call_records_no_graph_it_does_not_need(case, monkeypatch):
    """A twin call without inputs that require gradients runs the op's bare body: no autograd
    ``apply``, whose bookkeeping costs the host about as much as a small op's body. One that
    records a graph binds no signature (a Function with a ``setup_context`` has ``apply`` run
    ``inspect.signature`` on every call: about 40 µs on a 2-core CPU)."""
    from lash_kernels.ops.multi_exit_ce import kernels as ce_kernels
    from lash_kernels.ops.rms_norm import kernels as norm_kernels
    from lash_kernels.ops.rotary import kernels as rotary_kernels
    from lash_kernels.ops.swiglu import kernels as swiglu_kernels

    monkeypatch.setenv("LASH_KERNELS", "triton")
    fn, inputs = _cases()[case]
    expected = fn(*inputs)
    monkeypatch.setattr(_launch, "through_op", lambda: False)
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: pytest.fail("a signature was bound"))
    leaves = [t.clone().requires_grad_() for t in inputs]
    assert fn(*leaves) is not None  # apply, with a graph to record
    twins = [norm_kernels.RMSNormFunction, norm_kernels.AddRMSNormFunction, rotary_kernels.RotaryFunction,
             swiglu_kernels.SwigluFunction, ce_kernels.MultiExitCEFunction]  # fmt: skip
    for twin in twins:
        monkeypatch.setattr(twin, "apply", classmethod(lambda cls, *args: pytest.fail(f"{cls.__name__}.apply ran")))
    for got, want in zip(*(out if isinstance(out, tuple) else (out,) for out in (fn(*inputs), expected))):
        assert torch.equal(got, want) and got.grad_fn is None
    with torch.no_grad():
        fn(*leaves)

