"""The fused regime: two Triton kernels for narrow heads, no logits in memory.

Taken for heads up to ``FUSED_MAX_HIDDEN`` = 256 wide (the seed's models) on GPUs where
``tl.dot`` has tensor cores, fp32 operands only up to D = 64 (see :func:`fused_takes`).
``_fused_forward_kernel`` on a (token tiles × vocab splits) grid writes partial max / Σexp /
argmax / target logit, merged in torch into lse, CE and statistics; then ``_fused_grad_kernel``
on a (vocab tiles × token splits) grid recomputes each logits tile once, forms G, and from that
one tile accumulates ``Gᵀ·h`` into its registers (the fp32 ``dW`` tile, one per token split,
summed in a fixed order: deterministic) and adds ``G·W`` into the fp32 ``dH`` with atomics
(summation order varies run to run in the last bits). Head matmuls: 4 (one recompute), no
logits in memory. Splits are sized for ≥ 4 programs per SM. fp32 operands take ``tf32x3`` dots
(three TF32 products: near-fp32 accuracy on tensor cores); 16-bit operands feed ``tl.dot`` as
they are.

The maths and the backward derivation are in :mod:`lash_kernels.ops.multi_exit_ce`.
"""

from __future__ import annotations

import torch

from lash_kernels._launch import sm_count
from lash_kernels.aot_types import ARCHS, config_variant, pointer
from lash_kernels.dispatch import HAS_TRITON, interpreting

FUSED_MAX_HIDDEN = 256  # widest head the fused kernels take (their dW/dH tiles live in registers)
PROGRAMS_PER_SM = 4  # fused grids aim for this many programs per streaming multiprocessor


def fused_regime(hidden: int, dtype: torch.dtype, tensor_cores: bool) -> bool:
    """The regime rule: fused Triton kernels for narrow heads where ``tl.dot`` has tensor cores
    and tiles exist for the dtype, the chunked cuBLAS path otherwise (module docstring)."""
    return hidden <= FUSED_MAX_HIDDEN and tensor_cores and fused_takes(hidden, dtype)


if HAS_TRITON:  # optional off Linux: the torch path still works there
    import triton
    import triton.language as tl
    from lash_kernels._launch import launch

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
        stall); one small tile under the interpreter. ``int(D)``: under ``torch.compile`` with
        dynamic shapes D arrives as a SymInt, and the tiles need a number (it specialises D)."""
        block_d = max(16, triton.next_power_of_2(int(D)))
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
            "fp32" if dtype == torch.float32 else "16-bit", max(64, triton.next_power_of_2(int(D)))
        ) in _GRAD_TILES


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

    def run_fused(hiddens, weight, targets, g, ignore_index, with_stats, need_h, need_w):
        """The fused regime (module docstring): partial-softmax kernel, merge, one grad kernel."""
        K, N, D = hiddens.shape
        V, rows = weight.shape[0], K * N
        h = hiddens.view(rows, D)
        forward, grad = _fused_configs(D, hiddens.dtype)
        splits_v, split_cols, splits_n, split_rows = _fused_launch_shape(rows, V, forward, grad, sm_count(h.device))
        part_max = torch.empty((splits_v, rows), dtype=torch.float32, device=h.device)
        part_sum, part_tgt = torch.empty_like(part_max), torch.empty_like(part_max)
        part_arg = torch.empty((splits_v, rows), dtype=torch.int32, device=h.device)
        launch(_fused_forward_kernel)[(triton.cdiv(rows, forward["BLOCK_N"]), splits_v)](
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
            launch(_fused_grad_kernel)[(triton.cdiv(V, grad["BLOCK_V"]), splits_n)](
                h, weight, targets, lse, g, grad_h, grad_w, rows, N, V, D, split_rows,
                NEED_H=need_h, NEED_W=need_w, **grad, **_dot_args(h.dtype),
            )  # fmt: skip
        loss = torch.dot(token_loss.view(-1), g.view(-1))
        grad_h = grad_h.view(K, N, D) if need_h else grad_h
        grad_w = grad_w.sum(dim=0) if need_w else grad_w  # fixed order over token splits
        return loss, token_loss, conf, pred, grad_h, grad_w

    def fused_variants(shape, dtype: torch.dtype, arch: int) -> list:
        """The two fused launches at ``shape`` on ``arch`` for :mod:`lash_kernels.aot_check`."""
        D, V, rows = shape.hidden, shape.vocab, shape.exits * shape.tokens
        act, f32, i64 = pointer(dtype), pointer(torch.float32), pointer(torch.int64)
        dots = dict(DOT_PRECISION=_dot_args(dtype)["DOT_PRECISION"], UPCAST_DOT=False)
        forward, grad = _fused_configs(D, dtype)
        splits_v, split_cols, splits_n, split_rows = _fused_launch_shape(rows, V, forward, grad, ARCHS[arch].sms)
        common = dict(h_ptr=act, w_ptr=act, y_ptr=i64)
        sizes = dict(rows_total="i32", N="i32", V="i32", D="i32")
        ints = dict(rows_total=rows, N=shape.tokens, V=V, D=D)
        return [
            config_variant(
                "multi_exit_ce.fused_forward", _fused_forward_kernel,
                common | dict(max_ptr=f32, sum_ptr=f32, tgt_ptr=f32, arg_ptr=pointer(torch.int32))
                | sizes | dict(split_cols="i32"),
                forward, dots, triton.cdiv(rows, forward["BLOCK_N"]) * splits_v, ints | dict(split_cols=split_cols),
            ),
            config_variant(
                "multi_exit_ce.fused_grad", _fused_grad_kernel,
                common | dict(lse_ptr=f32, g_ptr=f32, gh_ptr=f32, gw_ptr=f32) | sizes | dict(split_rows="i32"),
                grad, dots | dict(NEED_H=True, NEED_W=True), triton.cdiv(V, grad["BLOCK_V"]) * splits_n,
                ints | dict(split_rows=split_rows),
            ),
        ]  # fmt: skip
