"""Whole-model benchmarks: the seed training step and early-exit inference.

* :func:`train_step_call`: one optimizer step at the seed configuration (DESIGN.md: dim 64,
  4 layers, 4 heads, seq 32, batch 64, all exits supervised) for ``eager`` (the seed's reference
  model, :class:`lash.original.OriginalModel`, with ``F.cross_entropy`` on every exit's logits),
  ``lash`` (:class:`lash.DeepSupervisionTransformer` and ``Trainer.compute_loss``) or
  ``lash-compile`` (the same loss under ``torch.compile``), ``lash-default`` (the Trainer's own
  step with no flags: on CUDA forward and backward replayed from a CUDA graph, the fused AdamW
  eager) or ``lash-graphed`` (forward, backward and a capturable fused AdamW captured together as
  one CUDA graph: what capturing the optimizer too would add), in fp32 or bf16 autocast.
* :class:`RoutingConfig`, :func:`build`, :func:`threshold_for`: early-exit inference set-ups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernel_bench import Unavailable
from measure import DEVICE, ON_GPU, compiled
from lash import DeepSupervisionTransformer, Trainer, TrainingConfig
from lash.captured import cuda_graph
from lash.original import OriginalModel
from lash_kernels import values_checked

DIM, LAYERS, HEADS, SEQ_LEN, BATCH = 64, 4, 4, 32, 64  # the seed configuration
WEIGHTS = {layer: 1.0 / LAYERS for layer in range(1, LAYERS + 1)}  # every exit supervised
TRAIN_PROVIDERS = ("eager", "lash", "lash-compile", "lash-default", "lash-graphed")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def train_step_call(provider: str, vocab: int, precision: str = "fp32", batch: int = BATCH) -> Callable[[], torch.Tensor]:
    """One training step (zero grads, loss of every exit, backward, AdamW) of ``provider``."""
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, vocab, (batch, SEQ_LEN + 1), generator=g).to(DEVICE)  # (B, T+1)
    x, y = seq[:, :-1], seq[:, 1:]  # (B, T) each
    torch.manual_seed(0)
    if provider == "eager":
        model = OriginalModel(vocab, DIM, LAYERS, HEADS, max_len=SEQ_LEN).to(DEVICE)
        dtype = PRECISIONS[precision]
        autocast = (lambda: torch.autocast(DEVICE.type, dtype=dtype)) if dtype else contextlib.nullcontext

        def loss_fn():
            with autocast():
                return sum(
                    w * F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
                    for w, logits in zip(WEIGHTS.values(), model.all_logits(x))
                )
    elif provider in ("lash", "lash-compile"):
        model = DeepSupervisionTransformer(vocab, DIM, LAYERS, HEADS, max_seq_len=SEQ_LEN).to(DEVICE)
        trainer = Trainer(TrainingConfig(layer_weights=WEIGHTS), vocab, DEVICE, progress=False, precision=precision)

        def loss_fn():
            with values_checked():  # as Trainer.train_epoch runs a step: the batch's ids were checked on the CPU
                return trainer.compute_loss(model, x, y)

        if provider == "lash-compile":
            loss_fn = compiled(loss_fn)
    elif provider == "lash-graphed":
        return _graphed_step(vocab, precision, x, y)
    elif provider == "lash-default":
        return _default_step(vocab, precision, x, y)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss

    return step


def _default_step(vocab: int, precision: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """What ``Trainer.train_epoch`` runs for a batch, with no flags: ``Trainer.step`` (on CUDA the
    step's CUDA graph replayed, :mod:`lash.step_graphs`; on the CPU eager) and
    ``Trainer.optimizer_step`` (the fused AdamW on CUDA), gradient clipping off as in the other providers."""
    model = DeepSupervisionTransformer(vocab, DIM, LAYERS, HEADS, max_seq_len=SEQ_LEN).to(DEVICE)
    trainer = Trainer(TrainingConfig(layer_weights=WEIGHTS), vocab, DEVICE, progress=False, precision=precision, model=model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        loss = trainer.step(trainer.runner, (x, y), checked=True)  # the ids were checked once, as train_epoch does
        trainer.optimizer_step(params, trainer.optimizer, grad_clip=None)
        return loss

    return step


def _graphed_step(vocab: int, precision: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """LASH's eager training step captured whole as one CUDA graph (PyTorch's whole-network capture,
    through :func:`lash.captured.cuda_graph`: gradients set to None in the step, so that the
    backward allocates them in the graph's pool, and a capturable fused AdamW); each call replays it
    over the same batch."""
    if not ON_GPU:
        raise Unavailable("CUDA graphs need a CUDA device")
    model = DeepSupervisionTransformer(vocab, DIM, LAYERS, HEADS, max_seq_len=SEQ_LEN).to(DEVICE)
    trainer = Trainer(TrainingConfig(layer_weights=WEIGHTS), vocab, DEVICE, progress=False, precision=precision,
                      compile=False)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)

    def body() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with values_checked():  # the batch was checked once; inside a graph nothing may read it back
            loss = trainer.compute_loss(model, x, y)
        loss.backward()
        optimizer.step()
        return loss

    return cuda_graph(body, None)


@dataclass(frozen=True)
class RoutingConfig:
    """A model and input for early-exit inference."""

    name: str
    vocab: int
    dim: int
    layers: int
    heads: int
    seq_len: int
    batch: int
    exit_layer: int
    dtype: torch.dtype = torch.float32


SEED_ROUTING = RoutingConfig("seed", 16384 if ON_GPU else 4096, DIM, LAYERS, HEADS, SEQ_LEN, BATCH, 1)
LLM_ROUTING = RoutingConfig("llm", 32000, 2048, 24, 16, 1024, 4, 6, torch.bfloat16)


def build(config: RoutingConfig, seed: int = 0) -> tuple[DeepSupervisionTransformer, torch.Tensor]:
    """A random model of ``config`` and a random ``(batch, seq_len)`` input, both on DEVICE."""
    torch.manual_seed(seed)
    with torch.device(DEVICE):  # initialised where it runs: the LLM-sized model takes 10-30 s on a CPU
        model = DeepSupervisionTransformer(
            config.vocab, config.dim, config.layers, config.heads, max_seq_len=config.seq_len, exit_layer=config.exit_layer
        )
    model = model.to(config.dtype).eval()
    x = torch.randint(0, config.vocab, (config.batch, config.seq_len), device=DEVICE)
    return model, x


@torch.no_grad()
def threshold_for(model: DeepSupervisionTransformer, x: torch.Tensor, shallow: float) -> float:
    """The exit-confidence quantile at which about ``shallow`` of ``x``'s tokens exit."""
    confidence = model.compute_confidence(model.hidden_states(x, [model.exit_layer])[0]).flatten()  # (B*T,)
    return float(confidence.float().quantile(1 - shallow))
