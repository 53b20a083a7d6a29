"""Inputs for latent precomputation: list every input once, then decode, resample and cut each into
fixed-length chunks with its sketch curves at the latent rate. Pure functions (Ray runs them as tasks).

A chunk is ``chunk_frames`` latent frames = ``chunk_frames · R`` samples (R = autoencoder
downsampling ratio). A tail shorter than a chunk is not used (counted, not an error); an input
shorter than one chunk is reported as skipped with its length.

Legend: C audio channels, N samples, F curve frames, T latent frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmdm.audio.features import f0_pyin, loudness_db, spectral_centroid
from lmdm.audio.io import AUDIO_EXTENSIONS, AudioReadError, decode_audio, load_audio
from lmdm.data.split import Split

__all__ = ["InputRecord", "chunk_input", "curves_at_latent_rate", "list_inputs"]

CURVES = ("f0_hz", "loudness_db", "brightness_hz")


@dataclass(frozen=True)
class InputRecord:
    """One input to precompute.

    Attributes:
        index: position in the input list of its split (fixes the shard it belongs to).
        input_id: stable id (relative path, ``dataset[row]`` or corpus clip id).
        path: file to decode, or the saved dataset folder for ``hf_disk``.
        row: dataset row for ``hf_disk`` inputs.
        caption: text caption ("" when none).
        curves: per-frame curves at ``frame_rate`` (the corpus' exact ones), else computed from audio.
    """

    index: int
    input_id: str
    path: str
    caption: str = ""
    row: int | None = None
    frame_rate: int = 0
    curves: dict[str, list[float]] = field(default_factory=dict)


def list_inputs(source: str, path: Path, captions: Path | None = None, split: Split = "all") -> list[InputRecord]:
    """Every input of a data source (of one split), in a stable order.

    Args:
        source: ``corpus`` (a built corpus folder), ``folder`` (audio files) or ``hf_disk``.
        path: the corpus root, the audio folder or the saved dataset.
        captions: CSV/JSONL captions for a folder.
        split: ``train`` (what every training stage reads: the corpus without its held-out reference),
            ``held_out`` (the reference, :mod:`lmdm.data.split`) or ``all``. Other sources are all ``train``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path).resolve()  # absolute: Ray tasks run in other working directories
    if not path.exists():
        raise FileNotFoundError(f"{source} input {path} does not exist")
    if source == "corpus":
        from lmdm.data.corpus import corpus_seed, read_corpus_metadata
        from lmdm.data.split import is_held_out

        seed = corpus_seed(path)
        rows = [row for i, row in enumerate(read_corpus_metadata(path)) if split == "all" or is_held_out(seed, i) == (split == "held_out")]
        return [
            InputRecord(
                i,
                row["clip_id"],
                str(path / row["file_name"]),
                row["caption"],
                frame_rate=int(row["frame_rate"]),
                curves={k: row[k] for k in CURVES},
            )
            for i, row in enumerate(rows)
        ]
    if split == "held_out":
        return []
    if source == "folder":
        from lmdm.data.readers import read_captions

        texts = read_captions(captions) if captions is not None else {}
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
        return [
            InputRecord(i, f.relative_to(path).as_posix(), str(f), texts.get(f.relative_to(path).as_posix(), ""))
            for i, f in enumerate(files)
        ]
    if source == "hf_disk":
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        caption_column = next((c for c in ("caption", "text", "prompt", "description") if c in ds.column_names), None)
        row_texts: list[Any] = list(ds[caption_column]) if caption_column else [""] * ds.num_rows
        return [InputRecord(i, f"row{i:06d}", str(path), str(row_texts[i] or ""), row=i) for i in range(ds.num_rows)]
    raise ValueError(f"unknown data source {source!r}; expected corpus, folder or hf_disk")


def _load(record: InputRecord, sample_rate: int, channels: int) -> np.ndarray:
    if record.row is None:
        return load_audio(record.path, sample_rate, channels)
    import datasets

    ds = datasets.load_from_disk(record.path)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if isinstance(ds.features.get("audio"), datasets.Audio):
        ds = ds.cast_column("audio", datasets.Audio(decode=False))
    cell: Any = ds[record.row]["audio"]
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not data:
        raise AudioReadError(record.input_id, "no audio bytes in this row")
    return decode_audio(bytes(data), sample_rate, channels, source=record.input_id)


def curves_at_latent_rate(
    curves: dict[str, list[float]] | dict[str, np.ndarray], frame_rate: int, latent_rate: float, frames: int, start_frame: int
) -> dict[str, np.ndarray]:
    """Resample per-frame curves to latent frames ``start_frame … start_frame + frames − 1``.

    Latent frame ``i`` covers samples ``[i·R, (i+1)·R)``; its value is read at its centre. f0 takes
    the nearest curve frame (so notes do not glide and silence stays 0); loudness and brightness are
    linearly interpolated.

    Returns:
        Each curve ``(frames,)`` float32.
    """
    centre = (np.arange(start_frame, start_frame + frames) + 0.5) / latent_rate  # seconds
    out = {}
    for name, values in curves.items():
        v = np.asarray(values, dtype=np.float64)
        grid = np.arange(v.shape[0]) / frame_rate
        if name == "f0_hz":
            idx = np.clip(np.round(centre * frame_rate).astype(np.int64), 0, v.shape[0] - 1)
            out[name] = v[idx].astype(np.float32)
        else:
            out[name] = np.interp(centre, grid, v).astype(np.float32)
    return out


def chunk_input(
    record: InputRecord, sample_rate: int, channels: int, ratio: int, chunk_frames: int, frame_rate: int = 50, pitch: bool = True
) -> tuple[list[dict[str, Any]], str | None]:
    """Decode one input and cut it into chunks.

    Returns:
        ``(chunks, error)``: each chunk a dict with ``input_index``, ``input_id``, ``chunk``, ``caption``,
        ``audio`` ``(C, chunk_frames·R)`` float32 and its curves at the latent rate; ``error`` is the
        reason the input was skipped (``chunks`` then empty).
    """
    try:
        audio = _load(record, sample_rate, channels)
    except AudioReadError as exc:
        return [], exc.reason
    except (OSError, ValueError, KeyError, IndexError) as exc:
        return [], f"unreadable ({type(exc).__name__}: {exc})"
    size = chunk_frames * ratio
    count = audio.shape[-1] // size
    if count == 0:
        return [], f"too short: {audio.shape[-1] / sample_rate:.2f} s < one chunk of {size / sample_rate:.2f} s"
    curves: dict[str, Any]
    if record.curves:
        curves, rate = dict(record.curves), record.frame_rate
    else:
        loud = loudness_db(audio, sample_rate, frame_rate)
        f0 = f0_pyin(audio, sample_rate, frame_rate) if pitch else np.zeros_like(loud)
        curves, rate = {"f0_hz": f0, "loudness_db": loud, "brightness_hz": spectral_centroid(audio, sample_rate, frame_rate)}, frame_rate
    latent_rate = sample_rate / ratio
    chunks = []
    for c in range(count):
        chunk = {
            "input_index": record.index,
            "input_id": record.input_id,
            "chunk": c,
            "caption": record.caption,
            "audio": np.ascontiguousarray(audio[:, c * size : (c + 1) * size], dtype=np.float32),
        }
        chunk.update(curves_at_latent_rate(curves, rate, latent_rate, chunk_frames, c * chunk_frames))
        chunks.append(chunk)
    return chunks, None
