"""The fused SnakeBeta (hand-written backward) equals the plain autograd formula, values and gradients."""

from __future__ import annotations

import pytest
import torch

from lmdm.models.snake import SnakeBeta, snake_beta, snake_beta_reference


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 37, generator=gen, dtype=dtype) * 2
    alpha = torch.randn(5, generator=gen, dtype=dtype) * 0.5
    beta = torch.randn(5, generator=gen, dtype=dtype) * 0.5
    return x, alpha, beta


def test_gradients_pass_gradcheck() -> None:
    x, alpha, beta = (t.requires_grad_() for t in _inputs(torch.float64))
    assert torch.autograd.gradcheck(snake_beta, (x, alpha, beta))


@pytest.mark.parametrize("grads", [(True, True, True), (True, False, False), (False, True, True), (False, False, True)])
def test_matches_the_autograd_formula(grads: tuple[bool, bool, bool]) -> None:
    """Forward and every requested gradient equal the reference, whichever inputs need gradients."""
    fused_in = [t.clone().requires_grad_(g) for t, g in zip(_inputs(torch.float64), grads, strict=True)]
    ref_in = [t.clone().requires_grad_(g) for t, g in zip(_inputs(torch.float64), grads, strict=True)]
    y, y_ref = snake_beta(*fused_in), snake_beta_reference(*ref_in)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(upstream)
    y_ref.backward(upstream)
    for mine, theirs, wanted in zip(fused_in, ref_in, grads, strict=True):
        assert (mine.grad is not None) == wanted
        if wanted:
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-12)


def test_module_float32_equals_reference() -> None:
    x, alpha, beta = _inputs(torch.float32)
    act = SnakeBeta(5)
    with torch.no_grad():
        act.alpha.copy_(alpha)
        act.beta.copy_(beta)
        torch.testing.assert_close(act(x), snake_beta_reference(x, alpha, beta), rtol=1e-6, atol=1e-6)
