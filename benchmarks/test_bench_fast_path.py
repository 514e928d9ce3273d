"""The final-layer fast path against supervising every layer, at the seed configuration.

``Trainer.compute_loss`` forward + backward with ``layer_weights={L: 1}`` (one head application
on the last hidden state: the fast path) and with every layer weighted ``1/L`` (the head on all
``L`` exits through the multi-exit loss). The fast path times the all-layers loss in the same
test and records ``speedup_vs_all_layers``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import record_speedups, run_benchmark
from lash import DeepSupervisionTransformer, Trainer, TrainingConfig
from measure import DEVICE, ON_GPU, peak_memory_bytes
from model_bench import BATCH, DIM, HEADS, LAYERS, SEQ_LEN
VOCAB = 16384 if ON_GPU else 4096
WEIGHTS = {
    "all_layers": {layer: 1.0 / LAYERS for layer in range(1, LAYERS + 1)},
    "fast_path": {LAYERS: 1.0},
}


def _step(path: str):
    """``compute_loss`` forward + backward with ``path``'s layer weights."""
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(VOCAB, DIM, LAYERS, HEADS, max_seq_len=SEQ_LEN).to(DEVICE)
    trainer = Trainer(TrainingConfig(layer_weights=WEIGHTS[path]), VOCAB, DEVICE, progress=False)
    seq = torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    x, y = seq[:, :-1], seq[:, 1:]

    def step():
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, x, y)
        loss.backward()
        return loss

    return step


@pytest.mark.parametrize("path", list(WEIGHTS))
def test_compute_loss(benchmark, path):
    step = _step(path)
    peak = peak_memory_bytes(step)
    run_benchmark(benchmark, step, path=path, vocab=VOCAB, dim=DIM, layers=LAYERS, batch=BATCH, seq_len=SEQ_LEN,
                  peak_memory_bytes=peak)
    median = benchmark.stats.stats.median
    benchmark.extra_info["tokens_per_s"] = BATCH * SEQ_LEN / median
    if path == "fast_path":
        record_speedups(benchmark, step, {"all_layers": lambda: _step("all_layers")})
