"""Multi-exit cross-entropy through one shared output head, without materialising logits.

K exits (hidden states of K layers) share the output head ``W`` of shape ``[V, D]``. For exit k and
token n, with logits ``z = h_kn · Wᵀ`` and target ``y_n``:

    lse_kn   = log Σ_v exp(z_v)                     (online log-sum-exp over vocab tiles)
    CE_kn    = lse_kn − z_{y_n}
    loss     = Σ_k w_k · (Σ_n∈valid CE_kn) / max(|valid|, 1)
    conf_kn  = max_v softmax(z)_v = exp(max_v z_v − lse_kn),  pred_kn = argmax_v z_v

Backward. With ``g_kn = ∂loss/∂CE_kn`` (``w_k / |valid|`` for valid tokens, 0 for ignored ones),
``∂CE_kn/∂z_v = softmax(z)_v − [v = y_n]``, so the gradient of the logits is

    G_kn,v = g_kn · (exp(z_v − lse_kn) − [v = y_n])
    ∂loss/∂h_kn = Σ_v G_kn,v · W_v          (G · W, a reduction over the vocabulary)
    ∂loss/∂W_v  = Σ_k Σ_n G_kn,v · h_kn     (Gᵀ · h, a reduction over exits and tokens)

``g`` is known before the forward (weights and token count, kept on the device), so every path
forms the gradients in the forward when they are needed and the backward only multiplies them by
the incoming scalar gradient: the op's differentiable output is the scalar loss. The K exits are
stacked on the token axis (``K·N`` rows), so each head matmul covers all exits at once.

Two regimes behind the one op (:func:`multi_exit_cross_entropy` picks):

* **Fused** (``D ≤ FUSED_MAX_HIDDEN`` = 256, the seed's models, on GPUs where ``tl.dot`` has
  tensor cores; fp32 operands only up to D = 64, see :func:`fused_takes`): ``_fused_forward_kernel`` on a (token tiles × vocab splits) grid writes partial
  max / Σexp / argmax / target logit, merged in torch into lse, CE and statistics; then
  ``_fused_grad_kernel`` on a (vocab tiles × token splits) grid recomputes each logits tile once,
  forms G, and from that one tile accumulates ``Gᵀ·h`` into its registers (the fp32 ``dW`` tile,
  one per token split, summed in a fixed order: deterministic) and adds ``G·W`` into the fp32
  ``dH`` with atomics (summation order varies run to run in the last bits). Head matmuls: 4
  (one recompute), no logits in memory. Splits are sized for ≥ 4 programs per SM.
* **Chunked** (wider heads, wider fp32 heads than 64, or sm < 80 where Triton has no tensor
  cores): the chunked driver of
  :mod:`lash_kernels.multi_exit_cross_entropy_torch` with cuBLAS matmuls in the input dtype and
  ``_row_kernel``, which turns a chunk of logits in place into CE, lse, confidence, argmax and G:
  3 matmuls, one fused pass (two reads, one write) over each ``[C, V]`` chunk, ``dW`` accumulated in
  fp32 by cuBLAS (deterministic). Chunks hold about ``GPU_CHUNK_BYTES`` of logits.

Exits with weight 0 run forward only (for ``per_exit`` and the statistics): the public function
sends them through the op without gradients, so no gradient work is done for them.

Numerics: statistics and reductions in fp32. bf16/fp16 operands feed ``tl.dot``/cuBLAS as they
are (the chunked path's logits are in the input dtype, as in Liger-Kernel); fp32 operands use
``tf32x3`` dots in the fused kernels (three TF32 products, near-fp32 accuracy on tensor cores)
and cuBLAS fp32 (under the user's ``allow_tf32`` setting) in the chunked path. Envelope:
``K·N·D``, ``V·D`` < 2³¹ elements; any V.

Registered as ``torch.ops.lash.multi_exit_ce`` with ``torch.library.triton_op`` so
``torch.compile`` sees the kernels. The result type, input checks, eager reference and the chunked
driver live in :mod:`lash_kernels.multi_exit_cross_entropy_torch`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from lash_kernels.backend import (
    HAS_TRITON,
    arch_has_tensor_core_dots,
    backend,
    interpreting,
    sm_count,
    tensor_core_dots,
)
from lash_kernels.multi_exit_cross_entropy_torch import (
    MultiExitCEOutput,
    TorchMultiExitCE,
    chunk_rows,
    chunked_multi_exit_ce,
    multi_exit_cross_entropy_reference,
    token_scales,
    validate_inputs,
)

__all__ = ["MultiExitCEOutput", "multi_exit_cross_entropy", "multi_exit_cross_entropy_reference"]

FUSED_MAX_HIDDEN = 256  # widest head the fused kernels take (their dW/dH tiles live in registers)
GPU_CHUNK_BYTES = 256 * 2**20  # logits per chunk in the chunked path: ≥ 4096 rows at V = 32000 bf16
PROGRAMS_PER_SM = 4  # fused grids aim for this many programs per streaming multiprocessor

if HAS_TRITON:  # optional off Linux: the torch path still works there
    import triton
    import triton.language as tl
    from torch.library import register_autograd, triton_op, wrap_triton

    @triton.jit
    def _dot(
        a,  # [M, K] operand in the input dtype
        b,  # [K, P] operand in the input dtype
        acc,  # [M, P] fp32 accumulator
        DOT_PRECISION: tl.constexpr,  # "tf32x3" for fp32 operands (see module docstring)
        UPCAST_DOT: tl.constexpr,  # interpreter only: it multiplies bf16 bit patterns as integers
    ):
        """``acc + a · b`` on tensor cores in the operands' dtype, accumulated in fp32."""
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _fused_forward_kernel(
        h_ptr,  # [K·N, D] hidden states of all exits, stacked on the token axis, contiguous
        w_ptr,  # [V, D] shared head, contiguous
        y_ptr,  # [N] int64 targets (row r of h has target y[r mod N])
        max_ptr,  # [S, K·N] fp32 out: max logit of the split
        sum_ptr,  # [S, K·N] fp32 out: Σ exp(z − max) over the split
        tgt_ptr,  # [S, K·N] fp32 out: the target's logit if the split holds it, else 0
        arg_ptr,  # [S, K·N] int32 out: argmax within the split (lowest index on ties)
        rows_total,  # K·N
        N,  # tokens per exit
        V,  # vocabulary size
        D,  # hidden size
        split_cols,  # vocab entries per split, a multiple of BLOCK_V
        BLOCK_N: tl.constexpr,  # rows per program
        BLOCK_V: tl.constexpr,  # vocab entries per loop step
        BLOCK_D: tl.constexpr,  # next power of two ≥ D: whole rows in registers
        DOT_PRECISION: tl.constexpr,  # dot precision for fp32 operands
        UPCAST_DOT: tl.constexpr,  # feed tl.dot fp32 (interpreter with bf16 inputs)
    ):
        """Online log-sum-exp, argmax and target logit of one (row tile, vocab split).

        Splitting the vocabulary gives the grid ≥ 4 programs per SM at the seed's N; the splits
        merge exactly in torch (``lse = M + log Σ_s sum_s · exp(max_s − M)`` with ``M = max_s max_s``).
        """
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        row_mask = rows < rows_total
        y = tl.load(y_ptr + rows % N, mask=row_mask, other=-1)
        dims = tl.arange(0, BLOCK_D)
        rows64 = rows.to(tl.int64)  # K·N·D may pass 2³¹
        run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)  # Σ exp(z − run_max)
        target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
        best = tl.zeros((BLOCK_N,), dtype=tl.int32)
        # The whole [BLOCK_N, D] tile of hidden states stays in registers for the split.
        h = tl.load(h_ptr + rows64[:, None] * D + dims[None, :], mask=row_mask[:, None] & (dims[None, :] < D), other=0.0)
        v_start = split * split_cols
        for v0 in range(v_start, tl.minimum(v_start + split_cols, V), BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            w = tl.load(w_ptr + cols[:, None].to(tl.int64) * D + dims[None, :], mask=(cols[:, None] < V) & (dims[None, :] < D), other=0.0)
            zero = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
            logits = _dot(h, tl.trans(w), zero, DOT_PRECISION, UPCAST_DOT)  # [BLOCK_N, BLOCK_V]
            # -inf keeps padded columns out of the max, the sum of exponentials and the argmax.
            logits = tl.where(cols[None, :] < V, logits, float("-inf"))
            tile_max = tl.max(logits, axis=1)
            # Strict ">" keeps the earlier tile on ties; tl.argmax breaks ties to the left inside
            # a tile: together the lowest index, as torch.argmax.
            best = tl.where(tile_max > run_max, v0 + tl.argmax(logits, axis=1), best)
            new_max = tl.maximum(run_max, tile_max)  # finite from the first tile on
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            run_max = new_max
            target_logit += tl.sum(tl.where(cols[None, :] == y[:, None], logits, 0.0), axis=1)
        out = split * rows_total + rows
        tl.store(max_ptr + out, run_max, mask=row_mask)
        tl.store(sum_ptr + out, run_sum, mask=row_mask)
        tl.store(tgt_ptr + out, target_logit, mask=row_mask)
        tl.store(arg_ptr + out, best, mask=row_mask)

    @triton.jit
    def _fused_grad_kernel(
        h_ptr,  # [K·N, D] hidden states of the exits, stacked, contiguous
        w_ptr,  # [V, D] shared head, contiguous
        y_ptr,  # [N] int64 targets
        lse_ptr,  # [K·N] fp32 log-sum-exp from the forward
        g_ptr,  # [K·N] fp32 ∂loss/∂CE per row, 0 at ignored tokens
        gh_ptr,  # [K·N, D] fp32 in/out, zeroed: ∂loss/∂h, accumulated with atomics (NEED_H)
        gw_ptr,  # [T, V, D] fp32 out: this token split's part of ∂loss/∂W (NEED_W)
        rows_total,  # K·N
        N,  # tokens per exit
        V,  # vocabulary size
        D,  # hidden size
        split_rows,  # rows per token split, a multiple of BLOCK_N
        NEED_H: tl.constexpr,  # form ∂loss/∂h
        NEED_W: tl.constexpr,  # form ∂loss/∂W
        BLOCK_N: tl.constexpr,  # rows per loop step
        BLOCK_V: tl.constexpr,  # vocab entries per program
        BLOCK_D: tl.constexpr,  # next power of two ≥ D: whole rows in registers
        DOT_PRECISION: tl.constexpr,  # dot precision for fp32 operands
        UPCAST_DOT: tl.constexpr,  # feed tl.dot fp32 (interpreter with bf16 inputs)
    ):
        """One recompute of each logits tile, then both products from it.

        The program owns vocab rows ``cols`` for one token split: the head tile stays in
        registers, the ``[BLOCK_V, D]`` head gradient accumulates there over the split's rows
        (each written once, so ``dW`` is deterministic), and each ``G · W_cols`` partial of the
        hidden-state gradient is added to ``dH`` with atomics (V / BLOCK_V adds per element).
        """
        cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
        split = tl.program_id(1)
        dims = tl.arange(0, BLOCK_D)
        col_mask = cols < V
        d_mask = dims < D
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * D + dims[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        acc_w = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
        r_start = split * split_rows
        for r0 in range(r_start, tl.minimum(r_start + split_rows, rows_total), BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            row_mask = rows < rows_total
            rows64 = rows.to(tl.int64)
            y = tl.load(y_ptr + rows % N, mask=row_mask, other=-1)
            lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
            g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)  # 0 on padded rows: G = 0 there
            h_mask = row_mask[:, None] & d_mask[None, :]
            h = tl.load(h_ptr + rows64[:, None] * D + dims[None, :], mask=h_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            logits = _dot(h, tl.trans(w), tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32), DOT_PRECISION, UPCAST_DOT)
            probs = tl.where(col_mask[None, :], tl.exp(logits - lse[:, None]), 0.0)  # ≤ 1: lse ≥ every logit
            grad = ((probs - (cols[None, :] == y[:, None]).to(tl.float32)) * g[:, None]).to(w.dtype)  # G
            if NEED_W:
                acc_w = _dot(tl.trans(grad), h, acc_w, DOT_PRECISION, UPCAST_DOT)
            if NEED_H:
                part = _dot(grad, w, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), DOT_PRECISION, UPCAST_DOT)
                tl.atomic_add(gh_ptr + rows64[:, None] * D + dims[None, :], part, mask=h_mask, sem="relaxed")
        if NEED_W:
            out = split.to(tl.int64) * V * D + cols[:, None].to(tl.int64) * D + dims[None, :]
            tl.store(gw_ptr + out, acc_w, mask=col_mask[:, None] & d_mask[None, :])

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

    # (BLOCK_N, BLOCK_V, num_warps, num_stages) of the fused kernels by (operand kind, padded D):
    # the largest tiles whose compile for sm_80/89/90 (triton 3.9, 2026-11-25) shows no register
    # spills and fits the L4's 99 KiB of shared memory. The grad kernel holds dW [BLOCK_V, D] and
    # dH [BLOCK_N, D] fp32 tiles plus the head tile in registers, hence its smaller tiles.
    _FORWARD_TILES = {
        ("16-bit", 64): (64, 128, 8, 3), ("16-bit", 128): (64, 64, 8, 3), ("16-bit", 256): (32, 64, 8, 3),
        ("fp32", 64): (32, 64, 8, 2),
    }  # fmt: skip
    _GRAD_TILES = {
        ("16-bit", 64): (32, 64, 8, 2), ("16-bit", 128): (32, 64, 8, 2), ("16-bit", 256): (16, 32, 8, 2),
        ("fp32", 64): (16, 64, 8, 2),
    }  # fmt: skip

    def _fused_configs(D: int, dtype: torch.dtype) -> tuple[dict, dict]:
        """Launch configs of ``_fused_forward_kernel`` and ``_fused_grad_kernel``; the launcher and
        :func:`static_variants` both read them. Fixed tiles rather than autotuning (no first-call
        stall); one small tile under the interpreter."""
        block_d = max(16, triton.next_power_of_2(D))
        if interpreting():
            config = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=block_d, num_warps=1, num_stages=1)
            return config, config
        key = ("fp32" if dtype == torch.float32 else "16-bit", max(64, block_d))
        return tuple(
            dict(BLOCK_N=n, BLOCK_V=v, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
            for n, v, warps, stages in (_FORWARD_TILES[key], _GRAD_TILES[key])
        )

    def fused_takes(D: int, dtype: torch.dtype) -> bool:
        """Whether the fused kernels have tiles for ``D`` in ``dtype`` (else the chunked regime runs).

        fp32 operands take three TF32 products per dot and twice the shared memory, so past
        D = 64 their tiles spill or overflow the L4's shared memory: cuBLAS does better there.
        """
        return interpreting() or (
            "fp32" if dtype == torch.float32 else "16-bit", max(64, triton.next_power_of_2(D))
        ) in _GRAD_TILES


    def _row_config(V: int) -> dict:
        """Vocab entries per step and warps of the row kernel: 8 fp32 lanes per thread."""
        if interpreting():
            return dict(BLOCK_V=64, num_warps=1, num_stages=1)
        block_v = min(4096, triton.next_power_of_2(V))
        return dict(BLOCK_V=block_v, num_warps=max(1, min(16, block_v // 256)), num_stages=1)

    def _dot_args(dtype: torch.dtype) -> dict:
        """tf32x3 for fp32 operands (module docstring); fp32 operands for the interpreter's bf16."""
        return dict(
            DOT_PRECISION="tf32x3" if dtype == torch.float32 else "tf32",  # ignored for 16-bit operands
            UPCAST_DOT=interpreting() and dtype == torch.bfloat16,
        )

    def _splits(tiles: int, other_tiles: int, programs: int) -> int:
        """How many ways to split ``tiles`` so that ``splits × other_tiles`` reaches ``programs``."""
        return max(1, min(tiles, triton.cdiv(programs, max(other_tiles, 1))))

    def _fused_launch_shape(rows: int, V: int, forward: dict, grad: dict, sms: int) -> tuple[int, int, int, int]:
        """(vocab splits S, columns per split) of the forward grid and (token splits T, rows per
        split) of the grad grid, each aiming at ``PROGRAMS_PER_SM`` programs per SM."""
        programs = PROGRAMS_PER_SM * sms
        row_tiles, vocab_tiles = triton.cdiv(rows, forward["BLOCK_N"]), triton.cdiv(V, forward["BLOCK_V"])
        per_split_v = triton.cdiv(vocab_tiles, _splits(vocab_tiles, row_tiles, programs))
        row_tiles, vocab_tiles = triton.cdiv(rows, grad["BLOCK_N"]), triton.cdiv(V, grad["BLOCK_V"])
        per_split_n = triton.cdiv(row_tiles, _splits(row_tiles, vocab_tiles, programs))
        return (
            triton.cdiv(triton.cdiv(V, forward["BLOCK_V"]), per_split_v), per_split_v * forward["BLOCK_V"],
            triton.cdiv(row_tiles, per_split_n), per_split_n * grad["BLOCK_N"],
        )  # fmt: skip

    def _fused(hiddens, weight, targets, g, ignore_index, with_stats, need_h, need_w):
        """The fused regime (module docstring): partial-softmax kernel, merge, one grad kernel."""
        K, N, D = hiddens.shape
        V, rows = weight.shape[0], K * N
        h = hiddens.view(rows, D)
        forward, grad = _fused_configs(D, hiddens.dtype)
        splits_v, split_cols, splits_n, split_rows = _fused_launch_shape(rows, V, forward, grad, sm_count(h.device))
        part_max = torch.empty((splits_v, rows), dtype=torch.float32, device=h.device)
        part_sum, part_tgt = torch.empty_like(part_max), torch.empty_like(part_max)
        part_arg = torch.empty((splits_v, rows), dtype=torch.int32, device=h.device)
        wrap_triton(_fused_forward_kernel)[(triton.cdiv(rows, forward["BLOCK_N"]), splits_v)](
            h, weight, targets, part_max, part_sum, part_tgt, part_arg, rows, N, V, D, split_cols,
            **forward, **_dot_args(h.dtype),
        )  # fmt: skip
        row_max = part_max.amax(dim=0)  # (K·N,)
        total = (part_sum * torch.exp(part_max - row_max)).sum(dim=0)  # (K·N,) Σ exp(z − max)
        lse = row_max + total.log()
        valid = (targets != ignore_index).repeat(K)
        token_loss = torch.where(valid, lse - part_tgt.sum(dim=0), 0.0).view(K, N)
        stats_shape = (K, N) if with_stats else (0,)
        conf = total.reciprocal().view(K, N) if with_stats else h.new_empty(stats_shape, dtype=torch.float32)
        # Lowest index over the splits that reach the maximum (torch's max(dim) may pick any on ties).
        pred = (
            torch.where(part_max == row_max, part_arg, V).amin(dim=0).view(K, N).long() if with_stats
            else h.new_empty(stats_shape, dtype=torch.int64)
        )  # fmt: skip
        grad_h = torch.zeros((rows, D) if need_h else (0,), dtype=torch.float32, device=h.device)
        grad_w = torch.empty((splits_n, V, D) if need_w else (0,), dtype=torch.float32, device=h.device)
        if need_h or need_w:
            wrap_triton(_fused_grad_kernel)[(triton.cdiv(V, grad["BLOCK_V"]), splits_n)](
                h, weight, targets, lse, g, grad_h, grad_w, rows, N, V, D, split_rows,
                NEED_H=need_h, NEED_W=need_w, **grad, **_dot_args(h.dtype),
            )  # fmt: skip
        loss = torch.dot(token_loss.view(-1), g.view(-1))
        grad_h = grad_h.view(K, N, D) if need_h else grad_h
        grad_w = grad_w.sum(dim=0) if need_w else grad_w  # fixed order over token splits
        return loss, token_loss, conf, pred, grad_h, grad_w

    def _triton_row_pass(logits, targets, valid, g, with_stats):
        """The chunked driver's row pass as one launch of ``_row_kernel`` over the chunk's rows."""
        C, V = logits.shape
        loss = torch.empty(C, dtype=torch.float32, device=logits.device)
        conf = torch.empty(C if with_stats else 0, dtype=torch.float32, device=logits.device)
        pred = torch.empty(C if with_stats else 0, dtype=torch.int64, device=logits.device)
        wrap_triton(_row_kernel)[(C,)](
            logits, targets, valid, g if g is not None else loss, loss, conf, pred, V,
            HAS_GRAD=g is not None, WITH_STATS=with_stats, **_row_config(V),
        )  # fmt: skip
        return loss, conf if with_stats else None, pred if with_stats else None

    def _chunked(hiddens, weight, targets, g, ignore_index, with_stats, need_h, need_w):
        """The chunked regime: cuBLAS matmuls in the input dtype (fp32 off CUDA) and ``_row_kernel``."""
        dtype = hiddens.dtype if hiddens.is_cuda else torch.float32  # CPU: the interpreter's tests
        chunk = chunk_rows(weight.shape[0], GPU_CHUNK_BYTES, dtype.itemsize)
        chunk = chunk if not interpreting() else 32  # several chunks on the tests' small shapes
        return chunked_multi_exit_ce(
            hiddens, weight, targets, g, ignore_index, with_stats, need_h, need_w, _triton_row_pass, chunk, dtype
        )

    @triton_op("lash::multi_exit_ce", mutates_args=())
    def _triton_op(
        hiddens: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        g: torch.Tensor,
        ignore_index: int,
        with_stats: bool,
        need_grad_hiddens: bool,
        need_grad_weight: bool,
        chunked: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, token_loss, confidence, predictions, grad_h, grad_w)``; see the two regimes."""
        run = _chunked if chunked or hiddens.numel() == 0 else _fused  # no tokens: no kernel to launch
        loss, token_loss, conf, pred, grad_h, grad_w = run(
            hiddens, weight, targets, g, ignore_index, with_stats, need_grad_hiddens, need_grad_weight
        )
        # Gradients in the input dtypes, formed now; the backward only scales them.
        return loss, token_loss, conf, pred, grad_h.to(hiddens.dtype), grad_w.to(weight.dtype)

    def _setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output[4], output[5])

    def _backward(ctx, grad_loss, *_):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (
            grad_h * grad_loss.to(grad_h.dtype) if need_h else None,
            grad_w * grad_loss.to(grad_w.dtype) if need_w else None,
        ) + (None,) * 7

    register_autograd(_triton_op, _backward, setup_context=_setup_context)

    def static_variants(shape, dtype: torch.dtype, arch: int) -> list:
        """The launches :mod:`lash_kernels.aot_check` compiles on ``arch`` at ``shape``: the fused
        pair where :func:`_fused_regime` sends the shape, else the row kernel of the chunked path."""
        from lash_kernels.aot_check import ARCHS, KernelVariant, pointer

        D, V, rows = shape.hidden, shape.vocab, shape.exits * shape.tokens
        act, f32, i64 = pointer(dtype), pointer(torch.float32), pointer(torch.int64)
        dots = dict(DOT_PRECISION=_dot_args(dtype)["DOT_PRECISION"], UPCAST_DOT=False)

        def variant(name, fn, signature, config, flags, programs, ints):
            const = {k: v for k, v in config.items() if k.isupper()} | flags
            signature = signature | dict.fromkeys(const, "constexpr")
            return KernelVariant(name, fn, signature, const, config["num_warps"], config["num_stages"], programs, ints)

        if _fused_regime(D, dtype, arch_has_tensor_core_dots(arch)):
            forward, grad = _fused_configs(D, dtype)
            splits_v, split_cols, splits_n, split_rows = _fused_launch_shape(rows, V, forward, grad, ARCHS[arch].sms)
            common = dict(h_ptr=act, w_ptr=act, y_ptr=i64)
            sizes = dict(rows_total="i32", N="i32", V="i32", D="i32")
            ints = dict(rows_total=rows, N=shape.tokens, V=V, D=D)
            return [
                variant(
                    "multi_exit_ce.fused_forward", _fused_forward_kernel,
                    common | dict(max_ptr=f32, sum_ptr=f32, tgt_ptr=f32, arg_ptr=pointer(torch.int32))
                    | sizes | dict(split_cols="i32"),
                    forward, dots, triton.cdiv(rows, forward["BLOCK_N"]) * splits_v, ints | dict(split_cols=split_cols),
                ),
                variant(
                    "multi_exit_ce.fused_grad", _fused_grad_kernel,
                    common | dict(lse_ptr=f32, g_ptr=f32, gh_ptr=f32, gw_ptr=f32) | sizes | dict(split_rows="i32"),
                    grad, dots | dict(NEED_H=True, NEED_W=True), triton.cdiv(V, grad["BLOCK_V"]) * splits_n,
                    ints | dict(split_rows=split_rows),
                ),
            ]  # fmt: skip
        chunk = min(rows, chunk_rows(V, GPU_CHUNK_BYTES, dtype.itemsize))
        signature = dict(z_ptr=act, y_ptr=i64, valid_ptr="*i1", g_ptr=f32, loss_ptr=f32, conf_ptr=f32, pred_ptr=i64)
        flags = dict(HAS_GRAD=True, WITH_STATS=True)
        return [
            variant("multi_exit_ce.row", _row_kernel, signature | dict(V="i32"), _row_config(V), flags, chunk, dict(V=V))
        ]


def _stack(hiddens: Sequence[torch.Tensor] | torch.Tensor, exits: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The ``[len(exits), N, D]`` contiguous hidden states of ``exits`` in ``dtype``."""
    if isinstance(hiddens, torch.Tensor) and exits == list(range(hiddens.shape[0])):
        picked = hiddens
    else:
        picked = torch.stack([hiddens[k] for k in exits])  # integer indexing: views, no index tensor
    return picked.to(dtype).contiguous()


def _fused_regime(hidden: int, dtype: torch.dtype, tensor_cores: bool) -> bool:
    """The regime rule: fused Triton kernels for narrow heads where ``tl.dot`` has tensor cores
    and tiles exist for the dtype, the chunked cuBLAS path otherwise (module docstring)."""
    return hidden <= FUSED_MAX_HIDDEN and tensor_cores and fused_takes(hidden, dtype)


def _per_token(device: torch.device, hidden: int, dtype: torch.dtype):
    """The implementation for inputs on ``device``: the torch path, or the Triton op in one regime."""
    if backend(device) == "torch":
        return TorchMultiExitCE.apply
    return functools.partial(_call_triton_op, chunked=not _fused_regime(hidden, dtype, tensor_core_dots(device)))


def _call_triton_op(hiddens, weight, targets, g, ignore_index, with_stats, need_h, need_w, chunked):
    return _triton_op(hiddens, weight, targets, g, ignore_index, with_stats, need_h, need_w, chunked)[:4]


def multi_exit_cross_entropy(
    hiddens: Sequence[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    exit_weights: Sequence[float],
    ignore_index: int = -100,
    return_stats: bool = False,
    validate: bool = True,
) -> MultiExitCEOutput:
    """Weighted cross-entropy of K exits through one shared head, without ``[N, V]`` logits.

    Args:
        hiddens: K tensors ``[N, D]`` or one ``[K, N, D]`` tensor: the exits' hidden states,
            flattened over batch × time.
        weight: ``[V, D]`` shared output head (an ``nn.Linear`` weight without bias).
        targets: ``[N]`` integer targets in ``[0, V)`` or equal to ``ignore_index``.
        exit_weights: K static floats ≥ 0. Exits weighing 0 are evaluated (``per_exit``,
            statistics) but get no gradient and cost no gradient work.
        ignore_index: target value of tokens that carry no loss.
        return_stats: also return per-token confidence, argmax and loss of every exit.
        validate: check shapes, weights and target values, without a host sync: target values
            raise ValueError on the CPU and are checked with ``torch._assert_async`` on a GPU or
            under ``torch.compile`` (a RuntimeError at the next sync). Pass False when the
            caller already checked.

    Returns:
        ``MultiExitCEOutput(loss, per_exit, confidence, predictions, token_loss)``: ``loss`` ()
        fp32 ``Σ_k w_k · mean CE_k`` over non-ignored tokens (0 when all are ignored);
        ``per_exit`` (K,) fp32 detached; with ``return_stats``, ``confidence`` (K, N) fp32 max
        softmax probability, ``predictions`` (K, N) int64 argmax and ``token_loss`` (K, N) fp32
        detached per-token CE (0 at ignored tokens), else None.

    Raises:
        ValueError: with ``validate``, a shape mismatch, K ≠ len(exit_weights), a negative or
            non-finite weight, or (CPU tensors) a target outside ``[0, V)`` other than ``ignore_index``.
    """
    weights = [float(w) for w in exit_weights]
    if validate:
        validate_inputs(hiddens, weight, targets, weights, ignore_index)
    device = weight.device
    # Like nn.Linear: the autocast dtype when autocast is on, else the common input dtype.
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = torch.promote_types(hiddens[0].dtype, weight.dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.float32
    head = weight.to(dtype).contiguous()
    targets = targets.long().contiguous()
    per_token = _per_token(device, head.shape[1], dtype)

    K = len(weights)
    grad_on = torch.is_grad_enabled()
    needs_grad = grad_on and (weight.requires_grad or any(h.requires_grad for h in hiddens))
    trained = [k for k in range(K) if weights[k] > 0] if needs_grad else list(range(K))
    trained = trained or list(range(K))  # all weights 0: keep the loss differentiable
    frozen = [k for k in range(K) if k not in trained]
    stacked = _stack(hiddens, trained, dtype)
    g = token_scales(targets, [weights[k] for k in trained], ignore_index)  # (K', N) on the device
    need_h, need_w = grad_on and stacked.requires_grad, grad_on and head.requires_grad
    loss, *outputs = per_token(stacked, head, targets, g, ignore_index, return_stats, need_h, need_w)
    if frozen:
        # Weight-0 exits go through the op without gradients: no gradient work is done for them.
        with torch.no_grad():
            _, *frozen_outputs = per_token(
                _stack(hiddens, frozen, dtype), head, targets, token_scales(targets, [0.0] * len(frozen), ignore_index),
                ignore_index, return_stats, False, False,
            )  # fmt: skip
        order = trained + frozen  # rows of the two calls' outputs, back to exit order below
        outputs = [
            torch.stack([(*a, *b)[order.index(k)] for k in range(K)]) if a.dim() == 2 else a
            for a, b in zip(outputs, frozen_outputs)
        ]
    token_loss, confidence, predictions = outputs  # (K, N) each
    per_exit = token_loss.sum(dim=1) / (targets != ignore_index).sum().clamp(min=1)  # (K,)
    stats = (confidence, predictions, token_loss.detach()) if return_stats else (None,) * 3
    return MultiExitCEOutput(loss, per_exit.detach(), *stats)
