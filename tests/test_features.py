"""Audio features against closed forms and against the corpus' exact score curves."""

from __future__ import annotations

import numpy as np

from conftest import tiny_config
from lmdm.audio.features import f0_pyin, hz_to_cents, loudness_db, num_frames, spectral_centroid
from lmdm.data.corpus import make_clip

SR, FR = 16000, 50


def sine(freq: float, amp: float = 0.5, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)[None, :]


def test_frame_grid() -> None:
    assert num_frames(16000, SR, FR) == 51
    assert loudness_db(sine(440), SR, FR).shape == (51,)


def test_loudness_of_a_sine() -> None:
    loud = loudness_db(sine(440, amp=0.5), SR, FR)[5:-5]
    np.testing.assert_allclose(loud, 20 * np.log10(0.5 / np.sqrt(2)), atol=0.05)
    assert loudness_db(np.zeros((1, SR), np.float32), SR, FR).max() == -100.0


def test_centroid_of_a_sine() -> None:
    bright = spectral_centroid(sine(1000), SR, FR)[5:-5]
    np.testing.assert_allclose(bright, 1000.0, rtol=0.03)


def test_f0_of_a_sine() -> None:
    f0 = f0_pyin(sine(330.0), SR, FR)[5:-5]
    assert (f0 > 0).all()
    assert np.abs(hz_to_cents(f0, np.full_like(f0, 330.0))).max() < 10


def test_pitch_tracker_agrees_with_the_score_on_solo_renders() -> None:
    """On solo-voice corpus renders, pyin's f0 is within 50 cents of the score on >= 90% of voiced frames."""
    cfg = tiny_config("data.corpus.clip_seconds=8")
    good = voiced = 0
    for index in range(6):
        clip = make_clip(index, cfg.data.corpus, cfg.audio, cfg.data.frame_rate, solo=True)
        assert clip.metadata["solo"]
        score = np.array(clip.metadata["f0_hz"])
        measured = f0_pyin(clip.audio, cfg.audio.sample_rate, cfg.data.frame_rate)
        both = (score > 0) & (measured > 0)
        cents = np.abs(hz_to_cents(measured[both], score[both]))
        good += int((cents < 50).sum())
        voiced += int((score > 0).sum())
    assert voiced > 6 * 8 * FR * 0.5
    assert good / voiced >= 0.90, f"f0 agreement {good / voiced:.3f}"
