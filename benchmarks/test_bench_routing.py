"""Early exit measured in wall-clock time: routed inference and the three decoding modes.

``test_forward``: :meth:`forward` (every layer for every token) against
:func:`lash.routing.early_exit_forward` at thresholds that make about 30/50/70/90% of the tokens exit (the
quantiles of the exit-layer confidence on the benchmark's own input: an untrained model's
confidences are near-uniform, so a fixed threshold would not control the mix). Each early-exit
case times the full forward in the same test and records ``speedup_vs_forward``, the ideal
``ideal`` = 1 / flop_ratio (the FLOPs really executed: the exit statistics and the exited tokens'
deep keys and values are work too), ``ideal_compute_cost`` = 1 / compute_cost (the nominal
accounting) and ``speedup_vs_ideal`` against the first; the bar is ``speedup_vs_ideal`` >= 0.75
at dim 2048.

``test_decode``: tokens/s of plain, early-exit and self-speculative greedy decoding (the latter two
with ``speedup_vs_plain``, plain timed in the same test), with the
shallow ratio and the draft acceptance rate (both low on an untrained model: they measure the
machinery's cost, not a trained model's gain).

Configs: the default size's on every device; on the CPU the issue's acceptance case (8 layers, dim 256,
exit at 2, 75% shallow); on a GPU an LLM-sized bf16 model. On the CPU the threads are pinned
(``torch.set_num_threads(1)``) for the file. ``python benchmarks/test_bench_routing.py`` measures the
CPU acceptance case alone, forward and early exit interleaved, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import time

import pytest
import torch

from conftest import record_speedups, run_benchmark
from measure import ON_GPU, device_name
from model_bench import LLM_ROUTING, SEED_ROUTING, RoutingConfig, build, threshold_for

from lash.generation import generate
from lash.routing import early_exit_forward

ACCEPTANCE = RoutingConfig("cpu-acceptance", 2048, 256, 8, 4, 256, 8, 2)
SHALLOW = [0.3, 0.5, 0.7, 0.9]
CASES = (
    [(SEED_ROUTING, r) for r in [None, *SHALLOW]] + [(LLM_ROUTING, r) for r in [None, *SHALLOW]]
    if ON_GPU
    else [(SEED_ROUTING, r) for r in [None, *SHALLOW]] + [(ACCEPTANCE, r) for r in [None, 0.75]]
)
# One thread: on a shared 2-core machine, two OpenMP threads competing with other processes
# spin and time the contention (5× slower, measured), not the code.
CPU_THREADS = 1


@pytest.fixture(scope="module", autouse=True)
def _pinned_threads():
    before = torch.get_num_threads()
    if not ON_GPU:
        torch.set_num_threads(min(CPU_THREADS, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


def _label(case) -> str:
    config, shallow = case
    return f"{config.name}-" + ("forward" if shallow is None else f"early_exit{int(shallow * 100)}")


@pytest.mark.parametrize("case", CASES, ids=_label)
def test_forward(benchmark, case):
    config, shallow = case
    model, x = build(config)
    info = {"config": config.name, "dim": config.dim, "layers": config.layers, "exit_layer": config.exit_layer,
            "batch": config.batch, "seq_len": config.seq_len, "vocab": config.vocab, "dtype": str(config.dtype),
            "threads": torch.get_num_threads()}
    with torch.no_grad():
        if shallow is None:
            run_benchmark(benchmark, lambda: model(x), mode="forward", **info)
            return
        threshold = threshold_for(model, x, shallow)
        _, stats = early_exit_forward(model, x, threshold)
        early = functools.partial(early_exit_forward, model, x, threshold)
        run_benchmark(benchmark, early, mode="early_exit", threshold=threshold, **stats, **info)
        record_speedups(benchmark, early, {"forward": lambda: functools.partial(model, x)})
    benchmark.extra_info["ideal"] = 1 / stats["flop_ratio"]
    benchmark.extra_info["ideal_compute_cost"] = 1 / stats["compute_cost"]
    benchmark.extra_info["tokens_per_s"] = x.numel() / benchmark.stats.stats.median
    benchmark.extra_info["speedup_vs_ideal"] = benchmark.extra_info["speedup_vs_forward"] * stats["flop_ratio"]


DECODE = (
    [(RoutingConfig("llm-decode", 32000, 2048, 24, 16, 512, 1, 6, torch.bfloat16), 128, 256)]
    if ON_GPU
    else [(RoutingConfig("seed-decode", 4096, 64, 4, 4, 48, 1, 1), 16, 32)]
)


@pytest.mark.parametrize("case", DECODE, ids=lambda c: c[0].name)
@pytest.mark.parametrize("mode", ["plain", "early_exit", "speculative"])
def test_decode(benchmark, mode, case):
    config, prompt_len, new_tokens = case
    model, x = build(config)
    prompt = x[:, :prompt_len]
    kwargs = {}
    if mode == "early_exit":
        kwargs = {"routing_threshold": threshold_for(model, x, 0.5)}
    elif mode == "speculative":
        kwargs = {"speculative": True, "draft_tokens": 4}
    _, stats = generate(model, prompt, new_tokens, return_stats=True, **kwargs)
    run_benchmark(benchmark, lambda: generate(model, prompt, new_tokens, **kwargs), mode=mode, config=config.name,
                  prompt_len=prompt_len, new_tokens=new_tokens, batch=config.batch, exit_layer=config.exit_layer, **stats)
    benchmark.extra_info["tokens_per_s"] = config.batch * new_tokens / benchmark.stats.stats.median
    if mode != "plain":
        record_speedups(benchmark, functools.partial(generate, model, prompt, new_tokens, **kwargs),
                        {"plain": lambda: functools.partial(generate, model, prompt, new_tokens)})


def measure_acceptance(repeats: int, threads: int) -> str:
    """The issue's CPU acceptance case, forward and early exit timed alternately; a Markdown table."""
    torch.set_num_threads(threads)
    model, x = build(ACCEPTANCE)
    threshold = threshold_for(model, x, 0.75)
    full, early = [], []
    with torch.no_grad():
        _, stats = early_exit_forward(model, x, threshold)
        for _ in range(2):  # warm-up
            model(x), early_exit_forward(model, x, threshold)
        for _ in range(repeats):  # interleaved, so load from other processes hits both alike
            start = time.perf_counter()
            model(x)
            full.append(time.perf_counter() - start)
            start = time.perf_counter()
            early_exit_forward(model, x, threshold)
            early.append(time.perf_counter() - start)
    t_full, t_early = statistics.median(full), statistics.median(early)
    speedup, ideal = t_full / t_early, 1 / stats["flop_ratio"]
    c = ACCEPTANCE
    return "\n".join([
        f"Device {device_name()}, {threads} threads, torch {torch.__version__}, {datetime.date.today().isoformat()}; "
        f"dim {c.dim}, {c.layers} layers, {c.heads} heads, vocab {c.vocab}, batch {c.batch}, seq {c.seq_len}, fp32, "
        f"exit at {c.exit_layer}, threshold {threshold:.6f} (25% quantile); median of {repeats} interleaved runs.",
        "",
        "| forward (ms) | early_exit_forward (ms) | shallow | compute_cost | flop_ratio | speedup | 1/compute_cost "
        "| ideal 1/flop_ratio | speedup / ideal |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {t_full * 1e3:.1f} | {t_early * 1e3:.1f} | {stats['shallow_ratio']:.1%} | {stats['compute_cost']:.4f} | "
        f"{stats['flop_ratio']:.4f} | {speedup:.2f}× | {1 / stats['compute_cost']:.2f}× | {ideal:.2f}× | {speedup / ideal:.2f} |",
    ])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=measure_acceptance.__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=CPU_THREADS)
    args = parser.parse_args()
    print(measure_acceptance(args.repeats, args.threads))
