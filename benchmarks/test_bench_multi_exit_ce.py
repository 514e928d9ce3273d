"""Multi-exit shared-head cross-entropy, forward + backward, against what else one could run.

Providers, per config (K exits × N tokens through a [V, D] head):

* ``matmuls``: the bare head matmuls the loss needs — ``h·Wᵀ``, ``g·W``, ``gᵀ·h`` over all exits,
  cuBLAS in the same dtype — the practical limit;
* ``eager``: :func:`multi_exit_cross_entropy_reference` (K heads + ``F.cross_entropy``);
* ``compile``: ``torch.compile`` of that eager loss;
* ``liger`` / ``cce``: Liger-Kernel's fused linear cross-entropy and Cut Cross-Entropy, called
  once per exit (skipped when not installed);
* ``lash``: :func:`multi_exit_cross_entropy` (Triton on GPU, the torch path on the CPU).

``lash`` runs last in each config and records its time ratio to every provider measured before it
(``vs_matmuls`` is the DESIGN.md bar: ≤ 1.25). On the CPU only a tiny config runs, so the file
finishes in well under a minute.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, ON_GPU, has_module, peak_memory_bytes, run_benchmark
from lash_kernels import multi_exit_cross_entropy, multi_exit_cross_entropy_reference

if ON_GPU:
    DTYPE = torch.bfloat16
    SHAPES = [(2048, 64, v, k) for v in (16384, 65536) for k in (1, 2, 3, 4)]  # seed: N, D, V, K
    SHAPES += [(8192, d, v, k) for d in (2048, 4096) for v in (32768, 131072) for k in (1, 2, 3, 4)]  # LLM
    PROVIDERS = ["matmuls", "eager", "compile", "liger", "cce", "lash"]
else:
    DTYPE = torch.float32  # CPU bf16 matmuls are emulated and would only measure that
    SHAPES = [(512, 64, 4096, k) for k in (1, 3)]
    PROVIDERS = ["matmuls", "eager", "lash"]

NEEDS = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}
_MEAN_SECONDS: dict[tuple, dict[str, float]] = {}  # shape → provider → mean time, for the ratios


def _cases():
    for shape in SHAPES:
        for provider in PROVIDERS:
            marks = []
            if provider in NEEDS and not has_module(NEEDS[provider]):
                marks.append(pytest.mark.skip(reason=f"{NEEDS[provider]} is not installed"))
            n, d, v, k = shape
            yield pytest.param(shape, provider, marks=marks, id=f"N{n}-D{d}-V{v}-K{k}-{provider}")


def _step(provider: str, hiddens: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, exit_weights):
    """One forward + backward of ``provider``; returns the gradients so nothing is optimised away."""
    K, N, D = hiddens.shape
    if provider == "matmuls":
        flat = hiddens.detach().view(K * N, D)  # (K·N, D)
        grad_logits = torch.randn(K * N, weight.shape[0], device=DEVICE, dtype=DTYPE)  # (K·N, V)
        return lambda: (flat @ weight.detach().T, grad_logits @ weight.detach(), grad_logits.T @ flat)
    if provider in ("eager", "compile", "lash"):
        loss_fn = {
            "eager": multi_exit_cross_entropy_reference,
            "compile": torch.compile(multi_exit_cross_entropy_reference),
            "lash": multi_exit_cross_entropy,
        }[provider]
        return lambda: torch.autograd.grad(
            loss_fn(hiddens, weight, targets, exit_weights, validate=False).loss, [hiddens, weight]
        )
    if provider == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as exit_loss
    else:
        from cut_cross_entropy import linear_cross_entropy as exit_loss

    def per_exit_calls():
        loss = sum(w * exit_loss(hiddens[k], weight, targets) for k, w in enumerate(exit_weights))
        return torch.autograd.grad(loss, [hiddens, weight])

    return per_exit_calls


@pytest.mark.parametrize("shape, provider", list(_cases()))
def test_multi_exit_ce_fwd_bwd(benchmark, shape, provider):
    N, D, V, K = shape
    hiddens = torch.randn(K, N, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(V, D, device=DEVICE) / D**0.5).to(DTYPE).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    exit_weights = [1.0] * K
    try:
        step = _step(provider, hiddens, weight, targets, exit_weights)
        peak = peak_memory_bytes(step)
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} runs out of memory at N={N} D={D} V={V} K={K}")
    run_benchmark(
        benchmark, step, provider=provider, K=K, N=N, D=D, V=V, dtype=str(DTYPE).removeprefix("torch."),
        peak_memory_bytes=peak,
    )  # fmt: skip
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["tokens_per_s"] = N / mean  # tokens through all K exits per second
    measured = _MEAN_SECONDS.setdefault(shape, {})
    if provider == "lash":
        benchmark.extra_info.update({f"vs_{other}": mean / seconds for other, seconds in measured.items()})
    measured[provider] = mean
