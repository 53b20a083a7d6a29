"""Diffusion maths: objectives (noising path and network parameterisation), time grids and samplers.

``t ∈ [0, 1]`` with ``t = 0`` clean and ``t = 1`` noise; ``x_t = alpha(t)·x0 + sigma(t)·eps``.
Samplers are pure functions over a denoiser ``denoise(x_t, t) -> x0_hat``; see
:mod:`lmdm.diffusion.samplers`.
"""

from lmdm.diffusion.objectives import OBJECTIVES, Objective, ObjectiveName, RectifiedFlow, VObjective, broadcast_t, get_objective
from lmdm.diffusion.samplers import (
    SAMPLERS,
    Denoiser,
    Sampler,
    cfg_combine,
    dpmpp_2m_step,
    euler_step,
    pingpong_step,
    sample,
    sample_dpmpp_2m,
    sample_euler,
    sample_pingpong,
    x0_denoiser,
)
from lmdm.diffusion.schedule import ScheduleName, timesteps

__all__ = [
    "OBJECTIVES",
    "SAMPLERS",
    "Denoiser",
    "Objective",
    "ObjectiveName",
    "RectifiedFlow",
    "Sampler",
    "ScheduleName",
    "VObjective",
    "broadcast_t",
    "cfg_combine",
    "dpmpp_2m_step",
    "euler_step",
    "get_objective",
    "pingpong_step",
    "sample",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_pingpong",
    "timesteps",
    "x0_denoiser",
]
