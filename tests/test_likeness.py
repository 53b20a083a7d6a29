"""The quickstart's likeness figures: statistics of audio against a reference, and the verdict."""

from __future__ import annotations

import numpy as np

from lmdm.eval.likeness import FIGURES, audio_stats, compare, likeness

RATE = 16000


def _tone(freq: float, seconds: float = 2.0, gain: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (gain * np.sin(2 * np.pi * freq * t))[None].astype(np.float32)


def test_a_closer_set_of_tones_beats_a_single_buzz() -> None:
    """A reference of several pitches and levels: tones like it beat a constant buzz on pitch classes
    and loudness spread; identical figures tie; the verdict lists every figure once."""
    reference = audio_stats([_tone(f, gain=g) for f, g in ((220, 0.3), (262, 0.1), (330, 0.2), (392, 0.05))], RATE)
    close = likeness(audio_stats([_tone(f, gain=g) for f, g in ((220, 0.25), (262, 0.12), (330, 0.2), (392, 0.06))], RATE), reference)
    buzz = likeness(audio_stats([_tone(65.0, seconds=8.0)], RATE), reference)
    assert close["pitch_class_l1"] < buzz["pitch_class_l1"] and close["loudness_std_diff_db"] < buzz["loudness_std_diff_db"]
    verdict = compare(close, buzz)
    assert verdict["beats"] and {"pitch_class_l1", "loudness_std_diff_db"} <= set(verdict["closer"])
    assert sorted(verdict["closer"] + verdict["farther"] + verdict["tied"]) == sorted(FIGURES)
    assert not compare(buzz, close)["beats"]
    same = compare(close, close)
    assert same["tied"] == list(FIGURES) and not same["beats"]
