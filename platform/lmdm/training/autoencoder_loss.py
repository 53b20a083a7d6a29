"""The autoencoder objective: Stable Audio's Oobleck recipe (multi-resolution STFT, a multi-scale STFT
discriminator with feature matching, KL) plus the multi-scale mel loss of DAC.

The reconstruction terms are weighted by :class:`AutoencoderWeights`; the adversarial terms are those of
stable-audio-tools' ``EncodecDiscriminator`` (hinge losses, L1 feature matching over every layer of every
scale). The discriminator is a separate module with its own optimizer (see the recipe's autoencoder stage).

Legend: B batch, C audio channels, N samples, F frequency bins, T STFT frames, K filters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from lmdm.models.autoencoder import OobleckVAE

__all__ = [
    "AutoencoderLoss",
    "AutoencoderWeights",
    "MelLoss",
    "MultiScaleSTFTDiscriminator",
    "STFTDiscriminator",
    "autoencoder_loss",
    "discriminator_loss",
    "multi_resolution_stft_loss",
]


@dataclass(frozen=True)
class AutoencoderWeights:
    """Weights of the generator's loss terms (0 leaves a term out, and skips computing it)."""

    stft: float = 1.0
    mel: float = 0.0
    waveform: float = 1.0
    kl: float = 1e-4
    adversarial: float = 0.0
    feature_matching: float = 0.0


@dataclass(frozen=True)
class AutoencoderLoss:
    """``loss``: the weighted sum; the unweighted parts for logging (0 where a term is off)."""

    loss: Tensor
    stft: Tensor
    mel: Tensor
    waveform: Tensor
    kl: Tensor
    adversarial: Tensor
    feature_matching: Tensor


def multi_resolution_stft_loss(pred: Tensor, target: Tensor, fft_sizes: Sequence[int] = (256, 512, 1024)) -> Tensor:
    """Mean over resolutions of spectral convergence + L1 of log magnitudes (hop = fft/4, Hann window).

    Args:
        pred, target: ``(B, C, N)`` audio.

    Returns:
        A scalar.
    """
    x, y = pred.flatten(0, 1), target.flatten(0, 1)  # (B·C, N)
    total = x.new_zeros(())
    for n_fft in fft_sizes:
        window = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
        X = torch.stft(x, n_fft, n_fft // 4, window=window, return_complex=True).abs()
        Y = torch.stft(y, n_fft, n_fft // 4, window=window, return_complex=True).abs()
        convergence = torch.linalg.norm(Y - X) / torch.linalg.norm(Y).clamp_min(1e-7)
        log_mag = (torch.log(X.clamp_min(1e-5)) - torch.log(Y.clamp_min(1e-5))).abs().mean()
        total = total + convergence + log_mag
    return total / len(fft_sizes)


class MelLoss(nn.Module):
    """DAC's multi-scale mel loss: L1 between ``log10`` mel magnitudes, summed over window lengths.

    Each scale has window ``w`` (hop ``w/4``, Hann) and ``bands`` mel bands (librosa's Slaney filters, 0 Hz
    to Nyquist); magnitudes are clamped at ``1e-5`` before the log.
    """

    def __init__(
        self, sample_rate: int, windows: Sequence[int] = (32, 64, 128, 256, 512, 1024, 2048), bands: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        import librosa

        bands = bands or [5 * 2**i for i in range(len(windows))]  # 5, 10, …, 320: DAC's bands for its windows
        if len(bands) != len(windows):
            raise ValueError(f"MelLoss: {len(windows)} windows but {len(bands)} band counts")
        self.windows = tuple(windows)
        for w, m in zip(self.windows, bands, strict=True):
            fb = librosa.filters.mel(sr=sample_rate, n_fft=w, n_mels=m, fmin=0.0, fmax=sample_rate / 2)
            self.register_buffer(f"fb_{w}", torch.from_numpy(np.asarray(fb, dtype=np.float32)), persistent=False)
            self.register_buffer(f"win_{w}", torch.hann_window(w), persistent=False)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """``(B, C, N)`` pair → a scalar."""
        x, y = pred.flatten(0, 1), target.flatten(0, 1)
        total = x.new_zeros(())
        for w in self.windows:
            fb, win = getattr(self, f"fb_{w}"), getattr(self, f"win_{w}")
            X = torch.stft(x, w, w // 4, window=win, return_complex=True).abs()
            Y = torch.stft(y, w, w // 4, window=win, return_complex=True).abs()
            mx, my = fb @ X, fb @ Y  # (B·C, bands, T)
            total = total + (mx.clamp_min(1e-5).log10() - my.clamp_min(1e-5).log10()).abs().mean()
        return total


def _wn_conv2d(
    cin: int, cout: int, kernel: tuple[int, int], stride: tuple[int, int] = (1, 1), dilation: tuple[int, int] = (1, 1)
) -> nn.Conv2d:
    padding = ((kernel[0] - 1) * dilation[0] // 2, (kernel[1] - 1) * dilation[1] // 2)
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, dilation=dilation, padding=padding)
    return cast(nn.Conv2d, weight_norm(conv))


class STFTDiscriminator(nn.Module):
    """EnCodec's STFT discriminator at one resolution: the complex STFT (real and imaginary parts of every
    channel as input planes, ``(B, 2C, T, F)``), 2-D convs striding over frequency and dilating over time."""

    def __init__(self, n_fft: int, channels: int = 1, filters: int = 32, dilations: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.window: Tensor
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        layers = [_wn_conv2d(2 * channels, filters, (3, 9))]
        layers += [_wn_conv2d(filters, filters, (3, 9), stride=(1, 2), dilation=(d, 1)) for d in dilations]
        layers.append(_wn_conv2d(filters, filters, (3, 3)))
        self.convs = nn.ModuleList(layers)
        self.post = _wn_conv2d(filters, 1, (3, 3))

    def forward(self, audio: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``(B, C, N)`` → logits ``(B, 1, T, F')`` and every layer's activations."""
        B, C, _ = audio.shape
        spec = torch.stft(audio.flatten(0, 1), self.n_fft, self.n_fft // 4, window=self.window, normalized=True, return_complex=True)
        x = torch.view_as_real(spec).reshape(B, C, *spec.shape[1:], 2)  # (B, C, F, T, 2)
        x = x.permute(0, 1, 4, 3, 2).reshape(B, 2 * C, spec.shape[2], spec.shape[1])  # (B, 2C, T, F)
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            features.append(x)
        return self.post(x), features


class MultiScaleSTFTDiscriminator(nn.Module):
    """One :class:`STFTDiscriminator` per FFT size (stable-audio-tools' ``EncodecDiscriminator``)."""

    def __init__(self, n_ffts: Sequence[int] = (1024, 512, 256, 128), channels: int = 1, filters: int = 32) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(STFTDiscriminator(n, channels, filters) for n in n_ffts)

    def forward(self, audio: Tensor) -> list[tuple[Tensor, list[Tensor]]]:
        return [d(audio) for d in self.discriminators]


def discriminator_loss(discriminator: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """Hinge loss of the discriminator: ``Σ_scales mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))`` (``fake`` detached)."""
    total = real.new_zeros(())
    for (score_real, _), (score_fake, _) in zip(discriminator(real), discriminator(fake.detach()), strict=True):
        total = total + F.relu(1 - score_real).mean() + F.relu(1 + score_fake).mean()
    return total


def _generator_adversarial(discriminator: nn.Module, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ_scales −mean(D(fake)), Σ_scales mean over layers of L1(features(real), features(fake)))``.

    The discriminator's parameters are frozen meanwhile (gradients reach ``fake`` only): no wasted
    parameter gradients, and no DDP gradient hook fires outside the discriminator's own step."""
    adversarial, matching = fake.new_zeros(()), fake.new_zeros(())
    trainable = [p for p in discriminator.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            real_out = discriminator(real)
        for (_, feats_real), (score_fake, feats_fake) in zip(real_out, discriminator(fake), strict=True):
            adversarial = adversarial - score_fake.mean()
            layers = sum(((a - b).abs().mean() for a, b in zip(feats_real, feats_fake, strict=True)), fake.new_zeros(()))
            matching = matching + layers / len(feats_fake)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return adversarial, matching


def autoencoder_loss(
    vae: OobleckVAE,
    audio: Tensor,
    weights: AutoencoderWeights | None = None,
    generator: torch.Generator | None = None,
    mel: MelLoss | None = None,
    discriminator: nn.Module | None = None,
    stft_ffts: Sequence[int] = (256, 512, 1024),
) -> tuple[AutoencoderLoss, Tensor]:
    """Encode, sample the posterior, decode, and score the reconstruction (the generator's side).

    Args:
        audio: ``(B, C, N)``, ``N`` a multiple of the downsampling ratio.
        mel: needed where ``weights.mel`` > 0.
        stft_ffts: the multi-resolution STFT loss's FFT sizes.
        discriminator: needed where ``weights.adversarial`` or ``weights.feature_matching`` > 0 (its
            parameters get no gradient here).

    Returns:
        The loss and its parts, and the reconstruction (for the discriminator's step).
    """
    w = weights or AutoencoderWeights()
    posterior = vae.encode(audio)
    recon = vae.decode(posterior.sample(generator))
    zero = audio.new_zeros(())
    stft = multi_resolution_stft_loss(recon, audio, stft_ffts) if w.stft else zero
    if w.mel and mel is None:
        raise ValueError("autoencoder_loss: weights.mel > 0 needs a MelLoss")
    mel_term = mel(recon, audio) if w.mel and mel is not None else zero
    waveform = (recon - audio).abs().mean() if w.waveform else zero
    kl = posterior.kl()
    adversarial = matching = zero
    if w.adversarial or w.feature_matching:
        if discriminator is None:
            raise ValueError("autoencoder_loss: adversarial weights > 0 need a discriminator")
        adversarial, matching = _generator_adversarial(discriminator, audio, recon)
    total = (
        w.stft * stft + w.mel * mel_term + w.waveform * waveform + w.kl * kl + w.adversarial * adversarial + w.feature_matching * matching
    )
    return AutoencoderLoss(total, stft, mel_term, waveform, kl, adversarial, matching), recon
