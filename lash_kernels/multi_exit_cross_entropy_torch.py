"""Pure-torch pieces of the multi-exit cross-entropy: result type, input checks, the eager
reference, and the chunked gradients-in-forward path.

The maths and the backward derivation are in :mod:`lash_kernels.multi_exit_cross_entropy`. The
chunked path stacks the K exits on the token axis (``K·N`` rows) and walks them in chunks of
``C`` rows. Per chunk, three matmuls and a few in-place passes over one ``[C, V]`` block:

    Z  = h_c · Wᵀ                                   (matmul 1, into the reused block)
    m  = max_v Z,  Z ← exp(Z − m),  s = Σ_v Z        (in place; lse = m + log s, conf = 1 / s)
    Z ← Z · (g / s) − g · onehot(y)                  (in place: Z is now G = g · (softmax − onehot))
    dH_c = G · W                                     (matmul 2, each row written once)
    dW  += Gᵀ · h_c                                  (matmul 3, the one fp32 accumulator)

``g = w_k / |valid|`` (0 at ignored tokens) is known before the forward, so the gradient is formed
there, assuming the op's output is the scalar loss, and the backward only multiplies ``dH`` and
``dW`` by the incoming scalar gradient (as Liger-Kernel's fused linear cross-entropy does). When
no gradient is needed the last three lines are skipped. Extra memory: one ``[C, V]`` block,
``dH`` ``[K·N, D]`` and ``dW`` ``[V, D]``; never ``[N, V]`` logits for a whole exit.

This module's :class:`TorchMultiExitCE` runs it with torch's row pass (the CPU default); the
Triton module runs the same driver with cuBLAS matmuls and a fused Triton row kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

# fp32 logits per CPU chunk: 1048 rows at V = 32000. sgemm on 2 cores runs ~30% faster per row
# at 1024 rows than at 256 (measured), and the chunk stays ~1/10 of eager's logits memory.
CPU_CHUNK_BYTES = 128 * 2**20
MIN_CHUNK_ROWS = 64  # below this the matmuls lose their blocking; huge vocabularies still get 64


def chunk_rows(vocab_size: int, chunk_bytes: int | None = None, itemsize: int = 4) -> int:
    """Rows per chunk so that one chunk's logits take about ``chunk_bytes`` (default ``CPU_CHUNK_BYTES``)."""
    return max(MIN_CHUNK_ROWS, (chunk_bytes or CPU_CHUNK_BYTES) // (itemsize * vocab_size))


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
    """Raise ValueError naming the offending shape or value; never a host sync.

    Shapes and weights are checked on the host. Target values are checked on the host only for
    CPU tensors outside ``torch.compile`` (free there); on a GPU, or while compiling, the check
    is ``torch._assert_async``, which raises a RuntimeError with the same message when the device
    gets to it (at the next sync), so a training step never waits for it.
    """
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
    if N == 0:
        return
    labelled = torch.where(targets == ignore_index, 0, targets)  # (N,)
    allowed = f"[0, {V}) or ignore_index={ignore_index}"
    if targets.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(((labelled >= 0) & (labelled < V)).all(), f"a target value is outside {allowed}")
        return
    lo, hi = torch.aminmax(labelled)
    bad = int(lo) if lo < 0 else int(hi) if hi >= V else None
    if bad is not None:
        raise ValueError(f"target value {bad} is outside {allowed}")


def token_scales(targets: torch.Tensor, exit_weights: Sequence[float], ignore_index: int) -> torch.Tensor:
    """``g[k, n] = w_k / |valid|`` at labelled tokens, 0 at ignored ones: ``∂loss/∂CE_kn``, fp32 (K, N).

    Built on the device from Python floats (no host-to-device copy, so no sync); the
    ``max(|valid|, 1)`` makes an all-ignored batch give loss 0 rather than NaN.
    """
    valid = targets != ignore_index  # (N,)
    inv_count = 1.0 / valid.sum().clamp(min=1).float()  # () on the device
    return torch.stack([torch.where(valid, w, 0.0) for w in exit_weights]) * inv_count  # (K, N)


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
    loss = sum(w * ce for w, ce in zip(weights, per_exit))  # Python weights: no host-to-device copy
    stats = (torch.stack(confidence), torch.stack(predictions), torch.stack(token_loss)) if return_stats else (None,) * 3
    return MultiExitCEOutput(loss, per_exit.detach(), *stats)


# A row pass turns a chunk of logits, in place, into G (when g is given) and returns the per-row
# (CE, confidence, argmax), the last two None without statistics.
RowPass = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool],
    tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
]


def torch_row_pass(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    g: torch.Tensor | None,
    with_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """CE, confidence and argmax of each row of fp32 ``logits`` (C, V); with ``g``, logits ← G.

    Args:
        logits: (C, V) fp32, overwritten (softmax numerators, then G).
        targets: (C,) int64, already 0 at ignored rows (gatherable).
        valid: (C,) bool, False at ignored rows.
        g: (C,) fp32 ``∂loss/∂CE`` per row, or None when no gradient is needed.
        with_stats: also return confidence and argmax.
    """
    row_max = logits.amax(dim=1)  # (C,)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)  # (C,)
    pred = logits.argmax(dim=1) if with_stats else None  # (C,) lowest index on ties, as torch.argmax
    total = logits.sub_(row_max[:, None]).exp_().sum(dim=1)  # (C,) Σ exp(z − max) ∈ [1, V]
    ce = torch.where(valid, row_max + total.log() - target_logit, 0.0)  # (C,) lse − z_y
    conf = total.reciprocal() if with_stats else None  # exp(max − lse) = 1 / Σ exp(z − max)
    if g is not None:
        logits.mul_((g / total)[:, None]).scatter_add_(1, targets[:, None], -g[:, None])  # G, in place
    return ce, conf, pred


def chunked_multi_exit_ce(
    hiddens: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    g: torch.Tensor,
    ignore_index: int,
    with_stats: bool,
    need_grad_hiddens: bool,
    need_grad_weight: bool,
    row_pass: RowPass,
    chunk: int,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked forward of the module docstring; gradients formed when asked for.

    Args:
        hiddens: (K, N, D) contiguous exits.
        weight: (V, D) contiguous head.
        targets: (N,) int64 targets or ``ignore_index``.
        g: (K, N) fp32 ``∂loss/∂CE`` (see :func:`token_scales`).
        ignore_index: target value of unlabelled tokens.
        with_stats: also return confidence and argmax.
        need_grad_hiddens, need_grad_weight: form ``dH`` / ``dW`` (else they come back empty).
        row_pass: turns a logits chunk into CE/statistics and, in place, into G.
        chunk: rows (exit-tokens) per chunk.
        compute_dtype: dtype of the matmuls and of the ``[C, V]`` block (fp32 on the CPU).

    Returns:
        ``(loss, token_loss, confidence, predictions, grad_h, grad_w)``: loss () fp32
        ``Σ g·CE``; token_loss (K, N) fp32; statistics (K, N) fp32 / int64 or empty; grad_h
        (K, N, D) in ``compute_dtype`` and grad_w (V, D) fp32, each empty when not needed.
    """
    K, N, D = hiddens.shape
    V = weight.shape[0]
    rows = K * N
    h = hiddens.reshape(rows, D)  # exits stacked on the token axis
    valid = (targets != ignore_index).repeat(K)  # (K·N,)
    safe_targets = torch.where(valid, targets.repeat(K), 0)  # (K·N,) gatherable everywhere
    g = g.reshape(rows)
    need_grad = need_grad_hiddens or need_grad_weight
    token_loss = torch.empty(rows, dtype=torch.float32, device=h.device)
    conf = torch.empty(rows if with_stats else 0, dtype=torch.float32, device=h.device)
    pred = torch.empty(rows if with_stats else 0, dtype=torch.int64, device=h.device)
    grad_h = torch.empty((rows, D) if need_grad_hiddens else (0,), dtype=compute_dtype, device=h.device)
    grad_w = torch.zeros((V, D) if need_grad_weight else (0,), dtype=torch.float32, device=h.device)
    head = weight.to(compute_dtype)  # (V, D)
    block = torch.empty((min(chunk, rows), V), dtype=compute_dtype, device=h.device)  # reused
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        h_c = h[start:end].to(compute_dtype)  # (C, D), a view when the dtype already matches
        logits = torch.mm(h_c, head.T, out=block[: end - start])  # (C, V)
        ce, c_conf, c_pred = row_pass(
            logits, safe_targets[start:end], valid[start:end], g[start:end] if need_grad else None, with_stats
        )
        token_loss[start:end] = ce
        if with_stats:
            conf[start:end] = c_conf
            pred[start:end] = c_pred
        if need_grad_hiddens:
            torch.mm(logits, head, out=grad_h[start:end])  # logits now hold G
        if need_grad_weight:
            add_transposed_product(grad_w, logits, h_c)
    loss = torch.dot(token_loss, g)  # Σ_k Σ_n g_kn · CE_kn = Σ_k w_k · mean CE_k
    stats_shape = (K, N) if with_stats else (0,)
    return (
        loss,
        token_loss.view(K, N),
        conf.view(stats_shape),
        pred.view(stats_shape),
        grad_h.view((K, N, D) if need_grad_hiddens else (0,)),
        grad_w,
    )


def add_transposed_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += aᵀ · b`` into the fp32 ``acc``; 16-bit operands accumulate in fp32 inside cuBLAS.

    For 16-bit operands the product comes out in fp32 (``mm``'s ``out_dtype``, torch ≥ 2.8) and
    is added in a second pass: ``addmm`` with ``out_dtype`` would fold the add into the GEMM, but
    ``torch.compile`` cannot trace it (pytorch/pytorch#163880) and the op's body is traced.
    """
    if a.dtype == torch.float32:
        acc.addmm_(a.T, b)
    else:
        acc.add_(torch.mm(a.T, b, out_dtype=torch.float32))


class TorchMultiExitCE(torch.autograd.Function):
    """The chunked path with torch's row pass, in fp32: the CPU implementation of the op.

    Returns ``(loss, token_loss, confidence, predictions)`` as the Triton ops do; only ``loss``
    is differentiable, and its backward scales the gradients the forward formed.
    """

    @staticmethod
    def forward(
        ctx,
        hiddens: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        g: torch.Tensor,
        ignore_index: int,
        with_stats: bool,
        need_h: bool,
        need_w: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # Statistics and reductions in fp32, whatever autocast would pick for the matmuls.
        with torch.autocast(hiddens.device.type, enabled=False):
            loss, token_loss, conf, pred, grad_h, grad_w = chunked_multi_exit_ce(
                hiddens, weight, targets, g, ignore_index, with_stats, need_h, need_w,
                torch_row_pass, chunk_rows(weight.shape[0]), torch.float32,
            )  # fmt: skip
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hiddens.dtype, weight.dtype
        ctx.mark_non_differentiable(token_loss, conf, pred)
        return loss, token_loss, conf, pred

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_loss, _grad_conf, _grad_pred):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h_dtype, w_dtype = ctx.dtypes
        return (
            (grad_h * grad_loss).to(h_dtype) if need_h else None,
            (grad_w * grad_loss).to(w_dtype) if need_w else None,
        ) + (None,) * 6
