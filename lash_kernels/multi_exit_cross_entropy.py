"""Multi-exit cross-entropy through one shared output head, without materialising logits.

K exits (hidden states of K layers) share the output head ``W`` of shape ``[V, D]``. For exit k and
token n, with logits ``z = h_kn · Wᵀ`` and target ``y_n``:

    lse_kn   = log Σ_v exp(z_v)                     (online log-sum-exp over vocab tiles)
    CE_kn    = lse_kn − z_{y_n}
    loss     = Σ_k w_k · (Σ_n∈valid CE_kn) / max(|valid|, 1)
    conf_kn  = max_v softmax(z)_v = exp(max_v z_v − lse_kn),  pred_kn = argmax_v z_v

The ``max(|valid|, 1)`` makes an all-ignored batch contribute 0 rather than NaN.

Backward. With ``g_kn = ∂loss/∂CE_kn`` (``w_k / |valid|`` for valid tokens, 0 for ignored ones),
``∂CE_kn/∂z_v = softmax(z)_v − [v = y_n]``, so the gradient of the logits is

    G_kn,v = g_kn · (exp(z_v − lse_kn) − [v = y_n])
    ∂loss/∂h_kn = Σ_v G_kn,v · W_v          (G_k · W, a reduction over the vocabulary)
    ∂loss/∂W_v  = Σ_k Σ_n G_kn,v · h_kn     (Σ_k G_kᵀ · h_k, a reduction over exits and tokens)

Only ``lse`` (fp32 ``[K, N]``) is saved; logits are recomputed tile by tile from ``h`` and ``W``.

Triton path (CUDA, or the CPU through ``TRITON_INTERPRET=1``):

* ``_forward_kernel``, grid (token tiles, exits): loops over vocab tiles, ``tl.dot`` in fp32
  accumulation, online log-sum-exp, target logit, running max and argmax.
* ``_grad_hidden_kernel``, grid (token tiles, exits): recomputes each logit tile, forms ``G`` and
  accumulates ``G · W`` for its token rows, so every ``grad_h`` row is written by one program.
* ``_grad_weight_kernel``, grid (vocab tiles,): loops over exits and token tiles, recomputes
  ``G`` and accumulates ``Gᵀ · h`` — the one fp32 head-gradient accumulator shared by all exits,
  each ``grad_W`` tile written by one program (deterministic, no atomics).

Work: forward 1 head matmul, backward 4 (two recomputes, ``G·W``, ``Gᵀ·h``) against the 3 of an
eager implementation that keeps ``[N, V]`` logits; what is saved is the logits traffic
(``3·K·N·V`` elements), which dominates at the small ``D`` LASH targets.

Exits with weight 0 run forward only (for ``per_exit`` and the statistics): the public function
sends them through the op detached, so no backward kernel ever sees them.

Numerics: logits, softmax and all reductions in fp32. bf16/fp16 operands feed ``tl.dot`` as they
are; fp32 operands use IEEE fp32 dots (``input_precision="ieee"``), not TF32, because TF32's
10-bit mantissa turns logits of magnitude 1e3 into absolute errors of order 1 — the fast path
is bf16. Envelope: ``N·D``, ``V·D`` < 2³¹; ``D`` ≤ 256 keeps the gradient tiles in registers,
larger ``D`` accumulates them in an fp32 buffer owned by one program (read-modify-write per vocab
or token tile: correct, but slower — the place to look first for speed at LLM widths).

Registered as ``torch.ops.lash.multi_exit_ce_forward`` / ``multi_exit_ce_backward`` with
``torch.library.triton_op`` so ``torch.compile`` sees the kernels. The result type, input checks,
eager reference and chunked torch path live in :mod:`lash_kernels.multi_exit_cross_entropy_torch`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lash_kernels.backend import HAS_TRITON, backend, interpreting
from lash_kernels.multi_exit_cross_entropy_torch import (
    MultiExitCEOutput,
    TorchMultiExitCE,
    multi_exit_cross_entropy_reference,
    validate_inputs,
)

__all__ = ["MultiExitCEOutput", "multi_exit_cross_entropy", "multi_exit_cross_entropy_reference"]

if HAS_TRITON:  # optional off Linux: the torch path still works there
    import triton
    import triton.language as tl
    from torch.library import register_autograd, triton_op, wrap_triton

    def _configs() -> list[triton.Config]:
        """Tile shapes to try: one small fixed tile under the interpreter (no tuning), a few on GPU."""
        if interpreting():
            return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32}, num_warps=1)]
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_V": bv}, num_warps=warps, num_stages=stages)
            for bn, bv, warps, stages in (
                (64, 128, 4, 3),
                (128, 128, 8, 3),
                (64, 64, 4, 4),
                (128, 64, 8, 3),
                (32, 64, 4, 2),  # fits shared memory even for fp32 at BLOCK_D = 256
            )
        ]

    def _shared_bytes(config: triton.Config, D: int, element_size: int) -> int:
        """Shared memory a config stages for its dots: ``num_stages`` copies of an h tile and a W
        tile. An upper bound on what the compiler allocates; :mod:`lash_kernels.aot_check`
        compiles every surviving config to hold it to the real figure."""
        tile_rows = config.kwargs["BLOCK_N"] + config.kwargs["BLOCK_V"]
        return config.num_stages * tile_rows * _block_d(D) * element_size

    def _fitting(configs: list, D: int, element_size: int, limit: int) -> list:
        """The configs whose tiles fit ``limit`` bytes of shared memory; the smallest if none does,
        so a launch still gets its clear out-of-resources error."""
        fits = [c for c in configs if _shared_bytes(c, D, element_size) <= limit]
        return fits or [min(configs, key=lambda c: _shared_bytes(c, D, element_size))]

    def _prune(configs: list, named_args: dict, **_) -> list:
        """Autotuner hook: never compile a config the running GPU cannot launch."""
        h = named_args["h_ptr"]
        if h.device.type != "cuda":
            return configs
        limit = torch.cuda.get_device_properties(h.device).shared_memory_per_block_optin
        return _fitting(configs, named_args["D"], h.element_size(), limit)

    @triton.jit
    def _dot(
        a,  # [M, K] operand in the input dtype
        b,  # [K, P] operand in the input dtype
        acc,  # [M, P] fp32 accumulator
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands (see module docstring)
        UPCAST_DOT: tl.constexpr,  # interpreter only: it multiplies bf16 bit patterns as integers
    ):
        """``acc + a · b`` on tensor cores in the operands' dtype, accumulated in fp32."""
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _row_tile(
        ptr,  # row-major [rows, D] matrix
        idx,  # [R] row indices
        num_rows,  # rows of the matrix (for the mask)
        d0,  # first column of the tile
        D,  # columns of the matrix
        BLOCK_D: tl.constexpr,  # columns of the tile
    ):
        """Pointers and mask of the [R, BLOCK_D] tile ``matrix[idx, d0 : d0 + BLOCK_D]``."""
        dims = d0 + tl.arange(0, BLOCK_D)
        return ptr + idx[:, None] * D + dims[None, :], (idx[:, None] < num_rows) & (dims[None, :] < D)

    @triton.jit
    def _logits_tile(
        h_ptr,  # [N, D] hidden states of one exit
        w_ptr,  # [V, D] shared head
        rows,  # [BLOCK_N] token indices of the tile
        cols,  # [BLOCK_V] vocab indices of the tile
        N,  # tokens
        V,  # vocabulary size
        D,  # hidden size
        BLOCK_N: tl.constexpr,  # tokens per tile
        BLOCK_V: tl.constexpr,  # vocab entries per tile
        BLOCK_D: tl.constexpr,  # hidden features per dot
        DOT_PRECISION: tl.constexpr,  # dot precision for fp32 operands
        UPCAST_DOT: tl.constexpr,  # feed tl.dot fp32 (interpreter with bf16 inputs)
    ):
        """fp32 logits ``h[rows] · W[cols]ᵀ`` of shape [BLOCK_N, BLOCK_V]; padded vocab at -inf."""
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            h_ptrs, h_mask = _row_tile(h_ptr, rows, N, d0, D, BLOCK_D)
            w_ptrs, w_mask = _row_tile(w_ptr, cols, V, d0, D, BLOCK_D)
            h = tl.load(h_ptrs, mask=h_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)  # [BLOCK_V, BLOCK_D]
            acc = _dot(h, tl.trans(w), acc, DOT_PRECISION, UPCAST_DOT)
        # -inf keeps padded columns out of the max, the sum of exponentials and the argmax.
        return tl.where(cols[None, :] < V, acc, float("-inf"))

    @triton.jit
    def _grad_logits_tile(
        h_ptr,  # [N, D] hidden states of one exit
        w_ptr,  # [V, D] shared head
        y,  # [BLOCK_N] targets of the tile's tokens
        lse,  # [BLOCK_N] fp32 log-sum-exp saved by the forward
        g,  # [BLOCK_N] fp32 ∂loss/∂CE, already 0 for ignored and padded tokens
        rows,  # [BLOCK_N] token indices
        cols,  # [BLOCK_V] vocab indices
        N,  # tokens
        V,  # vocabulary size
        D,  # hidden size
        BLOCK_N: tl.constexpr,  # tokens per tile
        BLOCK_V: tl.constexpr,  # vocab entries per tile
        BLOCK_D: tl.constexpr,  # hidden features per dot
        DOT_PRECISION: tl.constexpr,  # dot precision for fp32 operands
        UPCAST_DOT: tl.constexpr,  # feed tl.dot fp32 (interpreter with bf16 inputs)
    ):
        """Recomputed ``G = g · (softmax − onehot(y))`` for one [BLOCK_N, BLOCK_V] tile, fp32."""
        logits = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT)
        probs = tl.exp(logits - lse[:, None])  # ≤ 1 because lse ≥ every logit; 0 on padded vocab
        onehot = (cols[None, :] == y[:, None]).to(tl.float32)
        return (probs - onehot) * g[:, None]

    @triton.autotune(configs=_configs(), key=["D", "V"], prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _forward_kernel(
        h_ptr,  # [K, N, D] hidden states of all exits, contiguous
        w_ptr,  # [V, D] shared head, contiguous
        y_ptr,  # [N] int64 targets
        loss_ptr,  # [K, N] fp32 out: per-token CE, 0 where ignored
        lse_ptr,  # [K, N] fp32 out: log-sum-exp, the only thing the backward keeps
        conf_ptr,  # [K, N] fp32 out: max softmax probability (WITH_STATS only)
        pred_ptr,  # [K, N] int64 out: argmax over the vocabulary (WITH_STATS only)
        N,  # tokens
        V,  # vocabulary size
        D,  # hidden size
        ignore_index,  # target value that marks a token without loss
        WITH_STATS: tl.constexpr,  # also write confidence and argmax
        BLOCK_N: tl.constexpr,  # tokens per program
        BLOCK_V: tl.constexpr,  # vocab entries per loop step
        BLOCK_D: tl.constexpr,  # hidden features per dot
        DOT_PRECISION: tl.constexpr,  # dot precision for fp32 operands
        UPCAST_DOT: tl.constexpr,  # feed tl.dot fp32 (interpreter with bf16 inputs)
    ):
        exit_k = tl.program_id(1).to(tl.int64)  # int64: K·N·D may pass 2³¹
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index)
        h_ptr += exit_k * N * D

        run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)  # Σ exp(z − run_max)
        target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
        best = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            logits = _logits_tile(
                h_ptr, w_ptr, rows, cols, N, V, D, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT
            )  # [BLOCK_N, BLOCK_V]
            tile_max = tl.max(logits, axis=1)
            # Strict ">" keeps the earlier tile on ties; tl.argmax breaks ties to the left inside
            # a tile: together the lowest index, as torch.argmax.
            best = tl.where(tile_max > run_max, v0 + tl.argmax(logits, axis=1), best)
            new_max = tl.maximum(run_max, tile_max)  # finite from the first tile on
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            run_max = new_max
            target_logit += tl.sum(tl.where(cols[None, :] == y[:, None], logits, 0.0), axis=1)

        lse = run_max + tl.log(run_sum)
        loss = tl.where(y != ignore_index, lse - target_logit, 0.0)
        out = exit_k * N + rows
        tl.store(loss_ptr + out, loss, mask=row_mask)
        tl.store(lse_ptr + out, lse, mask=row_mask)
        if WITH_STATS:
            tl.store(conf_ptr + out, tl.exp(run_max - lse), mask=row_mask)
            tl.store(pred_ptr + out, best.to(tl.int64), mask=row_mask)

    @triton.jit
    def _add_product_rows(
        out_ptr,  # row-major [out rows, D] fp32 gradient, rows out_idx owned by this program
        out_idx,  # [R] rows of out to update
        num_out,  # rows of out
        a,  # [R, M] fp32 left factor (a gradient-of-logits tile or its transpose)
        b_ptr,  # row-major [b rows, D] right factor (the head or the hidden states)
        b_idx,  # [M] rows of b
        num_b,  # rows of b
        D,  # hidden size
        R: tl.constexpr,  # rows of the tile
        BLOCK_D: tl.constexpr,  # columns per dot
        DOT_PRECISION: tl.constexpr,  # dot precision for fp32 operands
        UPCAST_DOT: tl.constexpr,  # feed tl.dot fp32 (interpreter with bf16 inputs)
    ):
        """``out[out_idx] += a · b[b_idx]`` one BLOCK_D slice at a time, for D too wide for registers.

        The barrier makes this call's stores visible to whichever threads load them next call.
        """
        for d0 in range(0, D, BLOCK_D):
            b_ptrs, b_mask = _row_tile(b_ptr, b_idx, num_b, d0, D, BLOCK_D)
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
            out_ptrs, out_mask = _row_tile(out_ptr, out_idx, num_out, d0, D, BLOCK_D)
            acc = tl.load(out_ptrs, mask=out_mask, other=0.0)
            tl.store(out_ptrs, _dot(a.to(b.dtype), b, acc, DOT_PRECISION, UPCAST_DOT), mask=out_mask)
        tl.debug_barrier()

    @triton.jit
    def _zero_rows(
        ptr,  # row-major [rows, D] fp32 matrix
        idx,  # [R] rows to zero
        num_rows,  # rows of the matrix
        D,  # columns
        R: tl.constexpr,  # rows of the tile
        BLOCK_D: tl.constexpr,  # columns per store
    ):
        for d0 in range(0, D, BLOCK_D):
            ptrs, mask = _row_tile(ptr, idx, num_rows, d0, D, BLOCK_D)
            tl.store(ptrs, tl.zeros((R, BLOCK_D), dtype=tl.float32), mask=mask)
        tl.debug_barrier()

    @triton.autotune(configs=_configs(), key=["D", "V"], prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _grad_hidden_kernel(
        h_ptr,  # [K, N, D] hidden states of the exits that need gradients
        w_ptr,  # [V, D] shared head
        y_ptr,  # [N] int64 targets
        lse_ptr,  # [K, N] fp32 log-sum-exp from the forward
        g_ptr,  # [K, N] fp32 ∂loss/∂CE per token
        gh_ptr,  # [K, N, D] fp32 out: ∂loss/∂h
        N,  # tokens
        V,  # vocabulary size
        D,  # hidden size
        ignore_index,  # target value that marks a token without loss
        SINGLE_D_TILE: tl.constexpr,  # D ≤ BLOCK_D: the [BLOCK_N, D] gradient fits in registers
        BLOCK_N: tl.constexpr,  # tokens per program
        BLOCK_V: tl.constexpr,  # vocab entries per loop step
        BLOCK_D: tl.constexpr,  # hidden features per dot
        DOT_PRECISION: tl.constexpr,  # dot precision for fp32 operands
        UPCAST_DOT: tl.constexpr,  # feed tl.dot fp32 (interpreter with bf16 inputs)
    ):
        exit_k = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index)
        lse = tl.load(lse_ptr + exit_k * N + rows, mask=row_mask, other=0.0)
        g = tl.load(g_ptr + exit_k * N + rows, mask=row_mask, other=0.0)
        g = tl.where(y != ignore_index, g, 0.0)
        h_ptr += exit_k * N * D
        gh_ptr += exit_k * N * D

        # Registers hold the [BLOCK_N, D] gradient when D fits one tile; otherwise the program
        # accumulates into its own rows of gh, which no other program touches.
        if SINGLE_D_TILE:
            acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        else:
            _zero_rows(gh_ptr, rows, N, D, BLOCK_N, BLOCK_D)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            dz = _grad_logits_tile(
                h_ptr, w_ptr, y, lse, g, rows, cols, N, V, D, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT
            )  # [BLOCK_N, BLOCK_V]
            if SINGLE_D_TILE:
                w_ptrs, w_mask = _row_tile(w_ptr, cols, V, 0, D, BLOCK_D)
                w = tl.load(w_ptrs, mask=w_mask, other=0.0)  # [BLOCK_V, BLOCK_D]
                acc = _dot(dz.to(w.dtype), w, acc, DOT_PRECISION, UPCAST_DOT)
            else:
                _add_product_rows(gh_ptr, rows, N, dz, w_ptr, cols, V, D, BLOCK_N, BLOCK_D, DOT_PRECISION, UPCAST_DOT)
        if SINGLE_D_TILE:
            gh_ptrs, gh_mask = _row_tile(gh_ptr, rows, N, 0, D, BLOCK_D)
            tl.store(gh_ptrs, acc, mask=gh_mask)

    @triton.autotune(configs=_configs(), key=["D", "V"], prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _grad_weight_kernel(
        h_ptr,  # [K, N, D] hidden states of the exits that need gradients
        w_ptr,  # [V, D] shared head
        y_ptr,  # [N] int64 targets
        lse_ptr,  # [K, N] fp32 log-sum-exp from the forward
        g_ptr,  # [K, N] fp32 ∂loss/∂CE per token
        gw_ptr,  # [V, D] fp32 out: ∂loss/∂W, summed over exits and tokens
        K,  # exits
        N,  # tokens
        V,  # vocabulary size
        D,  # hidden size
        ignore_index,  # target value that marks a token without loss
        SINGLE_D_TILE: tl.constexpr,  # D ≤ BLOCK_D: the [BLOCK_V, D] gradient fits in registers
        BLOCK_N: tl.constexpr,  # tokens per loop step
        BLOCK_V: tl.constexpr,  # vocab entries per program
        BLOCK_D: tl.constexpr,  # hidden features per dot
        DOT_PRECISION: tl.constexpr,  # dot precision for fp32 operands
        UPCAST_DOT: tl.constexpr,  # feed tl.dot fp32 (interpreter with bf16 inputs)
    ):
        cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
        # One accumulator for every exit: registers when D fits one tile, else this program's rows.
        if SINGLE_D_TILE:
            acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
        else:
            _zero_rows(gw_ptr, cols, V, D, BLOCK_V, BLOCK_D)
        exit_h_ptr = h_ptr
        for exit_k in range(0, K):
            for n0 in range(0, N, BLOCK_N):
                rows = n0 + tl.arange(0, BLOCK_N)
                row_mask = rows < N
                y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index)
                lse = tl.load(lse_ptr + exit_k * N + rows, mask=row_mask, other=0.0)
                g = tl.load(g_ptr + exit_k * N + rows, mask=row_mask, other=0.0)
                g = tl.where(y != ignore_index, g, 0.0)
                dz_t = tl.trans(
                    _grad_logits_tile(
                        exit_h_ptr, w_ptr, y, lse, g, rows, cols, N, V, D,
                        BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT,
                    )
                )  # [BLOCK_V, BLOCK_N]  # fmt: skip
                if SINGLE_D_TILE:
                    h_ptrs, h_mask = _row_tile(exit_h_ptr, rows, N, 0, D, BLOCK_D)
                    h = tl.load(h_ptrs, mask=h_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
                    acc = _dot(dz_t.to(h.dtype), h, acc, DOT_PRECISION, UPCAST_DOT)
                else:
                    _add_product_rows(
                        gw_ptr, cols, V, dz_t, exit_h_ptr, rows, N, D, BLOCK_V, BLOCK_D, DOT_PRECISION, UPCAST_DOT
                    )
            exit_h_ptr += N * D  # stepping the pointer keeps K·N·D out of 32-bit products
        if SINGLE_D_TILE:
            gw_ptrs, gw_mask = _row_tile(gw_ptr, cols, V, 0, D, BLOCK_D)
            tl.store(gw_ptrs, acc, mask=gw_mask)

    def _block_d(D: int) -> int:
        """Hidden features per dot: all of D when the gradient tile fits in registers, else 64."""
        if interpreting():
            return 32  # small enough that the tests cover both the single- and multi-tile paths
        return max(16, triton.next_power_of_2(D)) if D <= 256 else 64

    def _dot_args(dtype: torch.dtype) -> dict:
        """IEEE fp32 dots for fp32 inputs (module docstring); fp32 operands for the interpreter's bf16."""
        return dict(
            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",  # ignored for 16-bit operands
            UPCAST_DOT=interpreting() and dtype == torch.bfloat16,
        )

    @triton_op("lash::multi_exit_ce_forward", mutates_args=())
    def _triton_forward(
        hiddens: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        with_stats: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token CE, lse and (with_stats) confidence/argmax of every exit; see the kernel."""
        K, N, D = hiddens.shape
        V = weight.shape[0]
        loss = hiddens.new_empty((K, N), dtype=torch.float32)  # (K, N)
        lse = torch.empty_like(loss)  # (K, N)
        stats_shape = (K, N) if with_stats else (0,)
        conf = hiddens.new_empty(stats_shape, dtype=torch.float32)
        pred = hiddens.new_empty(stats_shape, dtype=torch.int64)
        block_d = _block_d(D)
        if N > 0:
            wrap_triton(_forward_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), K)](
                hiddens, weight, targets, loss, lse, conf, pred, N, V, D, ignore_index,
                WITH_STATS=with_stats, BLOCK_D=block_d, **_dot_args(hiddens.dtype),
            )  # fmt: skip
        return loss, lse, conf, pred

    @triton_op("lash::multi_exit_ce_backward", mutates_args=())
    def _triton_backward(
        grad_loss: torch.Tensor,
        hiddens: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        lse: torch.Tensor,
        ignore_index: int,
        need_grad_hiddens: bool,
        need_grad_weight: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of Σ grad_loss·CE w.r.t. the hiddens and the head (empty when not needed)."""
        K, N, D = hiddens.shape
        V = weight.shape[0]
        grad_loss = grad_loss.float().contiguous()  # the reduction's backward may hand an expand
        grad_h = hiddens.new_empty((K, N, D) if need_grad_hiddens else (0,), dtype=torch.float32)
        grad_w = weight.new_empty((V, D) if need_grad_weight else (0,), dtype=torch.float32)
        block_d = _block_d(D)
        meta_args = dict(SINGLE_D_TILE=D <= block_d, BLOCK_D=block_d, **_dot_args(hiddens.dtype))
        if need_grad_hiddens and N > 0:
            wrap_triton(_grad_hidden_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), K)](
                hiddens, weight, targets, lse, grad_loss, grad_h, N, V, D, ignore_index, **meta_args
            )
        if need_grad_weight:
            if N > 0:
                wrap_triton(_grad_weight_kernel)[lambda meta: (triton.cdiv(V, meta["BLOCK_V"]),)](
                    hiddens, weight, targets, lse, grad_loss, grad_w, K, N, V, D, ignore_index, **meta_args
                )
            else:
                grad_w.zero_()
        return grad_h.to(hiddens.dtype), grad_w.to(weight.dtype)

    def _setup_context(ctx, inputs, output) -> None:
        hiddens, weight, targets, ignore_index, _ = inputs
        ctx.save_for_backward(hiddens, weight, targets, output[1])
        ctx.ignore_index = ignore_index

    def _backward(ctx, grad_loss, _grad_lse, _grad_conf, _grad_pred):
        hiddens, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h, grad_w = _triton_backward(grad_loss, hiddens, weight, targets, lse, ctx.ignore_index, need_h, need_w)
        return grad_h if need_h else None, grad_w if need_w else None, None, None, None

    register_autograd(_triton_forward, _backward, setup_context=_setup_context)

    def static_variants(shape, dtype: torch.dtype, arch: int) -> list:
        """The launches :mod:`lash_kernels.aot_check` compiles: each kernel at every config the
        autotuner tries on ``arch``, for ``shape.exits`` exits of ``shape.tokens`` tokens."""
        from lash_kernels.aot_check import ARCHS, KernelVariant, pointer

        K, N, D, V = shape.exits, shape.tokens, shape.hidden, shape.vocab
        act, f32, i64 = pointer(dtype), pointer(torch.float32), pointer(torch.int64)
        block_d = _block_d(D)
        dot = dict(BLOCK_D=block_d, **_dot_args(dtype))
        ints = dict(N=N, V=V, D=D, K=K)
        common = dict(N="i32", V="i32", D="i32", ignore_index="i32")
        meta = dict.fromkeys(("BLOCK_N", "BLOCK_V", "BLOCK_D", "DOT_PRECISION", "UPCAST_DOT"), "constexpr")
        kernels = (
            ("forward", _forward_kernel, dict(h_ptr=act, w_ptr=act, y_ptr=i64, loss_ptr=f32, lse_ptr=f32,
             conf_ptr=f32, pred_ptr=i64, **common, WITH_STATS="constexpr", **meta), dict(WITH_STATS=True),
             lambda c: triton.cdiv(N, c["BLOCK_N"]) * K),
            ("grad_hidden", _grad_hidden_kernel, dict(h_ptr=act, w_ptr=act, y_ptr=i64, lse_ptr=f32, g_ptr=f32,
             gh_ptr=f32, **common, SINGLE_D_TILE="constexpr", **meta), dict(SINGLE_D_TILE=D <= block_d),
             lambda c: triton.cdiv(N, c["BLOCK_N"]) * K),
            ("grad_weight", _grad_weight_kernel, dict(h_ptr=act, w_ptr=act, y_ptr=i64, lse_ptr=f32, g_ptr=f32,
             gw_ptr=f32, K="i32", **common, SINGLE_D_TILE="constexpr", **meta), dict(SINGLE_D_TILE=D <= block_d),
             lambda c: triton.cdiv(V, c["BLOCK_V"])),
        )  # fmt: skip
        return [
            KernelVariant(f"multi_exit_ce.{name}", kernel.fn, signature, {**flags, **config.kwargs, **dot},
                          config.num_warps, config.num_stages, programs(config.kwargs), ints)
            for name, kernel, signature, flags, programs in kernels
            for config in _fitting(kernel.configs, D, dtype.itemsize, ARCHS[arch].smem_per_block)
        ]  # fmt: skip


def _stack(hiddens: Sequence[torch.Tensor] | torch.Tensor, exits: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The ``[len(exits), N, D]`` contiguous hidden states of ``exits`` in ``dtype``."""
    if isinstance(hiddens, torch.Tensor):
        picked = hiddens if exits == list(range(hiddens.shape[0])) else hiddens[exits]
    else:
        picked = torch.stack([hiddens[k] for k in exits])
    return picked.to(dtype).contiguous()


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
            statistics) but get no gradient and cost no backward work.
        ignore_index: target value of tokens that carry no loss.
        return_stats: also return per-token confidence, argmax and loss of every exit.
        validate: check shapes, weights and target values (one host sync for the targets,
            skipped under ``torch.compile``); pass False when the caller already checked.

    Returns:
        ``MultiExitCEOutput(loss, per_exit, confidence, predictions, token_loss)``: ``loss`` ()
        fp32 ``Σ_k w_k · mean CE_k`` over non-ignored tokens (0 when all are ignored);
        ``per_exit`` (K,) fp32 detached; with ``return_stats``, ``confidence`` (K, N) fp32 max
        softmax probability, ``predictions`` (K, N) int64 argmax and ``token_loss`` (K, N) fp32
        detached per-token CE (0 at ignored tokens), else None.

    Raises:
        ValueError: with ``validate``, a shape mismatch, K ≠ len(exit_weights), a negative or
            non-finite weight, or a target outside ``[0, V)`` other than ``ignore_index``.
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
    per_token = _triton_forward if backend(device) == "triton" else TorchMultiExitCE.apply

    K = len(weights)
    needs_grad = torch.is_grad_enabled() and (
        weight.requires_grad or any(h.requires_grad for h in hiddens)
    )
    trained = [k for k in range(K) if weights[k] > 0] if needs_grad else list(range(K))
    trained = trained or list(range(K))  # all weights 0: keep the loss differentiable
    frozen = [k for k in range(K) if k not in trained]
    outputs = per_token(_stack(hiddens, trained, dtype), head, targets, ignore_index, return_stats)
    if frozen:
        # Weight-0 exits go through the op detached, so the backward kernels never see them.
        frozen_outputs = per_token(
            _stack(hiddens, frozen, dtype).detach(), head.detach(), targets, ignore_index, return_stats
        )
        order = [(trained + frozen).index(k) for k in range(K)]  # back to exit order
        outputs = [torch.cat([a, b])[order] if a.dim() == 2 else a for a, b in zip(outputs, frozen_outputs)]
    token_loss, _, confidence, predictions = outputs  # (K, N) each

    count = (targets != ignore_index).sum().clamp(min=1)
    per_exit = token_loss.sum(dim=1) / count  # (K,)
    loss = (per_exit * torch.tensor(weights, dtype=torch.float32, device=device)).sum()
    stats = (confidence, predictions, token_loss.detach()) if return_stats else (None,) * 3
    return MultiExitCEOutput(loss, per_exit.detach(), *stats)
