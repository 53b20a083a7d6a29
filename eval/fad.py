"""Fréchet distances between embedding sets (FAD when the embeddings are audio frames), in float64.

``frechet_distance(x, y)`` fits a Gaussian to each ``(N, D)`` set and returns

    ‖μx − μy‖² + tr Σx + tr Σy − 2 tr √(Σx Σy)

with ``tr √(Σx Σy) = tr √(√Σx Σy √Σx)``, a symmetric matrix whose square root comes from its
eigendecomposition. The guards are fadtk's and pytorch-fid's: non-finite results retry with ``eps·I``
added to both covariances, and a square root with a large imaginary part (here: a clearly negative
eigenvalue) is an error rather than a silently wrong distance.

``fad_inf`` is FAD∞ as fadtk computes it: FAD of random subsets of ``n`` evaluation rows against the
whole reference, for ``n`` in ``linspace(min_n, N)``, a line fitted in ``1/n``, and its intercept
(the distance an infinite sample would give), with the fit's R².
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FadInf", "distance_from_stats", "fad_inf", "frechet_distance", "gaussian_stats"]

_IMAGINARY_TOLERANCE = 1e-3  # pytorch-fid's: |imag| of the square root's trace terms


def gaussian_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` rows, in float64.

    Raises:
        ValueError: not a 2-d matrix, or fewer than 2 rows.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"expected an (N, D) matrix with N >= 2 rows, got shape {tuple(x.shape)}")
    x = x.double()
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _trace_sqrt_product(sigma_x: Tensor, sigma_y: Tensor) -> Tensor:
    """``tr √(Σx Σy)`` through ``√Σx Σy √Σx`` (symmetric): eigenvalues, clamped where rounding makes them
    slightly negative; a clearly negative one (an imaginary square root) is an error."""
    ex, vx = torch.linalg.eigh(sigma_x)
    root_x = (vx * ex.clamp(min=0).sqrt()) @ vx.T
    inner = root_x @ sigma_y @ root_x
    eigenvalues = torch.linalg.eigvalsh((inner + inner.T) / 2)
    worst = float(eigenvalues.min())
    if worst < 0 and (-worst) ** 0.5 > _IMAGINARY_TOLERANCE * max(1.0, float(eigenvalues.max()) ** 0.5):
        raise ValueError(f"the covariance product has a negative eigenvalue {worst:.3g}: its square root would be imaginary")
    return eigenvalues.clamp(min=0).sqrt().sum()


def frechet_distance(x: Tensor, y: Tensor, eps: float = 1e-6) -> float:
    """The Fréchet distance between Gaussians fitted to the rows of ``x`` ``(N, D)`` and ``y`` ``(M, D)``.

    Raises:
        ValueError: other widths, too few rows, or an imaginary square root (see the module docstring).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected two (N, D) matrices of the same D, got {tuple(x.shape)} and {tuple(y.shape)}")
    (mu_x, sigma_x), (mu_y, sigma_y) = gaussian_stats(x), gaussian_stats(y)
    return distance_from_stats(mu_x, sigma_x, mu_y, sigma_y, eps)


def distance_from_stats(mu_x: Tensor, sigma_x: Tensor, mu_y: Tensor, sigma_y: Tensor, eps: float = 1e-6) -> float:
    """:func:`frechet_distance` from the two Gaussians' means and covariances (float64)."""
    mu_x, sigma_x, mu_y, sigma_y = (t.double() for t in (mu_x, sigma_x, mu_y, sigma_y))
    trace_sqrt = _trace_sqrt_product(sigma_x, sigma_y)
    if not torch.isfinite(trace_sqrt):
        offset = eps * torch.eye(sigma_x.shape[0], dtype=torch.float64)
        trace_sqrt = _trace_sqrt_product(sigma_x + offset, sigma_y + offset)
    diff = mu_x - mu_y
    return float(diff @ diff + sigma_x.trace() + sigma_y.trace() - 2 * trace_sqrt)


@dataclass(frozen=True)
class FadInf:
    """FAD∞: the fitted line's intercept (``score``), its slope in ``1/n``, R², and the points it was fitted to."""

    score: float
    slope: float
    r2: float
    points: list[tuple[int, float]]


def fad_inf(x: Tensor, reference: Tensor, min_n: int = 500, steps: int = 25, seed: int = 0) -> FadInf:
    """FAD∞ of evaluation rows ``x`` ``(N, D)`` against ``reference`` ``(M, D)`` (fadtk's procedure).

    Raises:
        ValueError: ``min_n`` below 2 or above ``N``, or fewer than 2 steps.
    """
    n_rows = x.shape[0]
    if not 2 <= min_n <= n_rows or steps < 2:
        raise ValueError(f"need 2 <= min_n <= N ({n_rows}) and steps >= 2, got min_n={min_n}, steps={steps}")
    mu_r, sigma_r = gaussian_stats(reference)
    generator = torch.Generator().manual_seed(seed)
    points = []
    for n in torch.linspace(min_n, n_rows, steps).long().tolist():
        rows = torch.randperm(n_rows, generator=generator)[:n]
        mu, sigma = gaussian_stats(x[rows])
        points.append((int(n), distance_from_stats(mu, sigma, mu_r, sigma_r)))
    inv_n = torch.tensor([1 / n for n, _ in points], dtype=torch.float64)
    fad = torch.tensor([d for _, d in points], dtype=torch.float64)
    design = torch.stack([inv_n, torch.ones_like(inv_n)], dim=1)
    slope, intercept = torch.linalg.lstsq(design, fad[:, None]).solution[:, 0].tolist()
    residual = fad - (slope * inv_n + intercept)
    total = ((fad - fad.mean()) ** 2).sum()
    r2 = float(1 - (residual**2).sum() / total) if total > 0 else 1.0
    return FadInf(score=intercept, slope=slope, r2=r2, points=points)
