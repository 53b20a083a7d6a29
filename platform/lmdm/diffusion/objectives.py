"""Diffusion objectives: the noising path and what the network predicts.

Convention: ``t ∈ [0, 1]``, ``t = 0`` is clean data and ``t = 1`` pure noise;
``x_t = alpha(t)·x0 + sigma(t)·eps`` with ``eps ~ N(0, I)``.

- ``rectified_flow``: ``alpha = 1 − t``, ``sigma = t``; the network predicts the velocity
  ``eps − x0`` (stable-audio-tools' ``rectified_flow`` / ``rf_denoiser``; Stable Audio Open Small).
- ``v``: ``alpha = cos(πt/2)``, ``sigma = sin(πt/2)``; the network predicts
  ``v = alpha·eps − sigma·x0`` (stable-audio-tools' ``v``; Stable Audio Open 1.0).

Shapes: ``x0``, ``eps``, ``x_t`` and network outputs are ``(B, ...)``, typically ``(B, C, T)``
latents; ``t`` is ``(B,)``, broadcast over the trailing dims, or a 0-d tensor shared by the batch.
Every conversion is computed in float64 and cast back to the dtype of its first tensor argument, so
bf16/fp32 callers lose no precision to the arithmetic itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, get_args

import torch
from torch import Tensor

__all__ = ["OBJECTIVES", "Objective", "ObjectiveName", "RectifiedFlow", "VObjective", "broadcast_t", "get_objective"]

ObjectiveName = Literal["rectified_flow", "v"]


class Objective(Protocol):
    """A noising path ``x_t = alpha(t)·x0 + sigma(t)·eps`` and the network's output parameterisation."""

    name: ClassVar[str]

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha(t), sigma(t))``, each shaped and typed like ``t``."""
        ...

    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``x_t = alpha·x0 + sigma·eps``, ``(B, ...)``."""
        ...

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The training target for the network output at ``x_t``, ``(B, ...)``."""
        ...

    def x0_from_output(self, x_t: Tensor, out: Tensor, t: Tensor) -> Tensor:
        """The clean-data prediction implied by a network output, ``(B, ...)``."""
        ...

    def eps_from_output(self, x_t: Tensor, out: Tensor, t: Tensor) -> Tensor:
        """The noise prediction implied by a network output, ``(B, ...)``."""
        ...

    def logsnr(self, t: Tensor) -> Tensor:
        """``2·log(alpha/sigma)``, shaped and typed like ``t``."""
        ...

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """The inverse of :meth:`logsnr`, shaped and typed like ``logsnr``."""
        ...


def broadcast_t(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in float64, shaped to broadcast over ``x``.

    Args:
        t: ``(B,)`` or 0-d.
        x: ``(B, ...)``.

    Returns:
        ``(B, 1, ..., 1)`` with ``x.ndim`` dims, or 0-d.

    Raises:
        ValueError: if ``t`` is neither 0-d nor ``(B,)`` with ``B = x.shape[0]``.
    """
    t64 = t.to(torch.float64)
    if t.ndim == 0:
        return t64
    if t.ndim != 1 or x.ndim == 0 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be 0-d or (B,) with B = x.shape[0]; got t {tuple(t.shape)} for x {tuple(x.shape)}")
    return t64.reshape(-1, *([1] * (x.ndim - 1)))


def _f64(x: Tensor) -> Tensor:
    return x.to(torch.float64)


@dataclass(frozen=True)
class RectifiedFlow:
    """Rectified flow: ``alpha = 1 − t``, ``sigma = t``; the network predicts ``u = eps − x0``."""

    name: ClassVar[str] = "rectified_flow"

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha = 1 − t``, ``sigma = t``.

        Args:
            t: any shape.

        Returns:
            ``(alpha, sigma)``, each shaped and typed like ``t``.
        """
        t64 = _f64(t)
        return (1.0 - t64).to(t.dtype), t64.to(t.dtype)

    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``x_t = (1 − t)·x0 + t·eps``.

        Args:
            x0: ``(B, ...)`` clean data.
            eps: ``(B, ...)`` standard normal noise.
            t: ``(B,)`` or 0-d.

        Returns:
            ``(B, ...)``, typed like ``x0``.
        """
        tb = broadcast_t(t, x0)
        return ((1.0 - tb) * _f64(x0) + tb * _f64(eps)).to(x0.dtype)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The velocity ``u = eps − x0`` (independent of ``t``; ``t`` is only shape-checked).

        Args:
            x0: ``(B, ...)``.
            eps: ``(B, ...)``.
            t: ``(B,)`` or 0-d.

        Returns:
            ``(B, ...)``, typed like ``x0``.
        """
        broadcast_t(t, x0)
        return (_f64(eps) - _f64(x0)).to(x0.dtype)

    def x0_from_output(self, x_t: Tensor, out: Tensor, t: Tensor) -> Tensor:
        """``x0 = x_t − t·u``.

        Args:
            x_t: ``(B, ...)`` noisy input.
            out: ``(B, ...)`` velocity prediction ``u``.
            t: ``(B,)`` or 0-d.

        Returns:
            ``(B, ...)``, typed like ``x_t``.
        """
        tb = broadcast_t(t, x_t)
        return (_f64(x_t) - tb * _f64(out)).to(x_t.dtype)

    def eps_from_output(self, x_t: Tensor, out: Tensor, t: Tensor) -> Tensor:
        """``eps = x_t + (1 − t)·u``.

        Args:
            x_t: ``(B, ...)`` noisy input.
            out: ``(B, ...)`` velocity prediction ``u``.
            t: ``(B,)`` or 0-d.

        Returns:
            ``(B, ...)``, typed like ``x_t``.
        """
        tb = broadcast_t(t, x_t)
        return (_f64(x_t) + (1.0 - tb) * _f64(out)).to(x_t.dtype)

    def logsnr(self, t: Tensor) -> Tensor:
        """``logsnr = 2·log((1 − t)/t) = 2·(log1p(−t) − log t)``; ``+inf`` at ``t = 0``, ``−inf`` at ``t = 1``.

        Args:
            t: any shape.

        Returns:
            Shaped and typed like ``t``.
        """
        t64 = _f64(t)
        return (2.0 * (torch.log1p(-t64) - torch.log(t64))).to(t.dtype)

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """``t = sigmoid(−logsnr/2) = 1/(1 + exp(logsnr/2))``.

        Args:
            logsnr: any shape.

        Returns:
            Shaped and typed like ``logsnr``.
        """
        return torch.sigmoid(-0.5 * _f64(logsnr)).to(logsnr.dtype)


@dataclass(frozen=True)
class VObjective:
    """Cosine path with v-prediction: ``alpha = cos(πt/2)``, ``sigma = sin(πt/2)``, ``v = alpha·eps − sigma·x0``."""

    name: ClassVar[str] = "v"

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha = cos(πt/2)``, ``sigma = sin(πt/2)``.

        Args:
            t: any shape.

        Returns:
            ``(alpha, sigma)``, each shaped and typed like ``t``.
        """
        angle = _f64(t) * (math.pi / 2)
        return torch.cos(angle).to(t.dtype), torch.sin(angle).to(t.dtype)

    def _ab(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        angle = broadcast_t(t, x) * (math.pi / 2)
        return torch.cos(angle), torch.sin(angle)

    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``x_t = cos(πt/2)·x0 + sin(πt/2)·eps``.

        Args:
            x0: ``(B, ...)`` clean data.
            eps: ``(B, ...)`` standard normal noise.
            t: ``(B,)`` or 0-d.

        Returns:
            ``(B, ...)``, typed like ``x0``.
        """
        alpha, sigma = self._ab(t, x0)
        return (alpha * _f64(x0) + sigma * _f64(eps)).to(x0.dtype)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``v = alpha·eps − sigma·x0``.

        Args:
            x0: ``(B, ...)``.
            eps: ``(B, ...)``.
            t: ``(B,)`` or 0-d.

        Returns:
            ``(B, ...)``, typed like ``x0``.
        """
        alpha, sigma = self._ab(t, x0)
        return (alpha * _f64(eps) - sigma * _f64(x0)).to(x0.dtype)

    def x0_from_output(self, x_t: Tensor, out: Tensor, t: Tensor) -> Tensor:
        """``x0 = alpha·x_t − sigma·v`` (uses ``alpha² + sigma² = 1``).

        Args:
            x_t: ``(B, ...)`` noisy input.
            out: ``(B, ...)`` v prediction.
            t: ``(B,)`` or 0-d.

        Returns:
            ``(B, ...)``, typed like ``x_t``.
        """
        alpha, sigma = self._ab(t, x_t)
        return (alpha * _f64(x_t) - sigma * _f64(out)).to(x_t.dtype)

    def eps_from_output(self, x_t: Tensor, out: Tensor, t: Tensor) -> Tensor:
        """``eps = sigma·x_t + alpha·v``.

        Args:
            x_t: ``(B, ...)`` noisy input.
            out: ``(B, ...)`` v prediction.
            t: ``(B,)`` or 0-d.

        Returns:
            ``(B, ...)``, typed like ``x_t``.
        """
        alpha, sigma = self._ab(t, x_t)
        return (sigma * _f64(x_t) + alpha * _f64(out)).to(x_t.dtype)

    def logsnr(self, t: Tensor) -> Tensor:
        """``logsnr = 2·log(cos(πt/2)/sin(πt/2)) = −2·log tan(πt/2)``; ``+inf`` at ``t = 0``, about ``−75`` at ``t = 1``
        (``cos(π/2)`` is ``6e-17`` in float64).

        Args:
            t: any shape.

        Returns:
            Shaped and typed like ``t``.
        """
        return (-2.0 * torch.log(torch.tan(_f64(t) * (math.pi / 2)))).to(t.dtype)

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """``t = (2/π)·atan(exp(−logsnr/2))``.

        Args:
            logsnr: any shape.

        Returns:
            Shaped and typed like ``logsnr``.
        """
        return (torch.atan(torch.exp(-0.5 * _f64(logsnr))) * (2 / math.pi)).to(logsnr.dtype)


OBJECTIVES: dict[str, Objective] = {"rectified_flow": RectifiedFlow(), "v": VObjective()}


def get_objective(name: str) -> Objective:
    """The objective called ``name``.

    Args:
        name: ``"rectified_flow"`` or ``"v"``.

    Returns:
        The objective.

    Raises:
        ValueError: for any other name.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {list(get_args(ObjectiveName))}")
    return OBJECTIVES[name]
