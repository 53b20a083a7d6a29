"""Partial rotary position embeddings, as in Stable Audio Open's ContinuousTransformer.

Only the first ``r = max(head_dim // 2, 32)`` dims of each head rotate; frequencies are
``inv_freq = 1 / 10000^(arange(0, r, 2) / r)`` duplicated (``cat(θ, θ)``) and applied rotate-half
style, in float32. Attention scores depend only on position differences, which is what lets a
streaming engine use either fixed window positions or growing stream positions.

Legend: B batch, H heads, S sequence, Dh head dim, R rotary dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding", "apply_rotary", "rotary_dim"]


def rotary_dim(head_dim: int) -> int:
    """Rotated dims per head: ``max(head_dim // 2, 32)`` (must not exceed ``head_dim``).

    Raises:
        ValueError: ``head_dim`` < 32 leaves no room for the 32 rotated dims.
    """
    r = max(head_dim // 2, 32)
    if r > head_dim:
        raise ValueError(f"head_dim must be >= 32 for partial rotary (rotary dim {r}), got {head_dim}")
    return r


class RotaryEmbedding(nn.Module):
    """Holds ``inv_freq`` (a persistent buffer, so it is in Stable Audio state dicts)."""

    inv_freq: Tensor

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        r = rotary_dim(head_dim)
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, r, 2).float() / r)))

    def forward(self, positions: Tensor) -> Tensor:
        """The rotary table of positions: cosines and sines of ``θ = position · inv_freq``.

        Computed once per sequence (or once per streamed block) and reused by every layer and step.

        Args:
            positions: ``(S,)`` or ``(B, S)`` positions (float or int).

        Returns:
            ``(2, S, R/2)`` or ``(2, B, S, R/2)`` float32: ``[cos θ, sin θ]`` (``cat(θ, θ)`` in Stable Audio's
            terms: both halves of the rotated dims use the same angles).
        """
        theta = positions.to(torch.float32)[..., None] * self.inv_freq
        return torch.stack([theta.cos(), theta.sin()])


def apply_rotary(x: Tensor, table: Tensor) -> Tensor:
    """Rotate the first ``R`` dims of each head of ``x`` (rotate-half convention, partial rotary).

    For the halves ``x₁, x₂`` of the rotated dims: ``(x₁ cos θ − x₂ sin θ, x₂ cos θ + x₁ sin θ)``, which
    is Stable Audio's ``x·cos(cat(θ, θ)) + rotate_half(x)·sin(cat(θ, θ))``, computed in at least float32.

    Args:
        x: ``(..., H, S, Dh)``: ``(B, H, S, Dh)``, stacked ``(2, B, H, S, Dh)`` q and k, or a whole
            cache ``(Ly, B, H, S, Dh)``.
        table: ``(2, S, R/2)``, or ``(2, B, S, R/2)`` for per-sample positions, from :class:`RotaryEmbedding`.

    Returns:
        ``x``'s shape and dtype.
    """
    cos, sin = table[0], table[1]
    if cos.ndim == 3:  # (B, S, R/2) → (B, 1, S, R/2): broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    half = cos.shape[-1]
    if x.dtype != torch.promote_types(x.dtype, torch.float32):  # low precision: rotate in float32
        return apply_rotary(x.float(), table).to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
