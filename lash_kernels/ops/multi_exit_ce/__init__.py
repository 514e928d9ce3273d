"""Multi-exit cross-entropy through one shared output head, without materialising logits.

K exits (hidden states of K layers) share the output head ``W`` of shape ``[V, D]``. For exit k and
token n, with logits ``z = h_kn · Wᵀ`` and target ``y_n``:

    lse_kn   = log Σ_v exp(z_v)                     (online log-sum-exp over vocab tiles)
    CE_kn    = lse_kn − z_{y_n}
    loss     = Σ_k w_k · (Σ_n∈valid t_n · CE_kn) / max(Σ_n∈valid t_n, tiny)
    conf_kn  = max_v softmax(z)_v = exp(max_v z_v − lse_kn),  pred_kn = argmax_v z_v

with optional per-token weights ``t_n ≥ 0`` (all 1 by default, when the divisor is
``max(|valid|, 1)``); every path first divides them by the labelled tokens' largest weight, so
their fp32 sum stays in ``[1, N]`` whatever their scale (all-zero weights stay 0). Backward. With ``g_kn = ∂loss/∂CE_kn`` (``w_k · t_n / Σ_valid t`` for valid
tokens, 0 for ignored ones),
``∂CE_kn/∂z_v = softmax(z)_v − [v = y_n]``, so the gradient of the logits is

    G_kn,v = g_kn · (exp(z_v − lse_kn) − [v = y_n])
    ∂loss/∂h_kn = Σ_v G_kn,v · W_v          (G · W, a reduction over the vocabulary)
    ∂loss/∂W_v  = Σ_k Σ_n G_kn,v · h_kn     (Gᵀ · h, a reduction over exits and tokens)

``g`` is known before the forward (weights and token weights or count, kept on the device), so every path
forms the gradients in the forward when they are needed and the backward only multiplies them by
the incoming scalar gradient: the op's differentiable output is the scalar loss. The K exits are
stacked on the token axis (``K·N`` rows), so each head matmul covers all exits at once.

Two regimes behind the one op (:func:`multi_exit_cross_entropy` in :mod:`.op` picks, by the rule
in :mod:`.regime`; the ``lash::multi_exit_ce`` op over both is in :mod:`.kernels`):

* **Fused** (:mod:`.fused`): narrow heads (``D ≤ 256``, LASH's small models) on GPUs where
  ``tl.dot`` has tensor cores; four Triton launches (five with token weights, :mod:`.token_weights`)
  and no torch op per call, 4 head matmuls, no logits in memory.
* **Chunked** (:mod:`.chunked`, the driver, and :mod:`.row_kernel`): wider heads, or sm < 80;
  cuBLAS matmuls over token chunks and one fused Triton row pass per chunk, 3 head matmuls. The
  CPU runs the same driver with a torch row pass (:mod:`.torch_path`).

:mod:`.kernels`, :mod:`.fused`, :mod:`.token_weights` and :mod:`.row_kernel` are imported only where
Triton is installed.

Exits with weight 0 run forward only (for ``per_exit`` and the statistics): the public function
sends them through the op without gradients, so no gradient work is done for them.

Numerics: statistics and reductions in fp32. bf16/fp16 operands feed ``tl.dot``/cuBLAS as they
are (the chunked path's logits are in the input dtype, as in Liger-Kernel); fp32 operands use
``tf32x3`` dots in the fused kernels (three TF32 products, near-fp32 accuracy on tensor cores)
and cuBLAS fp32 (under the user's ``allow_tf32`` setting) in the chunked path. fp16 keeps its
bits where eager autocast does, which rounds gradients only after a GradScaler has scaled them:
``G`` is rounded to fp16 for the matmuls over its largest ``g`` (chunked; ``G`` itself would fall
below fp16's smallest value at thousands of tokens) or times ``4096 / max_k w_k`` (fused);
``∂loss/∂h`` is kept over the largest ``g`` (at its size, about 1e-6 at 8K tokens, it would be
subnormal and lose about 3% of its norm), and an fp16 head's ``∂loss/∂W`` stays in fp32 (most
of its entries, the rows of rare classes, are subnormal in fp16 too). The backward multiplies
them by the loss scale (and ``∂loss/∂h`` by its factor) in fp32 and rounds once. Envelope:
``K·N·D``, ``V·D`` < 2³¹ elements; any V.

The result type, the input checks and the eager reference are in :mod:`.reference`.
"""

from lash_kernels.ops.multi_exit_ce.op import multi_exit_cross_entropy
from lash_kernels.ops.multi_exit_ce.reference import MultiExitCEOutput, multi_exit_cross_entropy_reference

__all__ = ["MultiExitCEOutput", "multi_exit_cross_entropy", "multi_exit_cross_entropy_reference"]
