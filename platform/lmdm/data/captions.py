"""Text captions built from a clip's true metadata, and the musical facts they state."""

from __future__ import annotations

import numpy as np

__all__ = ["caption", "estimate_key", "key_name", "tempo_word"]

# Krumhansl–Kessler key profiles (Krumhansl 1990), index 0 = tonic.
_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
_MAJOR_NAMES = ("C", "D-flat", "D", "E-flat", "E", "F", "F-sharp", "G", "A-flat", "A", "B-flat", "B")
_MINOR_NAMES = ("C", "C-sharp", "D", "E-flat", "E", "F", "F-sharp", "G", "G-sharp", "A", "B-flat", "B")
_ENSEMBLE_WORDS = {"plucked": "plucked strings"}
_TEMPO_WORDS = ((66, "adagio"), (88, "andante"), (108, "moderato"), (132, "allegro"))


def tempo_word(bpm: float) -> str:
    """Italian tempo marking for a quarter-note BPM."""
    for limit, word in _TEMPO_WORDS:
        if bpm <= limit:
            return word
    return "presto"


def key_name(tonic_pc: int, mode: str) -> str:
    """``(2, 'major')`` → ``'D major'`` with the usual enharmonic spelling."""
    names = _MAJOR_NAMES if mode == "major" else _MINOR_NAMES
    return f"{names[tonic_pc % 12]} {mode}"


def estimate_key(pitches: np.ndarray, durations: np.ndarray) -> tuple[int, str]:
    """Krumhansl–Schmuckler key of duration-weighted pitch classes.

    Args:
        pitches: ``(n,)`` MIDI pitches.
        durations: ``(n,)`` note durations (any unit).

    Returns:
        ``(tonic pitch class, 'major' | 'minor')``.
    """
    histogram = np.bincount(pitches.astype(np.int64) % 12, weights=durations, minlength=12)
    best = (-2.0, 0, "major")
    for tonic in range(12):
        rotated = np.roll(histogram, -tonic)
        for mode, profile in (("major", _MAJOR), ("minor", _MINOR)):
            r = float(np.corrcoef(rotated, profile)[0, 1]) if histogram.std() > 0 else 0.0
            if r > best[0]:
                best = (r, tonic, mode)
    return best[1], best[2]


def caption(title: str, ensemble: str, instruments: list[str], bpm: int, key: str, solo: bool) -> str:
    """One sentence stating the clip's facts.

    Examples: ``"Monteverdi madrigal 3.12, for organ (reed organ, reed organ, reed organ, church organ), moderato at
    89 BPM, in F major."``, ``"Bach chorale BWV 358, melody alone on violin, moderato at 103 BPM, in B minor."``
    """
    players = f"melody alone on {instruments[0]}" if solo else f"for {_ENSEMBLE_WORDS.get(ensemble, ensemble)} ({', '.join(instruments)})"
    return f"{title}, {players}, {tempo_word(bpm)} at {bpm} BPM, in {key}."
