"""Drift summaries: a fake engine whose output degrades along the stream is flagged, a stationary one is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdm.eval.drift import PooledFad, drift, mean_metric
from lmdm.eval.fad import frechet_distance

R, W, D = 6, 8, 8


def _fake_engine_frames(seed: int, degrade: float) -> list[list[torch.Tensor]]:
    """A fake engine's per-window embedding frames: rollout r draws its own offset (rollouts differ), and window w's
    frames move ``degrade * w`` away from the reference along every axis."""
    g = torch.Generator().manual_seed(seed)
    rollouts = []
    for _ in range(R):
        offset = 0.15 * torch.randn(D, generator=g)
        rollouts.append([torch.randn(60, D, generator=g) + offset + degrade * w for w in range(W)])
    return rollouts


def _reference(seed: int = 99) -> torch.Tensor:
    return torch.randn(400, D, generator=torch.Generator().manual_seed(seed))


def test_pooled_fad_equals_the_fad_of_the_pooled_frames() -> None:
    frames, reference = _fake_engine_frames(0, 0.1), _reference()
    fad = PooledFad(frames, reference)
    picks = np.array([0, 0, 3, 5])  # a bootstrap resample: rollout 0 twice
    pooled = torch.cat([frames[r][2] for r in picks])
    assert fad(picks, 2) == pytest.approx(frechet_distance(pooled, reference), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_degrading_engine_is_flagged_and_a_stationary_one_is_not(seed: int) -> None:
    reference = _reference()
    for degrade, expected in ((0.0, "holds"), (0.12, "drifts")):
        fad = drift("fad", PooledFad(_fake_engine_frames(seed, degrade), reference), R, W, 10.0, "higher", 200, seed)
        assert fad.verdict == expected, (degrade, fad)
        assert (fad.last_over_first_ci[0] > 1) == (expected == "drifts")
        if expected == "drifts":
            assert fad.slope_per_minute > 0 and fad.first_window_outside is not None


def test_the_interval_does_its_job_over_many_seeds() -> None:
    """A per-rollout metric where lower is worse (a CLAP score): a stationary one is called "drifts" or "improves"
    about as often as a 95% interval allows; one that falls by a rollout-noise's worth along the stream is caught."""
    false_calls = caught = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        steady = 0.5 + 0.05 * rng.standard_normal((R, W))
        false_calls += drift("clap", mean_metric(steady), R, W, 10.0, "lower", 300, seed).verdict != "holds"
        falling = drift("clap", mean_metric(steady - 0.015 * np.arange(W)), R, W, 10.0, "lower", 300, seed)
        caught += falling.verdict == "drifts" and falling.slope_per_minute < 0
    assert false_calls <= 6, false_calls  # 40 draws at 5% two-sided (the percentile bootstrap of 6 rollouts runs a little narrow)
    assert caught >= 36, caught


def test_an_improving_metric_is_not_called_drift() -> None:
    values = 1.0 + 0.02 * np.random.default_rng(0).standard_normal((R, W)) - 0.05 * np.arange(W)
    summary = drift("likeness", mean_metric(values), R, W, 5.0, "higher", 200)
    assert summary.verdict == "improves"
    assert summary.positions_s[:2] == [2.5, 7.5] and len(summary.band_low) == W
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        drift("x", mean_metric(values[:1]), 1, W, 5.0)


def test_a_flat_fad_does_not_leave_its_own_band_and_a_missing_window_is_not_a_flat_slope() -> None:
    """The pooled FAD of a resample (repeated rollouts) sits above the FAD of every rollout; each window's value is
    compared with window 0's band on the same footing (its bootstrap median). Over these 10 flat fake engines the
    plain curve leaves window 0's band in 8 (7 windows, each a chance to), the medians in 4; a degrading one always."""
    reference = _reference()
    flat = [drift("fad", PooledFad(_fake_engine_frames(s, 0.0), reference), R, W, 10.0, "higher", 100, s) for s in range(10)]
    assert sum(d.first_window_outside is not None for d in flat) <= 4
    worse = drift("fad", PooledFad(_fake_engine_frames(0, 0.12), reference), R, W, 10.0, "higher", 100)
    assert worse.first_window_outside is not None and worse.first_window_outside <= 3
    values = np.full((R, W), np.nan)
    values[:, 0] = 0.3
    assert np.isnan(drift("clap", mean_metric(values), R, W, 10.0, "lower", 100).slope_per_minute)
