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
        """Angles for positions.

        Args:
            positions: ``(S,)`` or ``(B, S)`` positions (float or int).

        Returns:
            ``(S, R)`` or ``(B, S, R)`` float32 angles, ``cat(θ, θ)``.
        """
        theta = positions.to(torch.float32)[..., None] * self.inv_freq
        return torch.cat((theta, theta), dim=-1)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate the first ``R`` dims of each head of ``x`` by ``freqs`` (in float32).

    Args:
        x: ``(..., H, S, Dh)`` (e.g. ``(B, H, S, Dh)``, or a whole cache ``(Ly, B, H, S, Dh)``).
        freqs: ``(S, R)``, or ``(B, S, R)`` for a 4-D ``x``, from :class:`RotaryEmbedding`.

    Returns:
        ``x``'s shape and dtype.
    """
    if freqs.ndim == 3:
        freqs = freqs[:, None]  # (B, 1, S, R)
    r = freqs.shape[-1]
    rot, rest = x[..., :r].to(torch.float32), x[..., r:]
    rot = rot * freqs.cos() + _rotate_half(rot) * freqs.sin()
    return torch.cat((rot.to(x.dtype), rest), dim=-1)
