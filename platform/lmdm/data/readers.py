"""Readers for a user's audio: a folder of files (with an optional captions file), a ``datasets``
dataset saved to disk, and the built-in corpus.

Every reader yields :class:`AudioClip` s at the requested rate and channel count and records every
input it could not use in a :class:`ReadReport` (path and reason). A bad file never stops a run and
is never dropped silently.

``datasets``' own ``Audio`` decoding needs torchcodec (and system FFmpeg libraries), which the pinned
stack does not have; the readers therefore read the ``Audio`` column undecoded (``bytes``/``path``)
and decode with soundfile, like every other input.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmdm.audio.io import AUDIO_EXTENSIONS, AudioReadError, decode_audio, load_audio

__all__ = [
    "AudioClip",
    "CaptionsError",
    "ReadReport",
    "SkippedInput",
    "iter_audio_folder",
    "iter_corpus",
    "iter_hf_dataset",
    "read_captions",
]

CAPTION_KEYS = ("caption", "text", "prompt", "description")
FILE_KEYS = ("file_name", "file", "path", "filename", "audio")


class CaptionsError(ValueError):
    """The captions file is malformed (the message names the file and line)."""


@dataclass(frozen=True)
class AudioClip:
    """One usable input.

    Attributes:
        source: path (or ``dataset[row]``) it came from.
        audio: ``(C, N)`` float32 at the reader's sample rate.
        caption: text caption, ``""`` when none was given.
        extra: any other metadata the input carried (curves for the corpus).
    """

    source: str
    audio: np.ndarray
    sample_rate: int
    caption: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return float(self.audio.shape[-1] / self.sample_rate)


@dataclass(frozen=True)
class SkippedInput:
    """An input that was not used, and why."""

    source: str
    reason: str


@dataclass
class ReadReport:
    """What a reader did: counts, inputs skipped with reasons, inputs without a caption."""

    read: int = 0
    seconds: float = 0.0
    skipped: list[SkippedInput] = field(default_factory=list)
    uncaptioned: list[str] = field(default_factory=list)

    def skip(self, source: str, reason: str) -> None:
        self.skipped.append(SkippedInput(source, reason))

    def add(self, clip: AudioClip) -> None:
        self.read += 1
        self.seconds += clip.seconds
        if not clip.caption:
            self.uncaptioned.append(clip.source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "seconds": round(self.seconds, 3),
            "skipped": [{"source": s.source, "reason": s.reason} for s in self.skipped],
            "uncaptioned": len(self.uncaptioned),
        }


def read_captions(path: Path) -> dict[str, str]:
    """Captions keyed by file path relative to the folder (CSV with a header, or JSONL).

    Each row needs a file column (one of ``file_name, file, path, filename, audio``) and a caption
    column (one of ``caption, text, prompt, description``).

    Raises:
        CaptionsError: unreadable file, bad JSON line, or missing columns (names file and line).
    """
    path = Path(path)
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="") as f:
                rows = [(i + 2, row) for i, row in enumerate(csv.DictReader(f))]
        elif path.suffix.lower() in (".jsonl", ".json"):
            with path.open() as f:
                for i, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise CaptionsError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise CaptionsError(f"{path}:{i}: expected a JSON object per line")
                    rows.append((i, row))
        else:
            raise CaptionsError(f"{path}: captions must be .csv or .jsonl, got {path.suffix or 'no suffix'!r}")
    except OSError as exc:
        raise CaptionsError(f"{path}: cannot read captions ({exc.strerror})") from None
    captions: dict[str, str] = {}
    for line_no, row in rows:
        file_key = next((k for k in FILE_KEYS if row.get(k)), None)
        text_key = next((k for k in CAPTION_KEYS if k in row), None)
        if file_key is None or text_key is None:
            raise CaptionsError(
                f"{path}:{line_no}: needs a file column ({', '.join(FILE_KEYS)}) and a caption column "
                f"({', '.join(CAPTION_KEYS)}); found {sorted(row)}"
            )
        captions[Path(str(row[file_key])).as_posix()] = str(row[text_key] or "")
    return captions


def _check_length(clip: AudioClip, min_seconds: float) -> str | None:
    if clip.seconds < min_seconds:
        return f"too short: {clip.seconds:.2f} s < min_seconds {min_seconds:g} s"
    return None


def iter_audio_folder(
    root: Path,
    sample_rate: int,
    channels: int,
    report: ReadReport,
    captions: Path | None = None,
    min_seconds: float = 0.0,
) -> Iterator[AudioClip]:
    """Yield every usable audio file under ``root`` (recursive, sorted), recording the rest in ``report``.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        CaptionsError: the captions file is malformed.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder {root} does not exist or is not a folder")
    texts = read_captions(captions) if captions is not None else {}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    found = {p.relative_to(root).as_posix() for p in files}
    for name in sorted(set(texts) - found):
        report.skip(str(root / name), "listed in the captions file, but no such audio file")
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            audio = load_audio(path, sample_rate, channels)
        except AudioReadError as exc:
            report.skip(str(path), exc.reason)
            continue
        clip = AudioClip(str(path), audio, sample_rate, texts.get(rel, ""))
        reason = _check_length(clip, min_seconds)
        if reason:
            report.skip(str(path), reason)
            continue
        report.add(clip)
        yield clip


def iter_hf_dataset(
    path: Path,
    sample_rate: int,
    channels: int,
    report: ReadReport,
    audio_column: str = "audio",
    caption_column: str | None = None,
    min_seconds: float = 0.0,
) -> Iterator[AudioClip]:
    """Yield clips from a ``datasets`` dataset saved with ``save_to_disk`` (a ``Dataset`` or one split).

    The audio column may be an ``Audio`` feature, encoded bytes, a file path, or
    ``{"array", "sampling_rate"}``. The caption column defaults to the first of
    ``caption, text, prompt, description`` present.

    Raises:
        FileNotFoundError: nothing loadable at ``path``.
        KeyError: the audio or caption column is missing (lists the columns there are).
    """
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no dataset saved with save_to_disk at {path} ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    columns = list(ds.column_names)
    if audio_column not in columns:
        raise KeyError(f"{path}: no audio column {audio_column!r}; columns are {columns}")
    if caption_column is None:
        caption_column = next((c for c in CAPTION_KEYS if c in columns), None)
    elif caption_column not in columns:
        raise KeyError(f"{path}: no caption column {caption_column!r}; columns are {columns}")
    if isinstance(ds.features[audio_column], datasets.Audio):
        ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
    for i, row in enumerate(ds):
        source = f"{path}[{i}]"
        try:
            audio = _decode_cell(row[audio_column], sample_rate, channels, source, Path(path))
        except AudioReadError as exc:
            report.skip(source, exc.reason)
            continue
        text = str(row[caption_column] or "") if caption_column else ""
        clip = AudioClip(source, audio, sample_rate, text)
        reason = _check_length(clip, min_seconds)
        if reason:
            report.skip(source, reason)
            continue
        report.add(clip)
        yield clip


def _decode_cell(cell: Any, sample_rate: int, channels: int, source: str, base: Path) -> np.ndarray:
    from lmdm.audio.io import resample, to_channels

    if isinstance(cell, dict) and cell.get("array") is not None:
        array = np.asarray(cell["array"], dtype=np.float32)
        array = array[None, :] if array.ndim == 1 else array
        if array.size == 0:
            raise AudioReadError(source, "empty: the array holds no samples")
        return resample(to_channels(array, channels), int(cell["sampling_rate"]), sample_rate)
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return decode_audio(bytes(cell["bytes"]), sample_rate, channels, source=source)
        cell = cell.get("path")
    if isinstance(cell, bytes | bytearray):
        if not cell:
            raise AudioReadError(source, "empty: 0 bytes")
        return decode_audio(bytes(cell), sample_rate, channels, source=source)
    if isinstance(cell, str) and cell:
        file = Path(cell) if Path(cell).is_absolute() else base / cell
        return load_audio(file, sample_rate, channels)
    raise AudioReadError(source, f"no audio in this row (got {type(cell).__name__})")


def iter_corpus(root: Path, sample_rate: int, channels: int, report: ReadReport) -> Iterator[AudioClip]:
    """Yield the clips of a built corpus with their captions and curves in ``extra``."""
    from lmdm.data.corpus import read_corpus_metadata

    for row in read_corpus_metadata(root):
        path = Path(root) / row["file_name"]
        try:
            audio = load_audio(path, sample_rate, channels)
        except AudioReadError as exc:
            report.skip(str(path), exc.reason)
            continue
        extra = {k: v for k, v in row.items() if k not in ("file_name", "caption")}
        clip = AudioClip(str(path), audio, sample_rate, row["caption"], extra)
        report.add(clip)
        yield clip
