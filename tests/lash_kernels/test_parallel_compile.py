"""parallel_compile.compile_ahead: a function's launches become compiles on a thread pool, one kernel's in order.

Real compiles need a GPU's driver; on the CPU the launcher sees stand-in kernels that record their
``warmup`` calls (Triton's compile-without-launch), with the interpreter's bypass turned off.
"""

import inspect
import threading
import time

import pytest
import torch

import lash_kernels._launch
from lash_kernels import compile_ahead
from lash_kernels._launch import launch


class Kernel:
    """Records each warmup (compile) call: its grid, arguments, thread and time span."""

    def __init__(self, name, seconds=0.05, error=None):
        self.name, self.seconds, self.error = name, seconds, error
        self.calls = []

    def warmup(self, *args, grid, **kwargs):
        start = time.perf_counter()
        time.sleep(self.seconds)
        self.calls.append((grid, args, kwargs, threading.current_thread().name, start, time.perf_counter()))
        if self.error is not None:
            raise self.error


@pytest.fixture
def compiled_kernels(monkeypatch):
    monkeypatch.setattr(lash_kernels._launch, "interpreting", lambda: False)
    monkeypatch.setattr(lash_kernels._launch, "wrap_triton", lambda kernel: ("launched", kernel))


def test_launches_compile_on_worker_threads_and_run_nothing(compiled_kernels):
    a, b = Kernel("a"), Kernel("b")
    x = torch.zeros(3)

    def step():
        launch(a)[(4,)](x, 7, BLOCK=16)
        launch(b)[(2, 3)](x, BLOCK=32)
        return x.add_(1)  # the function's torch ops still run

    compile_ahead(step, workers=2)
    assert [c[:3] for c in a.calls] == [((4,), (x, 7), {"BLOCK": 16})]
    assert [c[:3] for c in b.calls] == [((2, 3), (x,), {"BLOCK": 32})]
    assert all(c[3].startswith("lash-compile") for c in a.calls + b.calls)
    assert torch.equal(x, torch.ones(3))


def test_one_kernels_launches_compile_in_order_and_kernels_in_parallel(compiled_kernels):
    norm, rope = Kernel("norm"), Kernel("rope")

    def step():
        for _ in range(3):  # a kernel launched once per layer
            launch(norm)[(1,)](1)
            launch(rope)[(1,)](2)

    compile_ahead(step, workers=2)
    for kernel in (norm, rope):
        assert len(kernel.calls) == 3
        spans = sorted(c[4:] for c in kernel.calls)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))  # never two at once
    overlaps = [(a, b) for a in norm.calls for b in rope.calls if a[4] < b[5] and b[4] < a[5]]
    assert overlaps  # the two kernels compiled at the same time


def test_launches_from_another_thread_compile_too(compiled_kernels):
    kernel = Kernel("backward")

    def step():  # autograd launches the backward's kernels from its own thread
        worker = threading.Thread(target=lambda: launch(kernel)[(1,)](5))
        worker.start()
        worker.join()

    compile_ahead(step)
    assert len(kernel.calls) == 1


def test_a_compile_error_is_raised_when_the_pass_ends(compiled_kernels):
    good, bad = Kernel("good"), Kernel("bad", error=RuntimeError("ptxas failed"))

    def step():
        launch(bad)[(1,)](1)
        launch(good)[(1,)](1)

    with pytest.raises(RuntimeError, match="ptxas failed"):
        compile_ahead(step)
    assert len(good.calls) == 1  # the other kernels still compiled


def test_outside_a_pass_a_launch_is_a_launch_and_passes_do_not_nest(compiled_kernels):
    kernel = Kernel("k")
    assert launch(kernel) == ("launched", kernel)

    def nested():
        compile_ahead(lambda: None)

    with pytest.raises(RuntimeError, match="compile_ahead is already running"):
        compile_ahead(nested)
    assert launch(kernel) == ("launched", kernel)  # the failed pass left nothing behind


def test_under_the_interpreter_kernels_launch_as_they_are():
    kernel = Kernel("k")
    seen = []
    compile_ahead(lambda: seen.append(launch(kernel)))
    assert seen == [kernel] and kernel.calls == []


@pytest.mark.gpu
def test_after_a_pass_the_step_compiles_nothing_and_computes_as_without_one(monkeypatch):
    from triton.runtime.jit import JITFunction

    from lash_kernels import multi_exit_cross_entropy, rms_norm

    compiles = []  # warmup flags of Triton's compiles: True in the pass, False at a launch
    real = JITFunction._do_compile

    def counting(self, *args, **kwargs):
        compiles.append(inspect.signature(real).bind(self, *args, **kwargs).arguments["warmup"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "_do_compile", counting)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 37, 72, device="cuda", generator=g, requires_grad=True)  # a width no other test uses
    norm = torch.rand(72, device="cuda", generator=g) + 0.5
    head = torch.randn(301, 72, device="cuda", generator=g, requires_grad=True)
    y = torch.randint(0, 301, (74,), device="cuda", generator=g)

    def step():
        x.grad = head.grad = None
        h = rms_norm(x, norm).reshape(-1, 72)
        loss = multi_exit_cross_entropy([h, h * 0.5], head, y, [0.3, 0.7]).loss
        loss.backward()
        return loss.detach(), x.grad, head.grad

    compile_ahead(step)
    assert compiles and all(compiles)  # the pass compiled, and only as warm-ups
    compiles.clear()
    loss, dx, dhead = step()
    assert compiles == []  # the step found every kernel compiled
    monkeypatch.setattr(JITFunction, "_do_compile", real)
    expected = step()
    torch.testing.assert_close((loss, dx, dhead), expected, rtol=0, atol=0)
