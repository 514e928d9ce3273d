"""A whole training step at the seed configuration: LASH against the eager reference.

One step = forward through every layer, the loss of every supervised exit through the shared
head, backward, and an AdamW update (``model_bench.train_step_call``), in fp32 and bf16
autocast. Providers:

* ``eager``: the seed's reference model (:class:`lash.original.OriginalModel`, hand-written
  attention) with ``F.cross_entropy`` on every exit's materialised logits;
* ``lash``: :class:`lash.DeepSupervisionTransformer` and ``Trainer.compute_loss`` (fused
  kernels on a GPU, the torch paths on the CPU);
* ``lash-compile``: the same under ``torch.compile`` (GPU only: on the CPU the compile alone
  would dominate the suite's time), with its dynamo graph and graph-break counts;
* ``lash-default``: the Trainer's own step with no flags (on CUDA replayed from a CUDA graph,
  :mod:`lash.step_graphs`; on the CPU eager).

DESIGN.md's bar: ``lash`` ≥ 3× faster and ≤ 1/4 of the eager peak memory on a GPU; on the CPU,
no slower than eager. The ``lash`` cases time and measure eager in the same test and record
``speedup_vs_eager`` and ``memory_vs_eager``.
"""

from __future__ import annotations

import pytest

from conftest import record_speedups, run_benchmark
from measure import ON_GPU, compile_counts, peak_memory_bytes
from model_bench import BATCH, DIM, LAYERS, SEQ_LEN, train_step_call

VOCABS = [16384, 65536] if ON_GPU else [4096]
PROVIDERS = ["eager", "lash", "lash-compile", "lash-default"] if ON_GPU else ["eager", "lash", "lash-default"]
PRECISIONS = ["fp32", "bf16"] if ON_GPU else ["fp32"]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("vocab", VOCABS, ids=lambda v: f"V{v}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, provider, vocab, precision):
    step = train_step_call(provider, vocab, precision)
    # The first call's peak: a CUDA graph (the default path on CUDA) allocates at capture what its
    # replays reuse; every provider's first call also makes its AdamW state.
    peak = peak_memory_bytes(step)
    run_benchmark(benchmark, step, provider=provider, precision=precision, vocab=vocab, dim=DIM, layers=LAYERS,
                  batch=BATCH, seq_len=SEQ_LEN, peak_memory_bytes=peak)
    benchmark.extra_info["tokens_per_s"] = BATCH * SEQ_LEN / benchmark.stats.stats.median
    if provider == "lash-compile":
        benchmark.extra_info.update(compile_counts())
    if provider == "lash":
        eager = train_step_call("eager", vocab, precision)
        eager_peak = peak_memory_bytes(eager)
        if peak is not None and eager_peak:
            benchmark.extra_info["memory_vs_eager"] = peak / eager_peak
        record_speedups(benchmark, step, {"eager": lambda: eager})
