"""Kernels per training step at the seed configuration, counted on the CPU.

A step on a GPU at this size is bound by launches, not by maths: every op is a launch. The count
(views excluded, each LASH op one kernel, ``LASH_KERNELS=triton`` under the interpreter) of the
model's forward to all four exits, the multi-exit loss and the backward is held to a budget, so
an added launch shows up here before it shows up in a GPU profile.
"""

import collections

import torch

from lash import DeepSupervisionTransformer
from lash.losses import multi_exit_loss
from lash_kernels import values_checked
from tests.lash.counting import OpCounter

STEP_KERNEL_BUDGET = 109  # dim 64, 4 layers, 4 heads, batch 64 × 32, all 4 exits (the bar is 110); the vocabulary does not matter


def _step_kernels(monkeypatch, autocast: bool, batch: int = 64) -> tuple[list[str], list[torch.Tensor]]:
    """The kernels of one step, and the hidden states it gave the loss."""
    monkeypatch.setenv("LASH_KERNELS", "triton")
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(256, 64, 4, 4, max_seq_len=32)
    x, y = torch.randint(0, 256, (batch, 32)), torch.randint(0, 256, (batch, 32))

    def step(rows: int):  # as the Trainer runs it: the batch's values were checked on the CPU before the step
        with values_checked(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            hiddens = model.hidden_states(x[:rows])
            loss = multi_exit_loss(hiddens, model.output_head.weight, y[:rows], [0.25] * 4)
        loss.backward()
        return hiddens

    # The warm-up (whatever is made lazily on a first step) on two sequences: the interpreter's time
    # grows with the batch, the kernels do not (the same multiset at 4 and 64 sequences, 2026-12-07).
    step(2)
    model.zero_grad(set_to_none=True)  # as an optimizer step leaves them
    with OpCounter() as counter:
        hiddens = step(batch)
    return counter.kernels, hiddens


def test_kernels_per_training_step_stay_within_budget(monkeypatch):
    step, _ = _step_kernels(monkeypatch, autocast=False)
    kernels = collections.Counter(step)
    assert len(step) <= STEP_KERNEL_BUDGET, kernels.most_common()
    assert "zeros" not in kernels  # no zero gradients filled in for unused outputs
    assert kernels["lash::add_rms_norm"] == kernels["lash::rms_norm_backward"] == 8


def test_under_autocast_only_the_weights_are_cast(monkeypatch):
    """bf16 autocast casts each fp32 weight a GEMM reads (16 in the blocks, the head) and its
    gradient back, the embedding output once and its gradient, and the loss's scale: no
    activation around a norm, RoPE or a projection, since the residual stream runs in bf16."""
    step, hiddens = _step_kernels(monkeypatch, autocast=True, batch=4)  # the count does not depend on the batch
    assert collections.Counter(step)["_to_copy"] <= 2 * 16 + 2 + 2 + 1, collections.Counter(step).most_common()
    assert all(h.dtype == torch.bfloat16 for h in hiddens)
