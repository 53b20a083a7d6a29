"""A measurable likeness check: does generated audio resemble the corpus?

Figures per audio set: the pitch-class histogram of voiced frames (pyin f0), loudness (dBFS of audible
frames) mean/std, brightness (spectral centroid) mean/std, and temporal structure: the onset rate
(onsets per second) and the pitch-change rate (changes of the rounded MIDI pitch per second of voiced
audio, counting only notes held for at least :data:`MIN_NOTE_FRAMES` frames, so pyin's flicker at a
note's edges is not a change). Distances to the corpus: L1 between pitch-class histograms, absolute
differences of the means and standard deviations, and ``|ln(rate / corpus rate)|`` for the rates (also
reported as plain ratios): a steady drone, whose rates are near 0, is far from music on both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import librosa
import numpy as np

from lmdm.audio.features import FeatureFrames, f0_pyin, loudness_db, spectral_centroid

__all__ = ["FIGURES", "TIE", "AudioStats", "audio_stats", "compare", "likeness", "onset_rate", "pitch_change_rate"]

# The distances :func:`likeness` returns (lower is closer to the reference).
FIGURES = (
    "pitch_class_l1",
    "voiced_diff",
    "loudness_mean_diff_db",
    "loudness_std_diff_db",
    "brightness_mean_diff_hz",
    "brightness_std_diff_hz",
    "onset_rate_log_ratio",
    "pitch_change_rate_log_ratio",
)
TIE = 0.02  # relative difference below which :func:`compare` calls two distances a tie
ONSET_DELTA = 1.0  # dB of mean log-mel flux: a plucked note peaks near 18, a drone's wobble stays below 0.5
MIN_NOTE_FRAMES = 3  # a pitch must hold this many voiced frames (60 ms at 50 Hz) to count as a note
_RATE_FLOOR = 0.05  # per second: rates below it count as this, so a log ratio of two silences stays finite


def onset_rate(audio: np.ndarray, sample_rate: int, frame_rate: int = 50) -> float:
    """Onsets per second: peaks of librosa's spectral flux (log-mel, on the shared frame grid) that rise
    :data:`ONSET_DELTA` above their neighbourhood. The flux is not normalised per clip (librosa's
    default), which would turn a drone's tiny wobble into onsets."""
    hop = FeatureFrames(sample_rate, frame_rate).hop
    y = (audio.mean(axis=0) if audio.ndim == 2 else audio).astype(np.float32)
    flux = librosa.onset.onset_strength(y=y, sr=sample_rate, hop_length=hop)
    onsets = librosa.onset.onset_detect(onset_envelope=flux, sr=sample_rate, hop_length=hop, normalize=False, delta=ONSET_DELTA)
    return len(onsets) / max(y.shape[-1] / sample_rate, 1e-9)


def _notes(f0: np.ndarray) -> list[int]:
    """The rounded MIDI pitches of voiced frames as notes: runs shorter than :data:`MIN_NOTE_FRAMES` dropped,
    neighbouring runs of one pitch merged."""
    voiced = f0[f0 > 0]
    if voiced.size == 0:
        return []
    midi = np.round(69 + 12 * np.log2(voiced / 440.0)).astype(np.int64)
    edges = np.flatnonzero(np.diff(midi)) + 1
    notes: list[int] = []
    for run in np.split(midi, edges):
        if len(run) >= MIN_NOTE_FRAMES and (not notes or notes[-1] != run[0]):
            notes.append(int(run[0]))
    return notes


def pitch_change_rate(f0: np.ndarray, frame_rate: int = 50) -> float:
    """Changes of held pitch per second of voiced audio, from an f0 curve ``(F,)`` in Hz (0 = unvoiced)."""
    voiced_seconds = int((f0 > 0).sum()) / frame_rate
    return max(len(_notes(f0)) - 1, 0) / voiced_seconds if voiced_seconds > 0 else 0.0


def _log_ratio(rate: float, reference: float) -> float:
    return abs(float(np.log(max(rate, _RATE_FLOOR) / max(reference, _RATE_FLOOR))))


@dataclass(frozen=True)
class AudioStats:
    pitch_classes: list[float]  # 12 shares, C first
    voiced: float  # share of frames with a pitch
    loudness_mean: float
    loudness_std: float
    brightness_mean: float
    brightness_std: float
    onset_rate: float  # onsets per second
    pitch_change_rate: float  # held-pitch changes per voiced second


def audio_stats(clips: list[np.ndarray], sample_rate: int, frame_rate: int = 50) -> AudioStats:
    """Statistics over several ``(C, N)`` clips."""
    pcs = np.zeros(12)
    voiced = frames = 0
    loud, bright = [], []
    onsets = changes = seconds = voiced_seconds = 0.0
    for audio in clips:
        f0 = f0_pyin(audio, sample_rate, frame_rate)
        clip_seconds = audio.shape[-1] / sample_rate
        onsets += onset_rate(audio, sample_rate, frame_rate) * clip_seconds
        clip_voiced = int((f0 > 0).sum()) / frame_rate
        changes += pitch_change_rate(f0, frame_rate) * clip_voiced
        seconds, voiced_seconds = seconds + clip_seconds, voiced_seconds + clip_voiced
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
        onsets / max(seconds, 1e-9),
        changes / voiced_seconds if voiced_seconds > 0 else 0.0,
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
        "onset_rate_log_ratio": _log_ratio(generated.onset_rate, reference.onset_rate),
        "pitch_change_rate_log_ratio": _log_ratio(generated.pitch_change_rate, reference.pitch_change_rate),
        "onset_rate_ratio": generated.onset_rate / max(reference.onset_rate, _RATE_FLOOR),
        "pitch_change_rate_ratio": generated.pitch_change_rate / max(reference.pitch_change_rate, _RATE_FLOOR),
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
