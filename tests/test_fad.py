"""Fréchet distance and FAD∞ (lmdm.eval.fad) against a scipy reference and known Gaussian limits."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from lmdm.eval.fad import fad_inf, frechet_distance


def scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch-fid's formula with scipy's sqrtm (the reference)."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(sx @ sy).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * np.trace(covmean))


def test_frechet_distance_equals_the_scipy_reference() -> None:
    g = torch.Generator().manual_seed(0)
    for n, d in ((200, 8), (64, 32), (500, 3)):
        x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
        y = torch.randn(n + 7, d, generator=g, dtype=torch.float64) * 1.5 + 0.3
        assert frechet_distance(x, y) == pytest.approx(scipy_frechet(x.numpy(), y.numpy()), rel=1e-8, abs=1e-9)


def test_identical_sets_are_at_zero_and_shifts_raise_it_monotonically() -> None:
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(frechet_distance(x, x)) < 1e-9
    by_mean = [frechet_distance(x + s, x) for s in (0.0, 0.1, 0.5, 1.0, 3.0)]
    by_scale = [frechet_distance(x * s, x) for s in (1.0, 1.2, 2.0, 4.0)]
    assert by_mean == sorted(by_mean) and by_scale == sorted(by_scale) and by_mean[-1] > 0 and by_scale[-1] > 0
    assert by_mean[2] == pytest.approx(6 * 0.5**2, rel=1e-9)  # a pure mean shift δ in each of D dims: D·δ²


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="N >= 2 rows"):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))


def test_fad_inf_recovers_the_limit_on_gaussians() -> None:
    """Small samples inflate FAD by about c/n; FAD∞'s intercept removes it: evaluation rows from N(δ, I)
    against a large N(0, I) reference, whose true distance is D·δ²."""
    g = torch.Generator().manual_seed(2)
    d, delta = 16, 0.25
    reference = torch.randn(60_000, d, generator=g, dtype=torch.float64)
    x = torch.randn(4000, d, generator=g, dtype=torch.float64) + delta
    result = fad_inf(x, reference, min_n=200, steps=20)
    true = d * delta**2
    small_n = result.points[0][1]
    assert abs(result.score - true) < 0.25 * abs(small_n - true)  # far closer than the smallest sample's FAD
    assert abs(result.score - true) < 0.06 * true and result.slope > 0 and result.r2 > 0.8  # 0.958 against 1.0 (seeded)
    with pytest.raises(ValueError, match="min_n"):
        fad_inf(x, reference, min_n=5000)
