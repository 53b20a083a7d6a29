"""Samplers: pure functions over a denoiser callable.

A denoiser maps a noisy batch and its times to the clean-data prediction,
``denoise(x_t: (B, ...), t: (B,)) -> x0_hat: (B, ...)``; :func:`x0_denoiser` builds one from a raw
network in an objective's parameterisation. A sampler walks a time grid ``ts`` (``(S + 1,)``,
decreasing, from :func:`lmdm.diffusion.schedule.timesteps`) from ``x_T`` at ``ts[0]`` and returns the
batch at ``ts[-1]`` (clean samples when ``ts[-1] == 0``).

Each sampler is also available as a single step (:func:`euler_step`, :func:`dpmpp_2m_step`,
:func:`pingpong_step`) taking everything it needs as arguments, so a streaming engine can interleave
steps with its own work; the ``sample_*`` loops are those steps in a row. The loops never read a
tensor back to the host (no ``.item()``, no data-dependent branches), and they do not disable
autograd: wrap them in ``torch.no_grad()`` for inference. Coefficients and the update arithmetic are
float64; results are cast back to the dtype of ``x``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from lmdm.diffusion.noise import Generator, randn
from lmdm.diffusion.objectives import Objective, broadcast_t

__all__ = [
    "SAMPLERS",
    "Denoiser",
    "Sampler",
    "cfg_combine",
    "dpmpp_2m_step",
    "euler_step",
    "pingpong_step",
    "sample",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_pingpong",
    "x0_denoiser",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoise(x_t: (B, ...), t: (B,)) -> x0_hat: (B, ...)``."""


class Sampler(Protocol):
    """The signature shared by every ``sample_*`` function (see :data:`SAMPLERS`)."""

    def __call__(self, denoise: Denoiser, x_T: Tensor, ts: Tensor, objective: Objective, *, generator: Generator = None) -> Tensor: ...


def x0_denoiser(model_fn: Callable[[Tensor, Tensor], Tensor], objective: Objective) -> Denoiser:
    """Wrap a raw network into a denoiser that returns the clean-data prediction.

    Args:
        model_fn: ``model_fn(x_t: (B, ...), t: (B,)) -> out: (B, ...)`` in ``objective``'s
            parameterisation (velocity ``eps − x0`` for rectified flow, ``v`` for the v objective).
        objective: how to read ``out``.

    Returns:
        ``denoise(x_t, t) = objective.x0_from_output(x_t, model_fn(x_t, t), t)``.
    """

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        return objective.x0_from_output(x_t, model_fn(x_t, t), t)

    return denoise


def cfg_combine(cond_out: Tensor, uncond_out: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance: ``uncond + scale·(cond − uncond)``.

    Computed with ``torch.lerp``, so ``scale = 1`` returns ``cond_out`` and ``scale = 0`` returns
    ``uncond_out`` exactly; ``scale > 1`` extrapolates away from the unconditional output. Works on
    any parameterisation that is affine in the data (x0, eps, velocity or v predictions).

    Args:
        cond_out: ``(B, ...)`` conditional network output.
        uncond_out: ``(B, ...)`` unconditional network output.
        scale: a float, or a tensor of ``cond_out``'s dtype broadcastable to it (e.g. ``(B, 1, 1)``).

    Returns:
        ``(B, ...)``.
    """
    return torch.lerp(uncond_out, cond_out, scale)


def euler_step(x: Tensor, x0_hat: Tensor, t: Tensor, t_next: Tensor, objective: Objective) -> Tensor:
    """One Euler step of the probability-flow ODE (DDIM with eta = 0) from ``t`` to ``t_next``.

    ``eps_hat = (x − alpha·x0_hat)/sigma`` and ``x_next = alpha_next·x0_hat + sigma_next·eps_hat``,
    i.e. ``x_next = (sigma_next/sigma)·x + (alpha_next − alpha·sigma_next/sigma)·x0_hat``. Under
    rectified flow this is ``x + (t_next − t)·u`` with velocity ``u = eps_hat − x0_hat``; at
    ``t_next = 0`` it returns ``x0_hat``.

    Args:
        x: ``(B, ...)`` the batch at ``t``.
        x0_hat: ``(B, ...)`` the denoiser's prediction at ``(x, t)``.
        t: ``(B,)`` or 0-d, ``> 0``.
        t_next: ``(B,)`` or 0-d, ``< t``.
        objective: the noising path.

    Returns:
        ``(B, ...)`` the batch at ``t_next``, typed like ``x``.
    """
    alpha, sigma = objective.alpha_sigma(broadcast_t(t, x))
    alpha_next, sigma_next = objective.alpha_sigma(broadcast_t(t_next, x))
    ratio = sigma_next / sigma
    out = ratio * x.to(torch.float64) + (alpha_next - alpha * ratio) * x0_hat.to(torch.float64)
    return out.to(x.dtype)


def dpmpp_2m_step(
    x: Tensor,
    x0_hat: Tensor,
    t: Tensor,
    t_next: Tensor,
    objective: Objective,
    x0_prev: Tensor | None = None,
    t_prev: Tensor | None = None,
) -> Tensor:
    """One DPM-Solver++(2M) step (multistep, data prediction, in ``lambda = log(alpha/sigma)``).

    With ``h = lambda_next − lambda`` the update is the first-order (DDIM) step applied to a
    corrected prediction ``D``::

        x_next = (sigma_next/sigma)·x − alpha_next·expm1(−h)·D
               = (sigma_next/sigma)·x + (alpha_next − alpha·sigma_next/sigma)·D

    where ``D = x0_hat + (h / (2·h_last))·(x0_hat − x0_prev)`` with ``h_last = lambda − lambda_prev``
    (k-diffusion's ``(1 + 1/(2r))·x0_hat − (1/(2r))·x0_prev``, ``r = h_last/h``). ``D = x0_hat``
    (first order) on the first step (``x0_prev`` not given) and on a step to ``t_next = 0``, where
    ``h = +inf``: that step returns ``x0_hat``.

    Args:
        x: ``(B, ...)`` the batch at ``t``.
        x0_hat: ``(B, ...)`` the denoiser's prediction at ``(x, t)``.
        t: ``(B,)`` or 0-d, ``> 0``.
        t_next: ``(B,)`` or 0-d, ``< t``.
        objective: the noising path.
        x0_prev: ``(B, ...)`` the prediction of the previous step, or ``None`` on the first step.
        t_prev: ``(B,)`` or 0-d, the time of the previous step; given exactly when ``x0_prev`` is.

    Returns:
        ``(B, ...)`` the batch at ``t_next``, typed like ``x``.

    Raises:
        ValueError: if only one of ``x0_prev`` and ``t_prev`` is given.
    """
    if (x0_prev is None) != (t_prev is None):
        raise ValueError("dpmpp_2m_step: pass x0_prev and t_prev together (both None on the first step)")
    if x0_prev is None or t_prev is None:
        return euler_step(x, x0_hat, t, t_next, objective)
    lam = 0.5 * objective.logsnr(broadcast_t(t, x))
    h = 0.5 * objective.logsnr(broadcast_t(t_next, x)) - lam
    h_last = lam - 0.5 * objective.logsnr(broadcast_t(t_prev, x))
    w = h / (2.0 * h_last)
    w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))  # t_next = 0 (h = inf): first order
    x0_64 = x0_hat.to(torch.float64)
    d = x0_64 + w * (x0_64 - x0_prev.to(torch.float64))
    return euler_step(x, d, t, t_next, objective)


def pingpong_step(x0_hat: Tensor, t_next: Tensor, objective: Objective, noise: Tensor) -> Tensor:
    """One ping-pong step: re-noise the clean prediction to ``t_next`` with fresh noise.

    ``x_next = alpha_next·x0_hat + sigma_next·noise``; at ``t_next = 0`` this is exactly ``x0_hat``.

    Args:
        x0_hat: ``(B, ...)`` the denoiser's prediction at the current step.
        t_next: ``(B,)`` or 0-d.
        objective: the noising path.
        noise: ``(B, ...)`` fresh standard normal noise, independent of everything before.

    Returns:
        ``(B, ...)`` the batch at ``t_next``, typed like ``x0_hat``.
    """
    return objective.noise(x0_hat, noise, t_next)


def sample_euler(denoise: Denoiser, x_T: Tensor, ts: Tensor, objective: Objective, *, generator: Generator = None) -> Tensor:
    """Integrate the probability-flow ODE with Euler steps (:func:`euler_step`) along ``ts``.

    Args:
        denoise: ``(x_t: (B, ...), t: (B,)) -> x0_hat: (B, ...)``.
        x_T: ``(B, ...)`` the start batch at ``ts[0]`` (noise drawn at that level).
        ts: ``(S + 1,)`` decreasing times on ``x_T``'s device.
        objective: the noising path.
        generator: unused (the ODE draws no noise); accepted so every sampler shares one signature.

    Returns:
        ``(B, ...)`` the batch at ``ts[-1]``.

    Raises:
        ValueError: if ``ts`` is not 1-D with at least 2 entries on ``x_T``'s device.
    """
    _check_ts(ts, x_T)
    B = x_T.shape[0]
    x = x_T
    for i in range(ts.shape[0] - 1):
        t, t_next = ts[i].expand(B), ts[i + 1].expand(B)
        x = euler_step(x, denoise(x, t), t, t_next, objective)
    return x


def sample_dpmpp_2m(denoise: Denoiser, x_T: Tensor, ts: Tensor, objective: Objective, *, generator: Generator = None) -> Tensor:
    """DPM-Solver++(2M) along ``ts`` (:func:`dpmpp_2m_step`): second order after the first step.

    Args:
        denoise: ``(x_t: (B, ...), t: (B,)) -> x0_hat: (B, ...)``.
        x_T: ``(B, ...)`` the start batch at ``ts[0]``.
        ts: ``(S + 1,)`` decreasing times on ``x_T``'s device.
        objective: the noising path.
        generator: unused (the ODE draws no noise); accepted so every sampler shares one signature.

    Returns:
        ``(B, ...)`` the batch at ``ts[-1]``.

    Raises:
        ValueError: if ``ts`` is not 1-D with at least 2 entries on ``x_T``'s device.
    """
    _check_ts(ts, x_T)
    B = x_T.shape[0]
    x = x_T
    x0_prev: Tensor | None = None
    t_prev: Tensor | None = None
    for i in range(ts.shape[0] - 1):
        t, t_next = ts[i].expand(B), ts[i + 1].expand(B)
        x0_hat = denoise(x, t)
        x = dpmpp_2m_step(x, x0_hat, t, t_next, objective, x0_prev, t_prev)
        x0_prev, t_prev = x0_hat, t
    return x


def sample_pingpong(denoise: Denoiser, x_T: Tensor, ts: Tensor, objective: Objective, *, generator: Generator = None) -> Tensor:
    """Ping-pong sampling (Stable Audio Open Small's few-step sampler, :func:`pingpong_step`).

    Each step denoises, ``x0_hat = denoise(x, t)``, then re-noises to the next time with fresh noise,
    ``x = alpha(t_next)·x0_hat + sigma(t_next)·z``; with ``ts[-1] == 0`` the result is the last
    ``x0_hat``. One step (``ts = [t, 0]``) returns ``denoise(x_T, t)``.

    Args:
        denoise: ``(x_t: (B, ...), t: (B,)) -> x0_hat: (B, ...)``.
        x_T: ``(B, ...)`` the start batch at ``ts[0]``.
        ts: ``(S + 1,)`` decreasing times on ``x_T``'s device.
        objective: the noising path.
        generator: the source of the fresh noise (``None``: torch's default generator).

    Returns:
        ``(B, ...)`` the batch at ``ts[-1]``.

    Raises:
        ValueError: if ``ts`` is not 1-D with at least 2 entries on ``x_T``'s device.
    """
    _check_ts(ts, x_T)
    B = x_T.shape[0]
    x = x_T
    for i in range(ts.shape[0] - 1):
        x0_hat = denoise(x, ts[i].expand(B))
        z = randn(tuple(x.shape), generator, x.device, x.dtype)
        x = pingpong_step(x0_hat, ts[i + 1].expand(B), objective, z)
    return x


SAMPLERS: dict[str, Sampler] = {"euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m, "pingpong": sample_pingpong}


def sample(name: str, denoise: Denoiser, x_T: Tensor, ts: Tensor, objective: Objective, *, generator: Generator = None) -> Tensor:
    """Run the sampler called ``name`` (a key of :data:`SAMPLERS`).

    Args:
        name: ``"euler"``, ``"dpmpp_2m"`` or ``"pingpong"``.
        denoise: ``(x_t: (B, ...), t: (B,)) -> x0_hat: (B, ...)``.
        x_T: ``(B, ...)`` the start batch at ``ts[0]``.
        ts: ``(S + 1,)`` decreasing times on ``x_T``'s device.
        objective: the noising path.
        generator: noise source for stochastic samplers (ping-pong).

    Returns:
        ``(B, ...)`` the batch at ``ts[-1]``.

    Raises:
        ValueError: for an unknown sampler name or a malformed ``ts``.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](denoise, x_T, ts, objective, generator=generator)


def _check_ts(ts: Tensor, x_T: Tensor) -> None:
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"ts must be 1-D with at least 2 entries (S + 1 for S steps), got shape {tuple(ts.shape)}")
    if ts.device != x_T.device:
        raise ValueError(f"ts is on {ts.device} but x_T is on {x_T.device}; build it with timesteps(..., device=x_T.device)")
