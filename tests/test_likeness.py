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


def _notes(pitches: list[int], note_seconds: float) -> np.ndarray:
    """A melody: each MIDI pitch for ``note_seconds`` with a 10 ms attack and an exponential decay."""
    n = int(note_seconds * RATE)
    t = np.arange(n) / RATE
    envelope = np.minimum(t / 0.01, 1.0) * np.exp(-3.0 * t)
    notes = [0.3 * envelope * np.sin(2 * np.pi * 440.0 * 2 ** ((p - 69) / 12) * t) for p in pitches]
    return np.concatenate(notes)[None].astype(np.float32)


def test_a_note_sequence_gives_its_known_rates_and_a_drone_gives_none() -> None:
    """16 notes of 0.25 s (a scale up and down, every neighbour different): 4 onsets/s and 15 changes
    over about 4 voiced seconds; a steady drone with a slow fade-in: about 0 of each."""
    melody = _notes([60, 62, 64, 65, 67, 69, 71, 72, 71, 69, 67, 65, 64, 62, 60, 62], 0.25)
    stats = audio_stats([melody], RATE)
    assert 3.4 <= stats.onset_rate <= 4.6, stats
    assert 3.2 <= stats.pitch_change_rate <= 4.5, stats
    t = np.arange(4 * RATE) / RATE
    drone = (0.3 * np.minimum(t / 1.0, 1.0) * np.sin(2 * np.pi * 110.0 * t))[None].astype(np.float32)
    still = audio_stats([drone], RATE)
    assert still.onset_rate == 0.0 and still.pitch_change_rate == 0.0, still
    far = likeness(still, stats)
    assert far["onset_rate_ratio"] < 0.1 and far["pitch_change_rate_ratio"] < 0.05
    assert likeness(stats, stats)["onset_rate_log_ratio"] == 0.0
    assert compare(likeness(audio_stats([melody[:, : 2 * RATE]], RATE), stats), far)["beats"]
