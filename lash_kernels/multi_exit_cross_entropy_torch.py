"""Pure-torch pieces of the multi-exit cross-entropy: result type, input checks, the eager
reference, and the chunked autograd path that runs where Triton does not.

The maths and the backward derivation are in :mod:`lash_kernels.multi_exit_cross_entropy`. The
torch path (the CPU default) never holds more than one chunk of logits: the forward keeps only
the fp32 log-sum-exp ``[K, N]``, and the backward recomputes each chunk's logits, turns them
into ``G = g · (softmax − onehot)`` in place, and accumulates ``G · W`` into the hidden-state
gradient and ``Gᵀ · h`` into one fp32 head gradient shared by all exits. Peak extra memory is one ``[chunk, V]`` fp32 block plus an fp32 copy of the head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

CHUNK_BYTES = 4 * 2**20  # fp32 logits per chunk: a few MB keeps them cache-friendly and small


def chunk_rows(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


class MultiExitCEOutput(NamedTuple):
    """What :func:`multi_exit_cross_entropy` returns."""

    loss: torch.Tensor  # () fp32, Σ_k w_k · mean CE_k, differentiable
    per_exit: torch.Tensor  # (K,) fp32, detached mean CE of every exit
    confidence: torch.Tensor | None  # (K, N) fp32 max softmax probability, or None
    predictions: torch.Tensor | None  # (K, N) int64 argmax, or None
    token_loss: torch.Tensor | None  # (K, N) fp32 detached per-token CE (0 where ignored), or None


def validate_inputs(
    hiddens: Sequence[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    exit_weights: list[float],
    ignore_index: int,
) -> None:
    """Raise ValueError naming the offending shape or value; one host sync for the targets."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D]; got shape {tuple(weight.shape)}")
    V, D = weight.shape
    if isinstance(hiddens, torch.Tensor):
        if hiddens.dim() != 3:
            raise ValueError(f"stacked hiddens must be [K, N, D]; got shape {tuple(hiddens.shape)}")
        K, exit_shape = hiddens.shape[0], tuple(hiddens.shape[1:])
    else:
        shapes = [tuple(h.shape) for h in hiddens]
        if not shapes or any(len(s) != 2 or s != shapes[0] for s in shapes):
            raise ValueError(f"hiddens must be K ≥ 1 tensors of one shape [N, D]; got shapes {shapes}")
        K, exit_shape = len(shapes), shapes[0]
    N = exit_shape[0]
    if exit_shape[1] != D:
        raise ValueError(f"hidden size of hiddens {exit_shape} does not match head weight {tuple(weight.shape)}")
    if tuple(targets.shape) != (N,):
        raise ValueError(f"targets must have shape ({N},) to match hiddens {exit_shape}; got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor; got {targets.dtype}")
    if K != len(exit_weights):
        raise ValueError(f"{K} exits in hiddens but {len(exit_weights)} exit_weights")
    for k, w in enumerate(exit_weights):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"exit_weights[{k}] = {w}; must be finite and >= 0")
    if N == 0 or torch.compiler.is_compiling():
        return
    lo, hi = torch.stack(torch.aminmax(torch.where(targets == ignore_index, 0, targets))).tolist()
    bad = lo if lo < 0 else hi if hi >= V else None
    if bad is not None:
        raise ValueError(f"target value {bad} is outside [0, {V}) and is not ignore_index={ignore_index}")


def multi_exit_cross_entropy_reference(
    hiddens: Sequence[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    exit_weights: Sequence[float],
    ignore_index: int = -100,
    return_stats: bool = False,
    validate: bool = True,
) -> MultiExitCEOutput:
    """Eager reference: materialises each exit's ``[N, V]`` logits and calls ``F.cross_entropy``.

    Same arguments and result as :func:`multi_exit_cross_entropy`. Computes in fp32, or in
    float64 when the inputs are float64 (which is how the tests get an exact yardstick).
    """
    weights = [float(w) for w in exit_weights]
    if validate:
        validate_inputs(hiddens, weight, targets, weights, ignore_index)
    dtype = torch.promote_types(torch.promote_types(hiddens[0].dtype, weight.dtype), torch.float32)
    count = (targets != ignore_index).sum().clamp(min=1)
    per_exit, confidence, predictions, token_loss = [], [], [], []
    for h in hiddens:
        logits = h.to(dtype) @ weight.to(dtype).T  # (N, V)
        ce = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")  # (N,)
        per_exit.append(ce.sum() / count)
        if return_stats:
            confidence.append(torch.exp(logits.amax(-1) - logits.logsumexp(-1)))  # (N,)
            predictions.append(logits.argmax(-1))  # (N,)
            token_loss.append(ce.detach())
    per_exit = torch.stack(per_exit)  # (K,)
    loss = (per_exit * torch.tensor(weights, dtype=dtype, device=per_exit.device)).sum()
    stats = (torch.stack(confidence), torch.stack(predictions), torch.stack(token_loss)) if return_stats else (None,) * 3
    return MultiExitCEOutput(loss, per_exit.detach(), *stats)


class TorchMultiExitCE(torch.autograd.Function):
    """Per-token CE of K exits through one head, chunked over tokens, recomputing in backward.

    Same contract as the Triton op ``lash::multi_exit_ce_forward``: returns
    ``(loss, lse, confidence, predictions)``, the first two ``[K, N]`` fp32, the statistics
    ``[K, N]`` (fp32, int64) with ``with_stats`` else empty. Only ``loss`` is differentiable.
    """

    @staticmethod
    def forward(
        ctx,
        hiddens: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        with_stats: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        K, N, _ = hiddens.shape
        chunk = chunk_rows(weight.shape[0])
        valid = targets != ignore_index  # (N,)
        safe_targets = torch.where(valid, targets, 0)  # (N,) gatherable everywhere
        loss = hiddens.new_empty((K, N), dtype=torch.float32)
        lse = torch.empty_like(loss)
        stats_shape = (K, N) if with_stats else (0,)
        conf = hiddens.new_empty(stats_shape, dtype=torch.float32)
        pred = hiddens.new_empty(stats_shape, dtype=torch.int64)
        # Statistics and reductions in fp32, whatever autocast would pick for the matmul.
        with torch.autocast(hiddens.device.type, enabled=False):
            head = weight.float()  # (V, D)
            for k in range(K):
                for start in range(0, N, chunk):
                    rows = slice(start, start + chunk)
                    logits = hiddens[k, rows].float() @ head.T  # (C, V)
                    chunk_lse = logits.logsumexp(dim=-1)  # (C,)
                    target_logit = logits.gather(1, safe_targets[rows, None]).squeeze(1)  # (C,)
                    loss[k, rows] = torch.where(valid[rows], chunk_lse - target_logit, 0.0)
                    lse[k, rows] = chunk_lse
                    if with_stats:
                        best = logits.argmax(dim=-1)  # (C,) lowest index on ties
                        conf[k, rows] = torch.exp(logits.gather(1, best[:, None]).squeeze(1) - chunk_lse)
                        pred[k, rows] = best
        ctx.save_for_backward(hiddens, weight, targets, lse)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(lse, conf, pred)
        return loss, lse, conf, pred

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_conf, _grad_pred):
        hiddens, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        K, N, D = hiddens.shape
        chunk = chunk_rows(weight.shape[0])
        valid = targets != ctx.ignore_index
        safe_targets = torch.where(valid, targets, 0)[:, None]  # (N, 1)
        g = torch.where(valid, grad_loss.float(), 0.0)  # (K, N) ∂loss/∂CE, 0 where ignored
        minus_one = torch.full((min(chunk, N), 1), -1.0, device=hiddens.device)  # the onehot's scatter
        grad_h = torch.zeros_like(hiddens) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.autocast(hiddens.device.type, enabled=False):
            head = weight.float()  # (V, D)
            for k in range(K):
                for start in range(0, N, chunk):
                    rows = slice(start, start + chunk)
                    h = hiddens[k, rows].float()  # (C, D)
                    grad_logits = (h @ head.T).sub_(lse[k, rows, None]).exp_()  # (C, V) softmax, in place
                    grad_logits.scatter_add_(1, safe_targets[rows], minus_one[: grad_logits.shape[0]])
                    grad_logits.mul_(g[k, rows, None])
                    if need_h:
                        grad_h[k, rows] = grad_logits @ head
                    if need_w:
                        grad_w.addmm_(grad_logits.T, h)
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None
