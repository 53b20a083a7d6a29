"""Drift: how a metric moves along the stream, with confidence intervals from resampling rollouts.

A long-stream evaluation has R rollouts per engine, each cut into W windows (stream positions). A metric
is either **per rollout** (the CLAP score, the likeness distances: a value for each rollout and window,
averaged over rollouts) or **pooled** (FAD: the embedding frames of window w from every rollout pooled into
one Gaussian). Both are written as ``metric(rollouts, w)``: the figure of window ``w`` over a multiset of
rollout indices, so the bootstrap resamples rollouts (the independent unit) and recomputes the figure.

Summaries of the curve (one value per window over every rollout):

- ``slope_per_minute``: least-squares slope of the curve against stream position (metric units a minute);
- ``last_over_first``: the last window's value over the first's, with a 95% bootstrap interval (the same
  resampled rollouts in both windows);
- ``first_window_outside``: the first window whose value leaves the first window's band (window 0's 95%
  bootstrap interval). With many windows some leave a 95% band by chance, so this is information;
- ``last_minus_first``: the same as a difference, with its 95% bootstrap interval;
- ``verdict``: ``drifts`` where the difference's interval lies wholly on the worse side of 0 (above for
  distances, below for the CLAP score), ``improves`` where it lies wholly on the better side, else ``holds``.
  For a positive metric this is the ratio's interval against 1 (the same resamples fall on each side); a
  cosine like the CLAP score can be near or below 0, where a ratio means nothing.

Legend: R rollouts, W windows, B bootstrap resamples, D embedding width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["Drift", "PooledFad", "drift", "mean_metric"]

Metric = Callable[[np.ndarray, int], float]
Worse = Literal["higher", "lower"]


@dataclass(frozen=True)
class Drift:
    """A metric along the stream and its drift summaries (see the module docstring)."""

    metric: str
    worse: Worse  # which direction is worse: "higher" for distances, "lower" for the CLAP score
    positions_s: list[float]  # each window's centre, seconds into the stream
    curve: list[float]  # (W,) every rollout
    band_low: list[float]  # (W,) 95% bootstrap interval of each window
    band_high: list[float]
    slope_per_minute: float
    last_over_first: float
    last_over_first_ci: tuple[float, float]
    last_minus_first: float
    last_minus_first_ci: tuple[float, float]
    first_window_outside: int | None
    verdict: Literal["drifts", "improves", "holds"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class mean_metric:
    """A per-rollout metric ``(R, W)`` as ``metric(rollouts, w)``: the mean over those rollouts (NaNs skipped)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = np.asarray(values, dtype=np.float64)

    def __call__(self, rollouts: np.ndarray, w: int) -> float:
        return float(np.nanmean(self.values[rollouts, w]))

    def table(self, draws: np.ndarray) -> np.ndarray:
        """Every resample ``(B, R)`` at every window at once: ``(B, W)``."""
        with np.errstate(invalid="ignore"):
            return np.asarray(np.nanmean(self.values[draws], axis=1))


def drift(
    name: str,
    metric: Metric,
    rollouts: int,
    windows: int,
    window_seconds: float,
    worse: Worse = "higher",
    resamples: int = 500,
    seed: int = 0,
) -> Drift:
    """The curve of ``metric`` over ``windows`` windows and its summaries, bootstrapped over ``rollouts`` rollouts.

    Args:
        metric: ``metric(rollouts, w)``, the figure of window ``w`` over rollout indices (with repeats).
        window_seconds: a window's length (positions and the slope are in seconds and minutes).
        worse: the direction in which the metric gets worse.
        resamples: bootstrap resamples (B).

    Raises:
        ValueError: no rollout or no window.
    """
    if rollouts < 1 or windows < 1:
        raise ValueError(f"drift needs at least one rollout and one window, got {rollouts} and {windows}")
    every = np.arange(rollouts)
    curve = np.array([metric(every, w) for w in range(windows)])
    draws = np.random.default_rng(seed).integers(0, rollouts, size=(resamples, rollouts))  # (B, R)
    fast = isinstance(metric, mean_metric)
    boot = metric.table(draws) if fast else np.array([[metric(d, w) for w in range(windows)] for d in draws])  # (B, W)
    low, high = np.nanpercentile(boot, [2.5, 97.5], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = boot[:, -1] / boot[:, 0]
        ratio = float(curve[-1] / curve[0]) if curve[0] != 0 else float("nan")
    r_low, r_high = _interval(ratios)
    d_low, d_high = _interval(boot[:, -1] - boot[:, 0])
    outside = next((w for w in range(1, windows) if not low[0] <= curve[w] <= high[0]), None)
    positions = (np.arange(windows) + 0.5) * window_seconds
    slope = float(np.polyfit(positions / 60.0, curve, 1)[0]) if windows > 1 and np.all(np.isfinite(curve)) else 0.0
    if windows < 2 or not np.isfinite(d_low):
        verdict: Literal["drifts", "improves", "holds"] = "holds"
    elif (d_low > 0) if worse == "higher" else (d_high < 0):
        verdict = "drifts"
    elif (d_high < 0) if worse == "higher" else (d_low > 0):
        verdict = "improves"
    else:
        verdict = "holds"
    return Drift(
        name,
        worse,
        [float(p) for p in positions],
        [float(v) for v in curve],
        [float(v) for v in low],
        [float(v) for v in high],
        slope,
        ratio,
        (r_low, r_high),
        float(curve[-1] - curve[0]),
        (d_low, d_high),
        outside,
        verdict,
    )


def _interval(samples: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of the finite ``samples`` (NaNs where none is finite)."""
    finite = samples[np.isfinite(samples)]
    if not finite.size:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


class PooledFad:
    """FAD of window ``w`` pooled over a multiset of rollouts, from per-(rollout, window) sums.

    Each (rollout, window) keeps its frame count, frame sum ``(D,)`` and sum of outer products ``(D, D)``,
    so the Gaussian of any resample is a weighted sum, and the reference's covariance square root is taken
    once: ``tr √(Σ Σref) = tr √(√Σref Σ √Σref)``, one symmetric eigenvalue problem per figure. Equal to
    :func:`lmdm.eval.fad.frechet_distance` of the pooled frames (``tests/test_drift.py``).

    Args:
        frames: ``frames[r][w]``, the ``(N, D)`` embedding frames of rollout r's window w.
        reference: the reference's ``(M, D)`` frames.
    """

    def __init__(self, frames: list[list[torch.Tensor]], reference: torch.Tensor) -> None:
        R, W = len(frames), len(frames[0])
        D = reference.shape[1]
        self.count = torch.zeros(R, W, dtype=torch.float64)
        self.sum = torch.zeros(R, W, D, dtype=torch.float64)
        self.outer = torch.zeros(R, W, D, D, dtype=torch.float64)
        for r, row in enumerate(frames):
            if len(row) != W:
                raise ValueError(f"rollout {r} has {len(row)} windows, rollout 0 has {W}")
            for w, x in enumerate(row):
                x = x.double()
                self.count[r, w], self.sum[r, w], self.outer[r, w] = x.shape[0], x.sum(0), x.T @ x
        ref = reference.double()
        self.mu_ref, sigma_ref = ref.mean(0), torch.cov(ref.T).reshape(D, D)
        e, v = torch.linalg.eigh(sigma_ref)
        self.root_ref = (v * e.clamp(min=0).sqrt()) @ v.T
        self.trace_ref = float(sigma_ref.trace())

    def __call__(self, rollouts: np.ndarray, w: int) -> float:
        weights = torch.from_numpy(np.bincount(rollouts, minlength=self.count.shape[0])).double()  # (R,)
        n = float(weights @ self.count[:, w])
        if n < 2:
            return float("nan")
        mu = (weights @ self.sum[:, w]) / n
        sigma = (torch.einsum("r,rij->ij", weights, self.outer[:, w]) - n * torch.outer(mu, mu)) / (n - 1)
        inner = self.root_ref @ sigma @ self.root_ref
        eigenvalues = torch.linalg.eigvalsh((inner + inner.T) / 2)
        diff = mu - self.mu_ref
        return float(diff @ diff + sigma.trace() + self.trace_ref - 2 * eigenvalues.clamp(min=0).sqrt().sum())
