"""Test set-up: Triton kernels run through the interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before ``triton.jit`` decorates any kernel, so before anything
imports ``lash_kernels``; pytest imports this file first.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
