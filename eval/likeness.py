"""A measurable likeness check: does generated audio resemble the corpus?

Figures per audio set: the pitch-class histogram of voiced frames (pyin f0), loudness (dBFS of audible
frames) mean/std and brightness (spectral centroid) mean/std. Distances to the corpus: L1 between
pitch-class histograms, and absolute differences of the means and standard deviations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lmdm.audio.features import f0_pyin, loudness_db, spectral_centroid

__all__ = ["FIGURES", "TIE", "AudioStats", "audio_stats", "compare", "likeness"]

# The distances :func:`likeness` returns (lower is closer to the reference).
FIGURES = (
    "pitch_class_l1",
    "voiced_diff",
    "loudness_mean_diff_db",
    "loudness_std_diff_db",
    "brightness_mean_diff_hz",
    "brightness_std_diff_hz",
)
TIE = 0.02  # relative difference below which :func:`compare` calls two distances a tie


@dataclass(frozen=True)
class AudioStats:
    pitch_classes: list[float]  # 12 shares, C first
    voiced: float  # share of frames with a pitch
    loudness_mean: float
    loudness_std: float
    brightness_mean: float
    brightness_std: float


def audio_stats(clips: list[np.ndarray], sample_rate: int, frame_rate: int = 50) -> AudioStats:
    """Statistics over several ``(C, N)`` clips."""
    pcs = np.zeros(12)
    voiced = frames = 0
    loud, bright = [], []
    for audio in clips:
        f0 = f0_pyin(audio, sample_rate, frame_rate)
        db = loudness_db(audio, sample_rate, frame_rate)
        cent = spectral_centroid(audio, sample_rate, frame_rate)
        audible = db > -60
        frames += len(f0)
        on = f0 > 0
        voiced += int(on.sum())
        midi = np.round(69 + 12 * np.log2(f0[on] / 440.0)).astype(np.int64)
        pcs += np.bincount(midi % 12, minlength=12)
        loud.append(db[audible])
        bright.append(cent[audible])
    loudness, brightness = np.concatenate(loud) if loud else np.zeros(1), np.concatenate(bright) if bright else np.zeros(1)
    hist = pcs / max(pcs.sum(), 1.0)
    return AudioStats(
        [round(float(x), 4) for x in hist],
        voiced / max(frames, 1),
        float(loudness.mean()) if loudness.size else -100.0,
        float(loudness.std()) if loudness.size else 0.0,
        float(brightness.mean()) if brightness.size else 0.0,
        float(brightness.std()) if brightness.size else 0.0,
    )


def likeness(generated: AudioStats, reference: AudioStats) -> dict[str, Any]:
    """Distances of ``generated`` to ``reference`` (lower is closer)."""
    return {
        "pitch_class_l1": float(np.abs(np.array(generated.pitch_classes) - np.array(reference.pitch_classes)).sum()),
        "voiced_diff": abs(generated.voiced - reference.voiced),
        "loudness_mean_diff_db": abs(generated.loudness_mean - reference.loudness_mean),
        "loudness_std_diff_db": abs(generated.loudness_std - reference.loudness_std),
        "brightness_mean_diff_hz": abs(generated.brightness_mean - reference.brightness_mean),
        "brightness_std_diff_hz": abs(generated.brightness_std - reference.brightness_std),
        "stats": asdict(generated),
    }


def compare(model: dict[str, Any], baseline: dict[str, Any], tie: float = TIE) -> dict[str, Any]:
    """Figure by figure, whether ``model`` is closer to the reference than ``baseline`` (both from
    :func:`likeness`). Distances within ``tie`` (relative to the larger one) count as ties.

    Returns:
        ``closer``, ``farther`` and ``tied`` (lists of figure names) and ``beats``: closer on more
        figures than farther.
    """
    closer, farther, tied = [], [], []
    for name in FIGURES:
        a, b = float(model[name]), float(baseline[name])
        if abs(a - b) <= tie * max(abs(a), abs(b), 1e-12):
            tied.append(name)
        else:
            (closer if a < b else farther).append(name)
    return {"closer": closer, "farther": farther, "tied": tied, "beats": len(closer) > len(farther)}
