"""``benchmarks/measure.py``'s timing logic on the CPU: providers interleaved round by round, each
one's median and spread, the rotation of input sets, the same-size copy's bytes, the host timer."""

import contextlib
import importlib
import os
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def measure(monkeypatch):
    # Importing measure without CUDA sets LASH_KERNELS=torch; the fixture keeps that to the test.
    monkeypatch.setenv("LASH_KERNELS", os.environ.get("LASH_KERNELS", "torch"))
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("measure")


def test_interleaved_times_every_provider_once_per_round_and_reports_median_and_spread(measure):
    order = []
    times = {"copy": iter([4.0, 2.0, 3.0, 1.0, 5.0]), "lash": iter([2.0, 2.0, 2.0, 2.0, 2.0])}

    def timer(name):
        def one_timing():
            order.append(name)
            return next(times[name])

        return one_timing

    results = measure.interleaved({"copy": timer("copy"), "lash": timer("lash")}, repeats=5)
    assert order == ["copy", "lash"] * 5  # drift hits both alike
    assert results["copy"] == {"median_s": 3.0, "spread": (5.0 - 1.0) / 3.0, "times_s": [4.0, 2.0, 3.0, 1.0, 5.0]}
    assert results["lash"]["median_s"] == 2.0 and results["lash"]["spread"] == 0.0
    assert measure.REPEATS >= 5


def test_rotation_cycles_through_its_input_sets(measure):
    rotation = measure.Rotation(lambda i=i: i for i in range(3))
    assert len(rotation.calls) == 3
    assert [rotation() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_input_sets_pass_the_l2_on_cuda(measure, monkeypatch):
    assert measure.input_sets(2**10) == 1  # the CPU has no L2 to flush between wall-clock calls
    monkeypatch.setattr(measure, "ON_GPU", True)
    assert measure.input_sets(64 * 2**20) == measure.L2_FLUSH_BYTES // (64 * 2**20)
    assert measure.input_sets(2**30) == 1
    assert measure.input_sets(2**10) == measure.MAX_INPUT_SETS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_size_copy_reads_and_writes_the_bytes_asked_for(measure, dtype):
    nbytes = 3 * 256 * 128 * torch.finfo(dtype).bits // 8  # rms_norm backward at 256 × 128: three tensors
    copy = measure.same_size_copy(nbytes, dtype)
    dst = copy()
    assert dst.dtype == dtype and 2 * dst.numel() * dst.element_size() == nbytes  # src and dst alike
    assert torch.isfinite(dst.float()).all()  # the source was copied, not left empty
    with pytest.raises(AssertionError, match="do not split"):
        measure.same_size_copy(nbytes + 2, dtype)


def test_cpu_timers_return_seconds_per_call(measure):
    calls = []
    timer, method = measure.device_timer(measure.Rotation([lambda: calls.append(1)]))
    assert timer() > 0 and "wall clock" in method
    calls.clear()
    host = measure.host_timer(lambda: calls.append(1), calls=7)
    assert len(calls) == 10  # the warm-up
    assert host() > 0 and len(calls) == 17


def test_a_provider_that_syncs_with_the_host_is_timed_in_few_calls_over_its_sets(measure, monkeypatch):
    """On CUDA a call that synchronises cannot be graphed; at 0.13 s a call (Liger-Kernel's loss at
    the seed's width) it must be timed in a handful of calls, not rounds over all 64 input sets."""
    calls = []

    class Event:  # a CUDA event that reads the simulated clock: 0.13 s per call made
        def __init__(self, enable_timing):
            self.at = 0

        def record(self):
            self.at = len(calls)

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.at - self.at) * 130.0

    monkeypatch.setattr(measure, "ON_GPU", True)
    monkeypatch.setattr(measure, "on_capture_stream", contextlib.nullcontext)
    monkeypatch.setattr(measure, "host_syncs", lambda step, warmup: [step() for _ in range(warmup + 1)] and ["liger/loss.py:132"])
    monkeypatch.setattr(torch.cuda, "Event", Event)
    timer, method = measure.device_timer(measure.Rotation(lambda i=i: calls.append(i) for i in range(64)))
    assert "host syncs at liger/loss.py:132" in method
    assert [timer() for _ in range(measure.REPEATS)] == [pytest.approx(0.13)] * measure.REPEATS
    assert len(calls) <= 4 + measure.REPEATS  # warm-up and sync check, the calibration, the timings
    assert len(set(calls[3:])) == len(calls) - 3  # the timed calls rotate through the sets
