"""Conditioners outside the DiT: Stable Audio's number (timing) conditioners, key-compatible with
stable-audio-tools (``conditioner.conditioners.<id>.*`` once the prefix is stripped)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["NumberConditioner", "NumberConditioners"]


class NumberConditioner(nn.Module):
    """Stable Audio's timing conditioner: ``Linear(cat(x, sin 2πxw, cos 2πxw))`` of the clamped,
    normalised number ``x = (clamp(v, min, max) − min) / (max − min)``; keys ``embedder.embedding.{0.weights, 1.*}``."""

    def __init__(self, output_dim: int, min_val: float = 0.0, max_val: float = 1.0, dim: int = 256) -> None:
        super().__init__()
        self.min_val, self.max_val = min_val, max_val
        self.embedder = nn.Module()
        self.embedder.embedding = nn.Sequential(_LearnedFourier(dim), nn.Linear(dim + 1, output_dim))

    def forward(self, values: Tensor) -> Tensor:
        """``(B,)`` numbers → ``(B, 1, output_dim)`` embeddings."""
        x = (values.clamp(self.min_val, self.max_val) - self.min_val) / (self.max_val - self.min_val)
        embedding: nn.Sequential = self.embedder.embedding  # type: ignore[assignment]
        linear: nn.Linear = embedding[1]  # type: ignore[assignment]
        out: Tensor = embedding(x.to(linear.weight.dtype))
        return out[:, None]


class _LearnedFourier(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.randn(dim // 2))

    def forward(self, x: Tensor) -> Tensor:
        freqs = x[:, None] * self.weights[None] * 2 * math.pi
        return torch.cat([x[:, None], freqs.sin(), freqs.cos()], dim=-1)


class NumberConditioners(nn.ModuleDict):
    """The timing conditioners of a checkpoint, by id (``seconds_start``, ``seconds_total``)."""

    def __init__(self, numbers: dict[str, tuple[int, float, float]]) -> None:
        super().__init__({cid: NumberConditioner(dim, lo, hi) for cid, (dim, lo, hi) in numbers.items()})
        self.numbers = dict(numbers)
