"""The built-in text–audio embedder: a small contrastive (CLIP-style) model of the corpus's captions.

Audio tower: log-mel frames (computed in torch, so the model takes raw mono audio) → a 1-d conv stack
→ mean and standard deviation over time → an MLP. Text tower: an MLP over a frozen sentence embedding
(the offline text encoder's tokens, mean-pooled over the prompt: :func:`sentence_embedding`). Both
end L2-normalised in one ``dim``-wide space, where their cosine is the CLAP-style adherence score. It
is trained with the symmetric InfoNCE loss (:func:`contrastive_loss`) by ``lmdm train --stage embedder``
on the training split, frozen and shipped (``builtin:embedder``).

Legend: B clips, S samples, M mel bins, T mel frames, W width, D joint width, E sentence width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import librosa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EmbedderArgs", "TextAudioEmbedding", "contrastive_loss", "sentence_embedding"]


@dataclass(frozen=True)
class EmbedderArgs:
    sample_rate: int = 16000
    n_mels: int = 64
    n_fft: int = 1024
    hop: int = 320  # 50 frames per second at 16 kHz
    text_dim: int = 384  # the sentence encoder's width (all-MiniLM-L6-v2)
    width: int = 128
    layers: int = 4
    dim: int = 128


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, 5, padding=2)
        self.norm = nn.GroupNorm(1, width)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool1d(x + F.gelu(self.norm(self.conv(x))), 2)


class TextAudioEmbedding(nn.Module):
    """Audio ``(B, S)`` and sentence embeddings ``(B, E)`` into one normalised ``(B, D)`` space."""

    mel: Tensor
    window: Tensor

    def __init__(self, args: EmbedderArgs) -> None:
        super().__init__()
        self.args = args
        mel = librosa.filters.mel(sr=args.sample_rate, n_fft=args.n_fft, n_mels=args.n_mels, fmin=30.0, fmax=args.sample_rate / 2)
        self.register_buffer("mel", torch.from_numpy(mel).float(), persistent=False)  # (M, n_fft/2+1)
        self.register_buffer("window", torch.hann_window(args.n_fft), persistent=False)
        w = args.width
        self.stem = nn.Sequential(nn.Conv1d(args.n_mels, w, 5, stride=2, padding=2), nn.GELU(), nn.GroupNorm(1, w))
        self.blocks = nn.Sequential(*[_Residual(w) for _ in range(args.layers - 1)])
        self.audio_head = nn.Sequential(nn.Linear(2 * w, w), nn.GELU(), nn.Linear(w, args.dim))
        self.text_head = nn.Sequential(nn.Linear(args.text_dim, w), nn.GELU(), nn.Linear(w, args.dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def log_mel(self, audio: Tensor) -> Tensor:
        """Log-mel frames ``(B, M, T)`` of mono audio ``(B, S)`` at ``args.sample_rate``."""
        a = self.args
        spec = torch.stft(audio.float(), a.n_fft, a.hop, window=self.window, center=True, return_complex=True).abs().pow(2)
        return torch.log(self.mel @ spec + 1e-5)

    def embed_audio(self, audio: Tensor) -> Tensor:
        """``(B, S)`` mono audio → ``(B, D)``, unit length."""
        x = self.blocks(self.stem(self.log_mel(audio) / 5.0))
        pooled = torch.cat([x.mean(-1), x.std(-1)], dim=-1)
        return F.normalize(self.audio_head(pooled), dim=-1)

    def embed_text(self, sentences: Tensor) -> Tensor:
        """``(B, E)`` sentence embeddings → ``(B, D)``, unit length."""
        return F.normalize(self.text_head(sentences.float()), dim=-1)

    def forward(self, audio: Tensor, sentences: Tensor) -> Tensor:
        """The contrastive loss of a batch of (audio, its caption's sentence embedding) pairs."""
        return contrastive_loss(self.embed_audio(audio), self.embed_text(sentences), self.logit_scale, same=_same_rows(sentences))

    def init_args(self) -> dict[str, int]:
        return dataclasses.asdict(self.args)


def _same_rows(x: Tensor) -> Tensor:
    """``(B, B)`` bool: rows that are equal (the same caption: both pairs are positives)."""
    return (x[:, None, :] == x[None, :, :]).all(-1)


def contrastive_loss(audio: Tensor, text: Tensor, logit_scale: Tensor, same: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over ``(B, D)`` unit audio and text embeddings (CLIP). Where ``same`` marks
    several rows with one caption, each of them is a positive (the target spreads over them)."""
    logits = logit_scale.clamp(max=math.log(100.0)).exp() * audio @ text.T
    targets = same.float() if same is not None else torch.eye(len(audio), device=audio.device)
    targets = targets / targets.sum(-1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2


def sentence_embedding(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of the prompt's token embeddings ``(B, L, E)`` over its ``mask`` ``(B, L)``: ``(B, E)``."""
    weights = mask.float()[..., None]
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
