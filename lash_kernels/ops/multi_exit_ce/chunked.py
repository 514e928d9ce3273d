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

On a GPU, :func:`run_chunked` runs the driver with cuBLAS matmuls in the input dtype and
``_row_kernel``, which turns a chunk of logits in place into CE, lse, confidence, argmax and G:
3 matmuls, one fused pass (two reads, one write) over each ``[C, V]`` chunk, ``dW`` accumulated
in fp32 in cuBLAS's epilogue (deterministic). Chunks are ``D / 2`` rows (:func:`gpu_chunk_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lash_kernels.aot_types import config_variant, pointer
from lash_kernels.dispatch import HAS_TRITON, interpreting

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

    Without ``token_weights`` every ``t_n`` is 1, so ``g = w_k / |valid|``. Built on the device
    from Python floats and device tensors (no host-to-device copy, so no sync); the divisor is
    clamped (to 1 for the count, to fp32's smallest normal for weights) so that a batch with
    nothing to learn gives loss 0 rather than NaN.
    """
    valid = targets != ignore_index  # (N,)
    if token_weights is None:
        per_token = 1.0 / valid.sum().clamp(min=1).float()  # () on the device
    else:
        t = torch.where(valid, token_weights.float(), 0.0)  # (N,) weights of labelled tokens
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
    loss = torch.dot(token_loss, g)  # Σ_k Σ_n g_kn · CE_kn = Σ_k w_k · (weighted) mean CE_k
    stats_shape = (K, N) if with_stats else (0,)
    return (
        loss,
        token_loss.view(K, N),
        conf.view(stats_shape),
        pred.view(stats_shape),
        grad_h.view((K, N, D) if need_grad_hiddens else (0,)),
        grad_w,
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


if HAS_TRITON:  # optional off Linux: the torch path still works there
    import triton
    import triton.language as tl
    from lash_kernels._launch import launch

    @triton.jit
    def _row_kernel(
        z_ptr,  # [C, V] logits of one chunk (input dtype or fp32), overwritten with G (HAS_GRAD)
        y_ptr,  # [C] int64 targets, 0 at ignored rows
        valid_ptr,  # [C] bool: False at ignored rows
        g_ptr,  # [C] fp32 ∂loss/∂CE per row (HAS_GRAD)
        loss_ptr,  # [C] fp32 out: CE, 0 at ignored rows
        conf_ptr,  # [C] fp32 out: max softmax probability (WITH_STATS)
        pred_ptr,  # [C] int64 out: argmax (WITH_STATS)
        V,  # vocabulary size (row stride of z)
        HAS_GRAD: tl.constexpr,  # overwrite the logits with G = g · (softmax − onehot)
        WITH_STATS: tl.constexpr,  # write confidence and argmax
        BLOCK_V: tl.constexpr,  # vocab entries per loop step
    ):
        """One row: online max / Σexp / argmax / target logit in fp32, then (HAS_GRAD) G in place.

        Two reads and one write of the row: the least a softmax gradient needs without keeping
        the row on chip.
        """
        row = tl.program_id(0).to(tl.int64)
        z_ptr += row * V
        y = tl.load(y_ptr + row)
        offs = tl.arange(0, BLOCK_V)
        run_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)  # per lane, reduced at the end
        run_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            z = tl.load(z_ptr + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, z)
            # Lanes still at -inf have no value yet: keep their sum at 0 instead of exp(nan).
            scale = tl.where(new_max == float("-inf"), 0.0, tl.exp(run_max - new_max))
            run_sum = run_sum * scale + tl.where(new_max == float("-inf"), 0.0, tl.exp(z - new_max))
            run_max = new_max
        row_max = tl.max(run_max, axis=0)
        total = tl.sum(run_sum * tl.exp(run_max - row_max), axis=0)  # Σ exp(z − max) ≥ 1
        lse = row_max + tl.log(total)
        target_logit = tl.load(z_ptr + y).to(tl.float32)
        valid = tl.load(valid_ptr + row)
        tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))
        if WITH_STATS:
            tl.store(conf_ptr + row, 1.0 / total)
            best = tl.full((), V, dtype=tl.int32)  # lowest index holding the row maximum
            for v0 in range(0, V, BLOCK_V):
                z = tl.load(z_ptr + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
                best = tl.minimum(best, tl.min(tl.where(z == row_max, v0 + offs, V), axis=0))
            tl.store(pred_ptr + row, best.to(tl.int64))
        if HAS_GRAD:
            g = tl.load(g_ptr + row)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                z = tl.load(z_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                grad = g * (tl.exp(z - lse) - (cols == y).to(tl.float32))
                tl.store(z_ptr + cols, grad.to(z_ptr.dtype.element_ty), mask=cols < V)

    def _row_config(V: int) -> dict:
        """Vocab entries per step and warps of the row kernel: 8 fp32 lanes per thread."""
        if interpreting():
            return dict(BLOCK_V=64, num_warps=1, num_stages=1)
        block_v = min(4096, triton.next_power_of_2(int(V)))  # a number even for a SymInt V (compile)
        return dict(BLOCK_V=block_v, num_warps=max(1, min(16, block_v // 256)), num_stages=1)

    def _triton_row_pass(logits, targets, valid, g, with_stats):
        """The chunked driver's row pass as one launch of ``_row_kernel`` over the chunk's rows."""
        C, V = logits.shape
        loss = torch.empty(C, dtype=torch.float32, device=logits.device)
        conf = torch.empty(C if with_stats else 0, dtype=torch.float32, device=logits.device)
        pred = torch.empty(C if with_stats else 0, dtype=torch.int64, device=logits.device)
        launch(_row_kernel)[(C,)](
            logits, targets, valid, g if g is not None else loss, loss, conf, pred, V,
            HAS_GRAD=g is not None, WITH_STATS=with_stats, **_row_config(V),
        )  # fmt: skip
        return loss, conf if with_stats else None, pred if with_stats else None

    def run_chunked(hiddens, weight, targets, token_weights, exit_weights, ignore_index, with_stats, need_h, need_w):
        """The chunked regime: cuBLAS matmuls in the input dtype (fp32 off CUDA) and ``_row_kernel``.

        Returns ``(loss, per_exit, token_loss, confidence, predictions, grad_h, grad_w)``."""
        dtype = hiddens.dtype if hiddens.is_cuda else torch.float32  # CPU: the interpreter's tests
        chunk = gpu_chunk_rows(weight.shape[1])
        chunk = chunk if not interpreting() else 32  # several chunks on the tests' small shapes
        g = token_scales(targets, exit_weights, ignore_index, token_weights)  # (K, N)
        loss, token_loss, *rest = chunked_multi_exit_ce(
            hiddens, weight, targets, g, ignore_index, with_stats, need_h, need_w, _triton_row_pass, chunk, dtype
        )
        return loss, per_exit_means(token_loss, targets, ignore_index), token_loss, *rest

    def row_variants(shape, dtype: torch.dtype) -> list:
        """The row kernel's launch at ``shape`` for :mod:`lash_kernels.aot_check`: one chunk of rows."""
        V, rows = shape.vocab, shape.exits * shape.tokens
        act, f32, i64 = pointer(dtype), pointer(torch.float32), pointer(torch.int64)
        chunk = min(rows, gpu_chunk_rows(shape.hidden))
        signature = dict(z_ptr=act, y_ptr=i64, valid_ptr="*i1", g_ptr=f32, loss_ptr=f32, conf_ptr=f32, pred_ptr=i64)
        flags = dict(HAS_GRAD=True, WITH_STATS=True)
        return [
            config_variant(
                "multi_exit_ce.row", _row_kernel, signature | dict(V="i32"), _row_config(V), flags, chunk, dict(V=V)
            )
        ]
