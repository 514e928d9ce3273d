"""A whole training step at the seed configuration: LASH against the eager reference.

One step = forward through every layer, the loss of every supervised exit through the shared
head, backward, and an AdamW update. Providers:

* ``eager``: the seed's reference model (:class:`lash.reference.RefModel`, hand-written
  attention) with ``F.cross_entropy`` on every exit's materialised logits;
* ``lash``: :class:`lash.DeepSupervisionTransformer` and ``Trainer.compute_loss`` (fused
  kernels on a GPU, the torch paths on the CPU);
* ``lash-compile``: the same under ``torch.compile`` (GPU only: on the CPU the compile alone
  would dominate the suite's time).

DESIGN.md's bar: ``lash`` ≥ 3× faster and ≤ 1/4 of the eager peak memory on a GPU; on the CPU,
no slower than eager. ``lash`` runs after ``eager`` and records ``vs_eager`` time and memory ratios.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, ON_GPU, peak_memory_bytes, run_benchmark
from lash import DeepSupervisionTransformer, Trainer, TrainingConfig
from lash.reference import RefModel

DIM, LAYERS, HEADS, SEQ_LEN, BATCH = 64, 4, 4, 32, 64  # the seed configuration
VOCABS = [16384, 65536] if ON_GPU else [4096]
PROVIDERS = ["eager", "lash", "lash-compile"] if ON_GPU else ["eager", "lash"]
WEIGHTS = {layer: 1.0 / LAYERS for layer in range(1, LAYERS + 1)}  # every exit supervised
_MEASURED: dict[int, dict[str, tuple[float, int | None]]] = {}


def _step(provider: str, vocab: int):
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, vocab, (BATCH, SEQ_LEN + 1), generator=g).to(DEVICE)
    x, y = seq[:, :-1], seq[:, 1:]
    if provider == "eager":
        model = RefModel(vocab, DIM, LAYERS, HEADS, max_len=SEQ_LEN).to(DEVICE)

        def loss_fn():
            return sum(
                w * F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
                for w, logits in zip(WEIGHTS.values(), model.all_logits(x))
            )
    else:
        model = DeepSupervisionTransformer(vocab, DIM, LAYERS, HEADS, max_seq_len=SEQ_LEN).to(DEVICE)
        trainer = Trainer(TrainingConfig(layer_weights=WEIGHTS), vocab, DEVICE, progress=False)

        def loss_fn():
            return trainer.compute_loss(model, x, y)

        if provider == "lash-compile":
            loss_fn = torch.compile(loss_fn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss

    return step


@pytest.mark.parametrize("vocab", VOCABS, ids=lambda v: f"V{v}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, provider, vocab):
    step = _step(provider, vocab)
    step()  # AdamW state allocated before the peak is read
    peak = peak_memory_bytes(step)
    run_benchmark(benchmark, step, provider=provider, vocab=vocab, dim=DIM, layers=LAYERS, batch=BATCH, seq_len=SEQ_LEN, peak_memory_bytes=peak)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["tokens_per_s"] = BATCH * SEQ_LEN / mean
    measured = _MEASURED.setdefault(vocab, {})
    if provider != "eager" and "eager" in measured:
        eager_mean, eager_peak = measured["eager"]
        benchmark.extra_info["speedup_vs_eager"] = eager_mean / mean
        if peak is not None and eager_peak:
            benchmark.extra_info["memory_vs_eager"] = peak / eager_peak
    measured[provider] = (mean, peak)
