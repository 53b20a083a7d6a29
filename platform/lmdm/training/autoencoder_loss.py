"""The autoencoder objective: multi-resolution STFT + waveform L1 + KL (Stable Audio's recipe, without
the adversarial term).

Legend: B batch, C audio channels, N samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmdm.models.autoencoder import OobleckVAE

__all__ = ["AutoencoderLoss", "autoencoder_loss", "multi_resolution_stft_loss"]


@dataclass(frozen=True)
class AutoencoderLoss:
    """``loss`` = ``stft + waveform + kl_weight · kl``; the parts for logging."""

    loss: Tensor
    stft: Tensor
    waveform: Tensor
    kl: Tensor


def multi_resolution_stft_loss(pred: Tensor, target: Tensor, fft_sizes: tuple[int, ...] = (256, 512, 1024)) -> Tensor:
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


def autoencoder_loss(vae: OobleckVAE, audio: Tensor, kl_weight: float = 1e-4, generator: torch.Generator | None = None) -> AutoencoderLoss:
    """Encode, sample the posterior, decode, and score the reconstruction.

    Args:
        audio: ``(B, C, N)``, ``N`` a multiple of the downsampling ratio.
    """
    posterior = vae.encode(audio)
    recon = vae.decode(posterior.sample(generator))
    stft = multi_resolution_stft_loss(recon, audio)
    waveform = (recon - audio).abs().mean()
    kl = posterior.kl()
    return AutoencoderLoss(stft + waveform + kl_weight * kl, stft, waveform, kl)
