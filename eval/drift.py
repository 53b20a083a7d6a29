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
  bootstrap interval). A window's value here is its bootstrap median, taken from the same resamples as the
  band: a pooled FAD of resampled rollouts (repeats, so a less varied pool) sits above the FAD of every
  rollout, and the plain curve would leave its own band at once. With many windows some leave a 95% band
  by chance, so this is information;
- ``last_minus_first``: the same as a difference, with its 95% bootstrap interval;
- ``verdict``: ``drifts`` where the difference's interval lies wholly on the worse side of 0 (above for
  distances, below for the CLAP score), ``improves`` where it lies wholly on the better side, else ``holds``.
  For a positive metric this is the ratio's interval against 1 (the same resamples fall on each side); a
  cosine like the CLAP score can be near or below 0, where a ratio means nothing.

Legend: R rollouts, W windows, B bootstrap resamples, D embedding width.
"""

from __future__ import annotations

import warnings
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
    slope_per_minute: float  # NaN with fewer than 2 windows that have a value
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(np.nanmean(self.values[rollouts, w]))

    def table(self, draws: np.ndarray) -> np.ndarray:
        """Every resample ``(B, R)`` at every window at once: ``(B, W)``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
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
        ValueError: fewer than 2 rollouts (nothing to resample) or no window.
    """
    if rollouts < 2 or windows < 1:
        raise ValueError(f"drift's bootstrap resamples rollouts: it needs at least 2 rollouts and 1 window, got {rollouts} and {windows}")
    every = np.arange(rollouts)
    curve = np.array([metric(every, w) for w in range(windows)])
    draws = np.random.default_rng(seed).integers(0, rollouts, size=(resamples, rollouts))  # (B, R)
    boot = _resampled(metric, draws, windows)  # (B, W)
    with warnings.catch_warnings():  # a window without any value (no prompt for a CLAP score) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(boot, [2.5, 97.5], axis=0)
        centre = np.nanmedian(boot, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = boot[:, -1] / boot[:, 0]  # (B,)
        ratio = float(curve[-1] / curve[0]) if curve[0] != 0 else float("nan")
    r_low, r_high = _interval(ratios)
    d_low, d_high = _interval(boot[:, -1] - boot[:, 0])
    outside = next((w for w in range(1, windows) if not low[0] <= centre[w] <= high[0]), None)
    positions = (np.arange(windows) + 0.5) * window_seconds
    finite = np.isfinite(curve)  # a window without a value (no prompt for a CLAP score) is left out of the fit
    slope = float(np.polyfit(positions[finite] / 60.0, curve[finite], 1)[0]) if finite.sum() >= 2 else float("nan")
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


def _resampled(metric: Metric, draws: np.ndarray, windows: int) -> np.ndarray:
    """The metric of every resample ``(B, R)`` at every window: ``(B, W)``; window by window, so a pooled metric
    keeps one window's sums at a time."""
    if isinstance(metric, mean_metric):
        return metric.table(draws)
    return np.array([[metric(d, w) for d in draws] for w in range(windows)]).T


def _interval(samples: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of the finite ``samples`` (NaNs where none is finite)."""
    finite = samples[np.isfinite(samples)]
    if not finite.size:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


class PooledFad:
    """FAD of window ``w`` pooled over a multiset of rollouts, from per-(rollout, window) sums.

    Each (rollout, window) contributes its frame count, frame sum ``(D,)`` and sum of outer products ``(D, D)``,
    so the Gaussian of any resample is a weighted sum, and the reference's covariance square root is taken
    once: ``tr √(Σ Σref) = tr √(√Σref Σ √Σref)``, one symmetric eigenvalue problem per figure. Equal to
    :func:`lmdm.eval.fad.frechet_distance` of the pooled frames (``tests/test_drift.py``). The sums are kept
    for one window at a time (``R·D²`` floats): call it window by window, as :func:`drift` does.

    Args:
        frames: ``frames[r][w]``, the ``(N, D)`` embedding frames of rollout r's window w.
        reference: the reference's ``(M, D)`` frames.
    """

    def __init__(self, frames: list[list[torch.Tensor]], reference: torch.Tensor) -> None:
        W = len(frames[0])
        for r, row in enumerate(frames):
            if len(row) != W:
                raise ValueError(f"rollout {r} has {len(row)} windows, rollout 0 has {W}")
        self.frames = frames
        ref = reference.double()
        D = ref.shape[1]
        self.mu_ref, sigma_ref = ref.mean(0), torch.cov(ref.T).reshape(D, D)
        e, v = torch.linalg.eigh(sigma_ref)
        self.root_ref = (v * e.clamp(min=0).sqrt()) @ v.T
        self.trace_ref = float(sigma_ref.trace())
        self._window: int | None = None

    def _sums(self, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Window ``w``'s counts ``(R,)``, sums ``(R, D)`` and outer-product sums ``(R, D, D)`` (cached for one window)."""
        if self._window != w:
            xs = [row[w].double() for row in self.frames]
            self._count = torch.tensor([float(x.shape[0]) for x in xs], dtype=torch.float64)
            self._sum = torch.stack([x.sum(0) for x in xs])
            self._outer = torch.stack([x.T @ x for x in xs])
            self._window = w
        return self._count, self._sum, self._outer

    def __call__(self, rollouts: np.ndarray, w: int) -> float:
        count, total, outer = self._sums(w)
        weights = torch.from_numpy(np.bincount(rollouts, minlength=count.shape[0])).double()  # (R,)
        n = float(weights @ count)
        if n < 2:
            return float("nan")
        mu = (weights @ total) / n
        sigma = (torch.einsum("r,rij->ij", weights, outer) - n * torch.outer(mu, mu)) / (n - 1)
        inner = self.root_ref @ sigma @ self.root_ref
        eigenvalues = torch.linalg.eigvalsh((inner + inner.T) / 2)
        diff = mu - self.mu_ref
        return float(diff @ diff + sigma.trace() + self.trace_ref - 2 * eigenvalues.clamp(min=0).sqrt().sum())
