"""Test set-up: Triton kernels run through the interpreter when there is no GPU.

``TRITON_INTERPRET`` must be set before ``triton.jit`` decorates any kernel, so before anything
imports ``lash_kernels``; pytest imports this file first.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_index_for_numpy_2_4() -> None:
    """Let Triton 3.6's interpreter (torch 2.11's Triton) run loops with NumPy ≥ 2.4.

    It turns a scalar, held as a 1-element array, into a Python int with ``int(array)``, which
    NumPy 2.4 refuses for arrays of one dimension, so every ``range`` over a kernel argument or a
    program id fails. Triton 3.7 converts ``array.squeeze()`` instead; this applies that to 3.6.
    """
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    if not triton.__version__.startswith("3.6."):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


_interpreter_index_for_numpy_2_4()


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
