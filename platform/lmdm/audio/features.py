"""Per-frame audio features: loudness (dB), brightness (spectral centroid, Hz) and f0 (Hz).

All curves share one frame grid: frame ``i`` is centred on sample ``i * hop`` with
``hop = sample_rate // frame_rate``, so a clip of ``N`` samples has ``N // hop + 1`` frames
(librosa's ``center=True`` convention). The same functions measure the built-in corpus, sketch
inputs and generated streams, so drift metrics compare like with like.
"""

from __future__ import annotations

import librosa
import numpy as np

__all__ = ["FeatureFrames", "f0_pyin", "hz_to_cents", "loudness_db", "num_frames", "spectral_centroid"]

LOUDNESS_FLOOR_DB = -100.0
F0_MIN_HZ = 55.0  # A1
F0_MAX_HZ = 2093.0  # C7


class FeatureFrames:
    """The shared frame grid for a sample rate and curve frame rate."""

    def __init__(self, sample_rate: int, frame_rate: int) -> None:
        if sample_rate % frame_rate != 0:
            raise ValueError(f"frame_rate {frame_rate} must divide sample_rate {sample_rate}")
        self.sample_rate = sample_rate
        self.frame_rate = frame_rate
        self.hop = sample_rate // frame_rate
        self.window = 4 * self.hop  # analysis window: 4 hops (80 ms at 50 Hz)

    def count(self, num_samples: int) -> int:
        """Frames for a clip of ``num_samples`` samples."""
        return num_samples // self.hop + 1

    def times(self, num_samples: int) -> np.ndarray:
        """Centre time in seconds of every frame, ``(F,)``."""
        return np.arange(self.count(num_samples)) * (self.hop / self.sample_rate)


def num_frames(num_samples: int, sample_rate: int, frame_rate: int) -> int:
    """Frames on the shared grid for ``num_samples`` samples."""
    return FeatureFrames(sample_rate, frame_rate).count(num_samples)


def _mono(audio: np.ndarray) -> np.ndarray:
    return audio.mean(axis=0) if audio.ndim == 2 else audio


def loudness_db(audio: np.ndarray, sample_rate: int, frame_rate: int) -> np.ndarray:
    """RMS loudness in dBFS per frame, floored at -100 dB.

    Args:
        audio: ``(C, N)`` or ``(N,)`` float audio.

    Returns:
        ``(F,)`` float32.
    """
    grid = FeatureFrames(sample_rate, frame_rate)
    rms = librosa.feature.rms(y=_mono(audio).astype(np.float32), frame_length=grid.window, hop_length=grid.hop, center=True)[0]
    loud: np.ndarray = np.maximum(20.0 * np.log10(np.maximum(rms, 1e-12)), LOUDNESS_FLOOR_DB).astype(np.float32)
    return loud


def spectral_centroid(audio: np.ndarray, sample_rate: int, frame_rate: int) -> np.ndarray:
    """Spectral centroid in Hz per frame (0 for silent frames).

    Args:
        audio: ``(C, N)`` or ``(N,)`` float audio.

    Returns:
        ``(F,)`` float32.
    """
    grid = FeatureFrames(sample_rate, frame_rate)
    y = _mono(audio).astype(np.float32)
    centroid = librosa.feature.spectral_centroid(y=y, sr=sample_rate, n_fft=grid.window, hop_length=grid.hop, center=True)[0]
    out: np.ndarray = np.nan_to_num(centroid, nan=0.0).astype(np.float32)
    return out


def f0_pyin(audio: np.ndarray, sample_rate: int, frame_rate: int, fmin: float = F0_MIN_HZ, fmax: float = F0_MAX_HZ) -> np.ndarray:
    """Fundamental frequency in Hz per frame with librosa's probabilistic YIN (0 when unvoiced).

    Args:
        audio: ``(C, N)`` or ``(N,)`` float audio.

    Returns:
        ``(F,)`` float32 on the shared frame grid.
    """
    grid = FeatureFrames(sample_rate, frame_rate)
    y = _mono(audio).astype(np.float32)
    frame_length = max(2048 * sample_rate // 22050, int(4 * sample_rate / fmin))
    frame_length = 1 << (frame_length - 1).bit_length()
    f0, voiced, _ = librosa.pyin(y, fmin=fmin, fmax=fmax, sr=sample_rate, frame_length=frame_length, hop_length=grid.hop, center=True)
    f0 = np.where(voiced, np.nan_to_num(f0, nan=0.0), 0.0)
    out: np.ndarray = f0[: grid.count(y.shape[-1])].astype(np.float32)
    return out


def hz_to_cents(f_hz: np.ndarray, ref_hz: np.ndarray) -> np.ndarray:
    """Signed distance in cents from ``ref_hz`` to ``f_hz`` (both > 0)."""
    cents: np.ndarray = 1200.0 * np.log2(f_hz / ref_hz)
    return cents
