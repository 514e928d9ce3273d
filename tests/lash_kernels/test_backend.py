import pytest
import torch

from lash_kernels import backend


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
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend("cpu")
