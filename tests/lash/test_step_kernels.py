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


def test_kernels_per_training_step_stay_within_budget(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(256, 64, 4, 4, max_seq_len=32)
    x, y = torch.randint(0, 256, (64, 32)), torch.randint(0, 256, (64, 32))

    def step():  # as the Trainer runs it: the batch's values were checked on the CPU before the step
        with values_checked():
            multi_exit_loss(model.hidden_states(x), model.output_head.weight, y, [0.25] * 4).backward()

    step()
    model.zero_grad(set_to_none=True)  # as an optimizer step leaves them
    with OpCounter() as counter:
        step()
    kernels = collections.Counter(counter.kernels)
    assert len(counter.kernels) <= STEP_KERNEL_BUDGET, kernels.most_common()
    assert "zeros" not in kernels  # no zero gradients filled in for unused outputs
    assert kernels["lash::add_rms_norm"] == kernels["lash::rms_norm_backward"] == 8
