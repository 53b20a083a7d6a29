"""Scores that ship inside music21's wheel, reduced to note lists per voice.

A :class:`Piece` is a list of voices, top voice first; each voice is an ``(n, 3)`` float array of
``[onset, duration, midi_pitch]`` with onset and duration in quarter notes. Parsing a score costs
0.1–0.4 s, so pieces are cached per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Piece", "ScoreError", "corpus_pool", "load_piece"]

SCORE_SUFFIXES = {
    "bach": (".mxl", ".xml", ".krn"),
    "palestrina": (".krn",),
    "monteverdi": (".mxl",),
}
# How each source's pieces are named in captions.
SOURCE_LABELS = {"bach": "Bach chorale", "palestrina": "Palestrina", "monteverdi": "Monteverdi madrigal"}


class ScoreError(ValueError):
    """A score could not be parsed or holds no usable notes."""


@dataclass(frozen=True)
class Piece:
    """A parsed score.

    Attributes:
        piece_id: ``source/file name`` inside music21's corpus (stable across machines).
        title: human-readable name used in captions.
        voices: per voice, top first, ``(n, 3)`` float64 ``[onset_q, duration_q, midi_pitch]``.
        length_q: length of the piece in quarter notes.
    """

    piece_id: str
    title: str
    voices: tuple[np.ndarray, ...]
    length_q: float


def _music21_root() -> Path:
    from music21 import corpus

    return Path(corpus.getComposer("bach")[0]).parent.parent


@functools.cache
def corpus_pool(sources: tuple[str, ...]) -> tuple[str, ...]:
    """Sorted piece ids (``source/file``) of the requested sources; deterministic for a music21 version.

    Raises:
        ScoreError: for an unknown source.
    """
    from music21 import corpus

    pool: list[str] = []
    for source in sources:
        if source not in SCORE_SUFFIXES:
            raise ScoreError(f"unknown corpus source {source!r}; choose from {sorted(SCORE_SUFFIXES)}")
        paths = corpus.getComposer(source)
        pool += sorted(f"{source}/{Path(p).name}" for p in paths if Path(p).suffix in SCORE_SUFFIXES[source])
    return tuple(pool)


def _title(piece_id: str) -> str:
    source, name = piece_id.split("/", 1)
    stem = name.rsplit(".", 1)[0]
    if source == "bach":
        return f"{SOURCE_LABELS[source]} BWV {stem.removeprefix('bwv')}"
    if source == "monteverdi":
        return f"{SOURCE_LABELS[source]} {stem.removeprefix('madrigal.')}"
    return f"{SOURCE_LABELS[source]} {stem.replace('_', ' ')}"


@functools.lru_cache(maxsize=128)
def load_piece(piece_id: str, max_voices: int) -> Piece:
    """Parse a corpus score into voices (duplicates removed, top voice first, at most ``max_voices``).

    When a score has more voices than ``max_voices``, the top ``max_voices - 1`` and the bass are kept.

    Raises:
        ScoreError: if music21 cannot parse the score or it has no pitched notes.
    """
    from music21 import converter

    path = _music21_root() / piece_id
    try:
        score = converter.parse(str(path))
    except Exception as exc:  # music21 raises many unrelated types for bad scores
        raise ScoreError(f"{piece_id}: music21 could not parse it ({type(exc).__name__}: {exc})") from None
    voices: list[np.ndarray] = []
    seen: set[bytes] = set()
    for part in getattr(score, "parts", [score]):
        rows = []
        for element in part.stripTies(inPlace=False).flatten().notes:
            duration = float(element.quarterLength)
            if duration <= 0:  # grace notes
                continue
            onset = float(element.offset)
            rows += [(onset, duration, float(p.midi)) for p in element.pitches]
        if not rows:
            continue
        notes = np.array(sorted(rows), dtype=np.float64)
        key = notes.tobytes()
        if key in seen:  # instrumental doublings of a sung line
            continue
        seen.add(key)
        voices.append(notes)
    if not voices:
        raise ScoreError(f"{piece_id}: no pitched notes")
    voices.sort(key=lambda v: -float(np.average(v[:, 2], weights=v[:, 1])))
    if len(voices) > max_voices:
        voices = [*voices[: max_voices - 1], voices[-1]] if max_voices > 1 else voices[:1]
    length_q = max(float((v[:, 0] + v[:, 1]).max()) for v in voices)
    return Piece(piece_id=piece_id, title=_title(piece_id), voices=tuple(voices), length_q=length_q)
