import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lash_kernels import backend, dispatch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "choice, device, expected",
    [("torch", "cpu", "torch"), ("auto", "cpu", "torch"), ("AUTO", "cpu", "torch"), ("triton", "cpu", "triton")],
)
def test_backend_choice(monkeypatch, choice, device, expected):
    monkeypatch.setenv("LASH_KERNELS", choice)
    assert backend(device) == expected


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv("LASH_KERNELS", raising=False)
    assert backend(torch.device("cuda", 0)) == "triton"
    assert backend("meta") == "torch"


def test_bad_choice_and_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "cuda")
    with pytest.raises(ValueError, match="LASH_KERNELS='cuda'; allowed values are auto, triton, torch"):
        backend("cpu")
    monkeypatch.setenv("LASH_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "_INTERPRETING", False)  # as if imported without TRITON_INTERPRET=1
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend("cpu")


def test_works_without_triton_installed():
    """Off Linux there is no triton: lash must import and train on the torch paths."""
    blocker = (
        "import sys, importlib.abc\n"
        "class NoTriton(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('no triton here')\n"
        "sys.meta_path.insert(0, NoTriton())\n"
        "import importlib.util\n"
        "importlib.util.find_spec = lambda name, *a, _f=importlib.util.find_spec: None if name == 'triton' else _f(name, *a)\n"
        "import torch, lash, lash_kernels\n"
        "assert not lash_kernels.backend.__globals__['HAS_TRITON'] and lash_kernels.backend('cpu') == 'torch'\n"
        "model = lash.DeepSupervisionTransformer(50, dim=16, num_layers=2, num_heads=2)\n"
        "trainer = lash.Trainer(lash.TrainingConfig(layer_weights={1: 0.5, 2: 0.5}), 50)\n"
        "x = torch.randint(0, 50, (2, 7))\n"
        "trainer.compute_loss(model, x, x).backward()\n"
        "print('ok')\n"
    )
    env = os.environ | {"TRITON_INTERPRET": "0", "LASH_KERNELS": "auto"}
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
