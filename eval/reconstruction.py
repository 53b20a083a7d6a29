"""``lmdm eval reconstruction``: how well an autoencoder reconstructs held-out corpus clips.

Figures per clip and their mean, with these definitions (so figures from different runs compare):

- **mel L1** (dB): mean ``|difference|`` of 128-band mel power in dB (n_fft 1024, hop 256), input and
  reconstruction each floored :data:`MEL_RANGE_DB` below the *input* clip's peak. Noise in a quiet
  band counts against a reconstruction up to that floor.
- **pitch-class accuracy**: the share of frames voiced (pyin, 60–1000 Hz) in both input and
  reconstruction whose rounded pitch classes agree.
- **voiced**: the share of voiced frames in the input and in the reconstruction (and their difference).
- **loudness error** (dB) and **brightness error** (Hz): mean ``|difference|`` of per-frame RMS loudness
  (dBFS) and spectral centroid, over the frames where the input is audible (above :data:`AUDIBLE_DB`).

A reconstruction is ``decode(posterior mean)``: what precompute stores and a DiT is trained to generate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import librosa
import numpy as np
import torch

from lmdm.audio.features import f0_pyin, loudness_db, spectral_centroid
from lmdm.config import Config

__all__ = [
    "AUDIBLE_DB",
    "F0_RANGE_HZ",
    "MEL_RANGE_DB",
    "mel_db",
    "reconstruct",
    "reconstruction_figures",
    "run_reconstruction",
]

MEL_RANGE_DB = 80.0  # both spectrograms are floored this far below the input's peak
MEL_BANDS, MEL_FFT, MEL_HOP = 128, 1024, 256
F0_RANGE_HZ = (60.0, 1000.0)
AUDIBLE_DB = -60.0  # dBFS: frames of the input below this are left out of the loudness and brightness errors
FIGURE_KEYS = (
    "mel_l1_db",
    "pitch_class_accuracy",
    "voiced_input",
    "voiced_reconstruction",
    "voiced_diff",
    "loudness_error_db",
    "brightness_error_hz",
)


def mel_db(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """128-band mel power in dB (n_fft 1024, hop 256) of mono-mixed ``(C, N)`` or ``(N,)`` audio: ``(128, F)``."""
    y = (audio.mean(axis=0) if audio.ndim == 2 else audio).astype(np.float32)
    mel = librosa.feature.melspectrogram(y=y, sr=sample_rate, n_fft=MEL_FFT, hop_length=MEL_HOP, n_mels=MEL_BANDS, power=2.0)
    out: np.ndarray = 10.0 * np.log10(np.maximum(mel, 1e-20))
    return out


def reconstruction_figures(original: np.ndarray, recon: np.ndarray, sample_rate: int, frame_rate: int = 50) -> dict[str, float]:
    """The figures of one clip: ``original`` and ``recon`` are ``(C, N)`` (or ``(N,)``) at ``sample_rate``.

    Raises:
        ValueError: if the two differ in length (a reconstruction must be cut to its input's length).
    """
    if original.shape[-1] != recon.shape[-1]:
        raise ValueError(f"reconstruction has {recon.shape[-1]} samples, its input {original.shape[-1]}: cut both to one length")
    a, b = mel_db(original, sample_rate), mel_db(recon, sample_rate)
    floor = float(a.max()) - MEL_RANGE_DB
    mel_l1 = float(np.abs(np.maximum(a, floor) - np.maximum(b, floor)).mean())

    f_a = f0_pyin(original, sample_rate, frame_rate, *F0_RANGE_HZ)
    f_b = f0_pyin(recon, sample_rate, frame_rate, *F0_RANGE_HZ)
    both = (f_a > 0) & (f_b > 0)
    pc_a = np.round(12 * np.log2(f_a[both] / 440.0)).astype(np.int64) % 12
    pc_b = np.round(12 * np.log2(f_b[both] / 440.0)).astype(np.int64) % 12
    accuracy = float((pc_a == pc_b).mean()) if both.any() else float("nan")

    loud_a, loud_b = loudness_db(original, sample_rate, frame_rate), loudness_db(recon, sample_rate, frame_rate)
    audible = loud_a > AUDIBLE_DB
    bright_a, bright_b = spectral_centroid(original, sample_rate, frame_rate), spectral_centroid(recon, sample_rate, frame_rate)
    voiced_a, voiced_b = float((f_a > 0).mean()), float((f_b > 0).mean())
    return {
        "mel_l1_db": mel_l1,
        "pitch_class_accuracy": accuracy,
        "voiced_input": voiced_a,
        "voiced_reconstruction": voiced_b,
        "voiced_diff": abs(voiced_a - voiced_b),
        "loudness_error_db": float(np.abs(loud_a - loud_b)[audible].mean()) if audible.any() else float("nan"),
        "brightness_error_hz": float(np.abs(bright_a - bright_b)[audible].mean()) if audible.any() else float("nan"),
    }


def reconstruct(vae: Any, audio: np.ndarray) -> np.ndarray:
    """``decode(encode(audio).mean)`` of one ``(C, N)`` clip, padded to whole latent frames and cut back to ``N``."""
    ratio = int(vae.downsampling_ratio)
    n = audio.shape[-1]
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]
    x = torch.nn.functional.pad(x, (0, -n % ratio))
    with torch.inference_mode():
        out = vae.decode(vae.encode(x).mean)
    result: np.ndarray = out[0, :, :n].numpy()
    return result


def run_reconstruction(
    cfg: Config,
    vae: Any,
    clips: int = 4,
    seconds: float = 8.0,
    progress: Callable[[int, int], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Reconstruct the first ``seconds`` of ``clips`` held-out corpus clips; the figures per clip and their means.

    Args:
        progress: called as ``progress(done, clips)`` after each clip.
        say: told about held-out clips rendered past a small corpus (:func:`~lmdm.eval.score.held_out_reference`).

    Returns:
        ``{"clips": [{"file", **figures}], "mean": figures, "clip_seconds", "audio": [(input, recon)]}``.
    """
    from lmdm.eval.score import held_out_reference

    reference = held_out_reference(cfg, clips, say)
    n = int(seconds * cfg.audio.sample_rate)
    rows, pairs = [], []
    for file, clip in zip(reference.files[:clips], reference.clips[:clips], strict=True):
        if progress:
            progress(len(rows), clips)
        original = clip[:, :n]
        recon = reconstruct(vae, original)
        rows.append({"file": file, **reconstruction_figures(original, recon, cfg.audio.sample_rate, cfg.data.frame_rate)})
        pairs.append((original, recon))
    if progress:
        progress(len(rows), clips)
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in FIGURE_KEYS}
    return {"clips": rows, "mean": mean, "clip_seconds": seconds, "audio": pairs}
