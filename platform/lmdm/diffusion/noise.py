"""Noise sources: one generator, or one generator per group of batch rows.

Sessions stepped as one batch (serving) each keep their own generator, so a session's noise — and so its
stream — is the same whether it is stepped alone or batched with others.

Legend: B batch rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Generator", "RowGenerators", "rand", "randn"]


@dataclass(frozen=True)
class RowGenerators:
    """``generators[i]`` draws the noise of the next ``rows[i]`` batch rows."""

    generators: tuple[torch.Generator | None, ...]
    rows: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.generators) != len(self.rows) or any(n < 1 for n in self.rows):
            raise ValueError(f"one generator per row group of at least one row, got {len(self.generators)} for rows {self.rows}")


Generator = torch.Generator | RowGenerators | None


def rand(shape: tuple[int, ...], generator: Generator, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform ``[0, 1)`` draws of ``shape`` ``(B, ...)`` from ``generator`` (row groups as for :func:`randn`).

    Raises:
        ValueError: row groups that do not add up to ``B``.
    """
    return _draw(torch.rand, shape, generator, device, dtype)


def randn(shape: tuple[int, ...], generator: Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Standard normal noise of ``shape`` ``(B, ...)`` from ``generator``.

    Raises:
        ValueError: row groups that do not add up to ``B``.
    """
    return _draw(torch.randn, shape, generator, device, dtype)


def _draw(kind: Any, shape: tuple[int, ...], generator: Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    if not isinstance(generator, RowGenerators):
        out: Tensor = kind(shape, generator=generator, device=device, dtype=dtype)
        return out
    if sum(generator.rows) != shape[0]:
        raise ValueError(f"row generators cover {sum(generator.rows)} rows, the noise has {shape[0]}")
    return torch.cat(
        [kind((n, *shape[1:]), generator=g, device=device, dtype=dtype) for g, n in zip(generator.generators, generator.rows, strict=True)]
    )
