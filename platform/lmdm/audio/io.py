"""Reading, converting and writing audio. Arrays are ``(channels, samples)`` float32 in [-1, 1].

Decoding uses soundfile (libsndfile: wav, flac, ogg, mp3 where the bundled library supports it) and
resampling uses soxr (high-quality, deterministic). torchaudio is not used: it has no build matching
the pinned torch.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

__all__ = ["AUDIO_EXTENSIONS", "AudioReadError", "decode_audio", "load_audio", "resample", "to_channels", "write_audio"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif")


class AudioReadError(ValueError):
    """An input could not be used as audio; ``reason`` says why in a few words."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def resample(audio: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample ``(C, N)`` audio with soxr's high-quality filter.

    Returns:
        ``(C, round(N * new_rate / orig_rate))`` float32.
    """
    if orig_rate == new_rate:
        return audio.astype(np.float32, copy=False)
    out = soxr.resample(np.ascontiguousarray(audio.T, dtype=np.float32), orig_rate, new_rate, quality="HQ")
    return np.ascontiguousarray(np.atleast_2d(out.T) if out.ndim == 2 else out[None, :], dtype=np.float32)


def to_channels(audio: np.ndarray, channels: int) -> np.ndarray:
    """Convert ``(C, N)`` audio to ``channels`` channels: mean for down-mix, repetition for up-mix.

    Raises:
        ValueError: for a channel count other than 1 or 2 requested from several channels.
    """
    C = audio.shape[0]
    if channels == C:
        return audio
    if channels == 1:
        mono: np.ndarray = audio.mean(axis=0, keepdims=True)
        return mono
    if C == 1:
        return np.repeat(audio, channels, axis=0)
    raise ValueError(f"cannot convert {C} channels to {channels}: only down-mix to mono or up-mix from mono")


def decode_audio(data: bytes | Path | str, sample_rate: int, channels: int, source: str | None = None) -> np.ndarray:
    """Decode a file or encoded bytes to ``(channels, N)`` float32 at ``sample_rate``.

    Raises:
        AudioReadError: unreadable or corrupt data, no samples, or non-finite samples.
    """
    name = source or (str(data) if not isinstance(data, bytes) else "<bytes>")
    handle = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        raw, rate = sf.read(handle, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioReadError(name, f"unreadable audio ({exc})") from None
    if raw.shape[0] == 0:
        raise AudioReadError(name, "empty: the file holds no samples")
    if not np.isfinite(raw).all():
        raise AudioReadError(name, "corrupt: non-finite (NaN/inf) samples")
    audio = to_channels(np.ascontiguousarray(raw.T), channels)
    return resample(audio, int(rate), sample_rate)


def load_audio(path: Path | str, sample_rate: int, channels: int) -> np.ndarray:
    """Read an audio file to ``(channels, N)`` float32 at ``sample_rate`` (see :func:`decode_audio`).

    Raises:
        AudioReadError: missing, empty (0 bytes or 0 samples), unreadable or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioReadError(str(path), "missing: no such file")
    if path.stat().st_size == 0:
        raise AudioReadError(str(path), "empty: the file is 0 bytes")
    return decode_audio(path, sample_rate, channels, source=str(path))


def write_audio(path: Path | str, audio: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write ``(C, N)`` audio; the format follows the suffix (``.wav``, ``.flac``)."""
    sf.write(str(path), np.clip(audio, -1.0, 1.0).T, sample_rate, subtype=subtype)
