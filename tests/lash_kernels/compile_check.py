"""Shared check for the kernel tests: a module compiled with ``fullgraph=True`` matches eager."""

import torch


def assert_compiles_like_eager(module: torch.nn.Module, x: torch.Tensor, rtol: float, atol: float) -> None:
    """``torch.compile(module, fullgraph=True)`` gives eager's output and parameter gradients."""
    compiled = torch.compile(module, fullgraph=True)
    out, want = compiled(x), module(x)
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol)
    out.float().pow(2).mean().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    want.float().pow(2).mean().backward()
    for got, ref in zip(grads, (p.grad for p in module.parameters())):
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
