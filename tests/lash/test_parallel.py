import contextlib

import torch

from lash import DeepSupervisionTransformer
from lash.parallel import PRECISIONS, autocast, full_states, load_full_states, wrap


def test_autocast_is_a_no_op_for_fp32_and_lowers_matmuls_otherwise():
    cpu = torch.device("cpu")
    assert isinstance(autocast(cpu, "fp32"), contextlib.nullcontext)
    with autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert set(PRECISIONS) == {"fp32", "bf16", "fp16"}


def test_one_process_leaves_the_module_as_it_is():
    model = DeepSupervisionTransformer(11, dim=8, num_layers=2, num_heads=2)
    runner, root = wrap(model, model, torch.device("cpu"), 1, "fsdp", False, False)
    assert runner is model and root is None


def test_full_states_round_trip():
    model = DeepSupervisionTransformer(11, dim=8, num_layers=2, num_heads=2)
    optimizer = torch.optim.AdamW(model.parameters())
    model_state, optim_state = full_states(model, optimizer, sharded=False)
    other = DeepSupervisionTransformer(11, dim=8, num_layers=2, num_heads=2)
    load_full_states(other, torch.optim.AdamW(other.parameters()), model_state, optim_state, sharded=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
