"""The chunked regime: token chunks through the head matmuls and one row pass per chunk.

Wide heads (``D > 256``), fp32 heads wider than 64, and GPUs where Triton has no tensor cores
(sm < 80) take this path; so does the CPU, with the torch row pass of :mod:`.torch_path`. The
driver stacks the K exits on the token axis (``K·N`` rows) and walks them in chunks of ``C``
rows. Per chunk, three matmuls and a few in-place passes over one ``[C, V]`` block:

    Z  = h_c · Wᵀ                                   (matmul 1, into the reused block)
    m  = max_v Z,  Z ← exp(Z − m),  s = Σ_v Z        (in place; lse = m + log s, conf = 1 / s)
    Z ← Z · (g / s) − g · onehot(y)                  (in place: Z is now G = g · (softmax − onehot))
    dH_c = G · W                                     (matmul 2, each row written once)
    dW  += Gᵀ · h_c                                  (matmul 3, the one fp32 accumulator)

``g = w_k · t_n / Σ_valid t`` (``w_k / |valid|`` without token weights; 0 at ignored tokens) is
known before the forward, so the gradient is formed there, assuming the op's output is the
scalar loss, and the backward only multiplies ``dH`` and ``dW`` by the incoming scalar gradient
(as Liger-Kernel's fused linear cross-entropy does). When no gradient is needed the last three
lines are skipped. Extra memory: one ``[C, V]`` block,
``dH`` ``[K·N, D]`` and ``dW`` ``[V, D]``; never ``[N, V]`` logits for a whole exit.

On a GPU, :func:`~lash_kernels.ops.multi_exit_ce.row_kernel.run_chunked` runs the driver with
cuBLAS matmuls in the input dtype and a Triton row kernel, which turns a chunk of logits in place
into CE, lse, confidence, argmax and G: 3 matmuls, one fused pass (two reads, one write) over
each ``[C, V]`` chunk, ``dW`` accumulated in fp32 in cuBLAS's epilogue (deterministic). Chunks
are ``D / 2`` rows (:func:`gpu_chunk_rows`). This module is pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lash_kernels.ops.multi_exit_ce.reference import labelled_token_weights

# fp32 logits per CPU chunk: 1048 rows at V = 32000. sgemm on 2 cores runs ~30% faster per row
# at 1024 rows than at 256 (measured), and the chunk stays ~1/10 of eager's logits memory.
CPU_CHUNK_BYTES = 128 * 2**20
MIN_GPU_CHUNK_ROWS = 1024  # GPU chunks: D / 2 rows, at least this many (gpu_chunk_rows)
MIN_CHUNK_ROWS = 64  # below this the matmuls lose their blocking; huge vocabularies still get 64


def token_scales(
    targets: torch.Tensor,
    exit_weights: Sequence[float],
    ignore_index: int,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``g[k, n] = w_k · t_n / Σ_valid t`` at labelled tokens, 0 at ignored ones: ``∂loss/∂CE_kn``, fp32 (K, N).

    Without ``token_weights`` every ``t_n`` is 1, so ``g = w_k / |valid|``; with them, ``t`` is
    the labelled tokens' weights over their maximum (:func:`labelled_token_weights`), so that
    their fp32 sum neither overflows nor underflows. Built on the device from Python floats and
    device tensors (no host-to-device copy, so no sync); the divisor is clamped (to 1 for the
    count, to fp32's smallest normal for weights) so that a batch with nothing to learn gives
    loss 0 rather than NaN.
    """
    valid = targets != ignore_index  # (N,)
    if token_weights is None:
        per_token = 1.0 / valid.sum().clamp(min=1).float()  # () on the device
    else:
        t = labelled_token_weights(token_weights, valid).float()  # (N,) max 1, 0 at ignored tokens
        per_token = t / t.sum().clamp(min=torch.finfo(torch.float32).tiny)  # (N,)
    return torch.stack([torch.where(valid, w, 0.0) for w in exit_weights]) * per_token  # (K, N)


def per_exit_means(token_loss: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``(K,)`` unweighted mean CE of each exit over the labelled tokens (0 when there are none)."""
    return token_loss.sum(dim=1) / (targets != ignore_index).sum().clamp(min=1)


def chunk_rows(vocab_size: int, chunk_bytes: int | None = None, itemsize: int = 4) -> int:
    """Rows per chunk so that one chunk's logits take about ``chunk_bytes`` (default ``CPU_CHUNK_BYTES``)."""
    return max(MIN_CHUNK_ROWS, (chunk_bytes or CPU_CHUNK_BYTES) // (itemsize * vocab_size))


def gpu_chunk_rows(hidden: int) -> int:
    """Rows per GPU chunk: ``D / 2``, at least ``MIN_GPU_CHUNK_ROWS``. Each chunk's three GEMMs then
    have ≥ 1024 rows (cuBLAS near its peak), and the ``[C, V]`` logits block is half the head's
    size, so the call's memory grows with the model, not with the batch: at D 4096, V 65536 in
    bf16 the block is 256 MiB beside a 512 MiB head."""
    return max(MIN_GPU_CHUNK_ROWS, (hidden // 2 + 255) // 256 * 256)


# A row pass turns a chunk of logits, in place, into G (when g is given) and returns the per-row
# (CE, confidence, argmax), the last two None without statistics.
RowPass = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool],
    tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
]


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
        compute_dtype: dtype of the matmuls and of the ``[C, V]`` block (fp32 in the torch path).

    Returns:
        ``(loss, token_loss, confidence, predictions, grad_h, grad_w, h_scale)``: loss () fp32
        ``Σ g·CE``; token_loss (K, N) fp32; statistics (K, N) fp32 / int64 or empty; grad_h
        (K, N, D) in ``compute_dtype`` and grad_w (V, D) fp32, each empty when not needed;
        h_scale, in fp16 with ``grad_h``, the () fp32 factor it still needs, else empty.
    """
    K, N, D = hiddens.shape
    V = weight.shape[0]
    rows = K * N
    h = hiddens.reshape(rows, D)  # exits stacked on the token axis
    valid = (targets != ignore_index).repeat(K)  # (K·N,)
    safe_targets = torch.where(valid, targets.repeat(K), 0)  # (K·N,) gatherable everywhere
    g = g.reshape(rows)
    need_grad = need_grad_hiddens or need_grad_weight
    # fp16 holds nothing below 6e-8, and G = g·(softmax − onehot), with g ≈ w_k / |valid| ≈ 1e-4 at
    # 8K tokens, would round most of its entries to 0: in fp16 the row pass forms G / max(g), at
    # most 1. dW, in fp32, is brought back to scale after the last chunk; dH stays at that scale
    # (scaled to size it would be subnormal in fp16) and max(g) goes to the backward with it.
    g_max = g.amax().clamp(min=torch.finfo(torch.float32).tiny) if need_grad and compute_dtype == torch.float16 else None
    g_rows = g / g_max if g_max is not None else g
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
            logits, safe_targets[start:end], valid[start:end], g_rows[start:end] if need_grad else None, with_stats
        )
        token_loss[start:end] = ce
        if with_stats:
            conf[start:end] = c_conf
            pred[start:end] = c_pred
        if need_grad_hiddens:
            torch.mm(logits, head, out=grad_h[start:end])  # logits now hold G
        if need_grad_weight:
            add_transposed_product(grad_w, logits, h_c)
    if g_max is not None:
        grad_w.mul_(g_max)
    loss = torch.dot(token_loss, g)  # Σ_k Σ_n g_kn · CE_kn = Σ_k w_k · (weighted) mean CE_k
    stats_shape = (K, N) if with_stats else (0,)
    return (
        loss,
        token_loss.view(K, N),
        conf.view(stats_shape),
        pred.view(stats_shape),
        grad_h.view((K, N, D) if need_grad_hiddens else (0,)),
        grad_w,
        g_max if g_max is not None and need_grad_hiddens else torch.empty(0, device=h.device),
    )


@torch.library.custom_op("lash::add_transposed_product", mutates_args=("acc",))
def add_transposed_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += aᵀ · b`` into the fp32 ``acc``, the add in the GEMM's epilogue.

    16-bit operands go through ``addmm`` with ``out_dtype=float32`` into ``acc`` itself (CUDA):
    cuBLAS multiplies in 16-bit, accumulates in fp32 and adds to ``acc`` as it writes, with no
    ``[V, D]`` fp32 temporary and no second pass over it. A custom op, so that
    ``torch.compile(fullgraph=True)`` calls it as it is: dynamo cannot trace ``addmm`` with
    ``out_dtype`` (pytorch/pytorch#163880).
    """
    if a.dtype == torch.float32 or not acc.is_cuda:
        acc.addmm_(a.T.to(acc.dtype), b.to(acc.dtype))
    else:
        torch.addmm(acc, a.T, b, out_dtype=torch.float32, out=acc)


@add_transposed_product.register_fake
def _(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    return None
