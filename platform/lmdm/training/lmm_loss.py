"""The LMM baseline's training loss: next-code cross-entropy on RVQ codes of latent crops (teacher forcing).

Legend: B batch, C latent channels, T frames, F training frames, K levels, L text tokens, Dc text width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmdm.models.lmm import LMM
from lmdm.training.losses import _drop_text

__all__ = ["lmm_loss"]


def lmm_loss(lmm: LMM, latents: Tensor, text: Tensor | None, generator: torch.Generator, frames: int, cfg_dropout: float = 0.0) -> Tensor:
    """Mean cross-entropy of every code of a random ``frames``-frame crop of each latent sequence.

    The crop is tokenised by the model's frozen RVQ; the prompt is zeroed per sample with probability
    ``cfg_dropout`` (classifier-free guidance; zero text is "no text", as for the DiT stages).

    Args:
        latents: ``(B, C, T)`` clean latents (a precomputed chunk); text: ``(B, L, Dc)`` or ``None``.
        frames: ``F``, at most ``T``: the crop (one start shared by the batch).

    Raises:
        ValueError: a crop longer than the chunks.
    """
    T = latents.shape[-1]
    if frames > T:
        raise ValueError(
            f"an LMM training crop of {frames} frames does not fit chunks of {T}: lower lmm.train_frames or raise precompute.chunk_frames"
        )
    start = int(torch.randint(0, T - frames + 1, (1,), generator=generator, device=generator.device))
    with torch.no_grad():
        codes = lmm.rvq.encode(latents[..., start : start + frames])  # (B, K, F)
    text, _ = _drop_text(text, generator, cfg_dropout)
    return lmm.loss(codes, lmm.text_kv(text) if text is not None else None)
