"""Text–audio retrieval on held-out clips: does an embedder put a clip nearer its own caption than others'?

For each clip, the cosine of its audio (the mean of its window embeddings) to every clip's caption:
``pairwise_accuracy`` is the share of (clip, other caption) pairs where the true caption scores higher
(chance 0.5; pairs whose captions are equal are left out), ``top1`` the share of clips whose own caption
is the nearest of all (chance 1/N), ``median_rank`` the median rank of the true caption (1 = best).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lmdm.eval.embedders import TextAudioEmbedder
from lmdm.eval.score import AudioSet

__all__ = ["retrieval"]


@torch.inference_mode()
def retrieval(embedder: TextAudioEmbedder, clips: AudioSet) -> dict[str, Any]:
    """Retrieval figures of ``embedder`` on ``clips`` with their prompts (every clip needs one)."""
    if len(clips.clips) < 2 or any(not p for p in clips.prompts):
        raise ValueError(f"retrieval needs at least 2 clips, each with a caption; got {len(clips.clips)}")
    audio = F.normalize(torch.stack([embedder.embed_audio(c, clips.sample_rate).mean(0) for c in clips.clips]), dim=-1)
    text = torch.stack([embedder.embed_text(str(p)) for p in clips.prompts])
    sims = audio.double() @ text.double().T  # (clip, caption)
    same = torch.tensor([[a == b for b in clips.prompts] for a in clips.prompts])
    true = sims.diagonal()[:, None]
    wins = (true > sims) & ~same
    ranks = 1 + ((sims > true) & ~same).sum(1)
    n = len(clips.clips)
    return {
        "embedder": embedder.name,
        "clips": n,
        "pairwise_accuracy": float(wins.sum() / (~same).sum()),
        "pairwise_chance": 0.5,
        "top1": float((ranks == 1).double().mean()),
        "top1_chance": 1 / n,
        "median_rank": float(ranks.double().median()),
    }
