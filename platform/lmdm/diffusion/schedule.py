"""Sampling time grids: ``steps + 1`` decreasing times ending exactly at ``t = 0``.

- ``"linear"``: uniform in ``t`` from ``t_max`` down to ``t_min`` (``t_min = 0``: plain
  ``linspace(t_max, 0, steps + 1)``).
- ``"logsnr"``: uniform in ``logsnr = 2·log(alpha/sigma)`` from ``max(logsnr(t_max), logsnr_min)``
  up to ``min(logsnr_max, logsnr(t_min))``, mapped back to ``t`` with the objective's inverse.

The last step of either grid denoises to ``t = 0`` (sigma = 0, logsnr = +inf).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from lmdm.diffusion.objectives import Objective

__all__ = ["ScheduleName", "timesteps"]

ScheduleName = Literal["linear", "logsnr"]


def timesteps(
    steps: int,
    objective: Objective,
    schedule: str = "logsnr",
    t_max: float = 1.0,
    t_min: float = 0.0,
    logsnr_min: float = -10.0,
    logsnr_max: float = 10.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The sampling grid ``ts`` for ``steps`` denoising steps.

    Step ``i`` goes from ``ts[i]`` to ``ts[i + 1]``; ``ts[-1]`` is exactly ``0.0``. With
    ``"logsnr"`` the first entry is ``t_max`` only when ``logsnr(t_max) >= logsnr_min``: for
    ``t_max = 1`` (logsnr ``−inf`` under rectified flow) it is ``t(logsnr_min)``, about ``0.9933`` for
    ``logsnr_min = −10``, and the start noise should be drawn at that level.

    Args:
        steps: number of denoising steps, ``>= 1``.
        objective: the noising path whose logsnr the ``"logsnr"`` grid is uniform in.
        schedule: ``"linear"`` or ``"logsnr"``.
        t_max: the noisiest time, ``0 < t_max <= 1``.
        t_min: the least noisy nonzero time, ``0 <= t_min < t_max``; ``0`` means no bound (linear
            grid reaches 0 in equal steps; the logsnr grid stops at ``logsnr_max``).
        logsnr_min: lower clamp of the logsnr grid's start (``"logsnr"`` only).
        logsnr_max: the logsnr of the last nonzero time (``"logsnr"`` only), ``> logsnr_min``.
        device: where the grid lives (the samplers want it next to the latents).
        dtype: the grid's dtype; it is computed in float64.

    Returns:
        ``(steps + 1,)``, strictly decreasing, ``ts[-1] == 0``.

    Raises:
        ValueError: for a bad ``steps``, ``schedule``, time range or logsnr range.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if schedule not in get_args(ScheduleName):
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {list(get_args(ScheduleName))}")
    if not 0.0 < t_max <= 1.0:
        raise ValueError(f"t_max must be in (0, 1], got {t_max}")
    if not 0.0 <= t_min < t_max:
        raise ValueError(f"t_min must be in [0, t_max) = [0, {t_max}), got {t_min}")

    f64 = torch.float64
    if schedule == "linear":
        if t_min == 0.0:
            ts = torch.linspace(t_max, 0.0, steps + 1, dtype=f64)
        else:
            ts = torch.cat([torch.linspace(t_max, t_min, steps, dtype=f64), torch.zeros(1, dtype=f64)])
    else:
        if not logsnr_min < logsnr_max:
            raise ValueError(f"logsnr_min must be < logsnr_max, got {logsnr_min} and {logsnr_max}")
        lam_lo = max(float(objective.logsnr(torch.tensor(t_max, dtype=f64))), logsnr_min)
        lam_hi = min(float(objective.logsnr(torch.tensor(t_min, dtype=f64))), logsnr_max)
        if not lam_lo < lam_hi:
            raise ValueError(
                f"empty logsnr range for {objective.name}: start max(logsnr(t_max={t_max}), logsnr_min={logsnr_min}) = {lam_lo:.4g} "
                f"must be below end min(logsnr(t_min={t_min}), logsnr_max={logsnr_max}) = {lam_hi:.4g}; raise t_max or logsnr_max"
            )
        lam = torch.linspace(lam_lo, lam_hi, steps, dtype=f64)
        ts = torch.cat([objective.t_from_logsnr(lam), torch.zeros(1, dtype=f64)])
    return ts.to(device=device, dtype=dtype)
