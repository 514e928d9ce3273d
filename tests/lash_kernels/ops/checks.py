"""Shared checks of the op tests: closeness against float64 per dtype, and compiled ≡ eager."""

import torch

# (rtol, atol relative to the largest expected magnitude) per dtype.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """``actual`` matches the float64 ``expected`` within ``dtype``'s tolerances, atol scaled by its largest value."""
    rtol, atol = TOLERANCES[dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        actual.double(), expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}"
    )


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
