"""The built-in corpus: real compositions rendered to audio, with captions and per-frame curves.

Clip ``i`` of a corpus is a pure function of ``(seed, i)`` and the audio/curve settings: a piece and
excerpt from music21's corpus, General MIDI instruments per voice from an ensemble, tempo,
transposition and mix. The same seed gives the same bytes on any number of workers.

Output folder (loadable with ``datasets.load_dataset("audiofolder", data_dir=root)``)::

    root/
      corpus.json          the settings it was built with, counts and timing
      metadata.jsonl       one row per clip: file_name, caption, facts, and curves
                           (f0_hz, loudness_db, brightness_hz: one value per frame)
      audio/clip_00000.flac
      midi/clip_00000.mid  the exact MIDI that was rendered
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pretty_midi

from lmdm.audio.features import FeatureFrames, loudness_db, spectral_centroid
from lmdm.audio.io import write_audio
from lmdm.config.schema import AudioConfig, CorpusConfig
from lmdm.data.captions import caption, estimate_key, key_name
from lmdm.data.render import Voice, build_midi, render_midi
from lmdm.data.scores import Piece, ScoreError, corpus_pool, load_piece

__all__ = [
    "ENSEMBLE_PROGRAMS",
    "Clip",
    "ClipSpec",
    "CorpusExistsError",
    "CorpusSummary",
    "build_corpus",
    "corpus_seed",
    "load_corpus_dataset",
    "make_clip",
    "read_corpus_metadata",
    "score_f0",
]

# General MIDI programs per ensemble and role (top voice, inner voices, bass).
ENSEMBLE_PROGRAMS: dict[str, dict[str, tuple[int, ...]]] = {
    "piano": {"top": (0, 1), "inner": (0, 1), "bass": (0, 1)},
    "strings": {"top": (40,), "inner": (40, 41), "bass": (42, 43)},
    "organ": {"top": (20,), "inner": (20, 19), "bass": (19, 20)},  # 16 (drawbar) sounds an octave low
    "choir": {"top": (52, 53), "inner": (52, 53), "bass": (52, 53)},
    "winds": {"top": (73, 68), "inner": (71, 69, 60), "bass": (70,)},
    "brass": {"top": (56, 60), "inner": (60, 57), "bass": (58, 57)},
    "plucked": {"top": (24, 46), "inner": (24, 25, 46), "bass": (32, 24)},
}
MAX_PIECE_ATTEMPTS = 16
MAX_START_ATTEMPTS = 8
MIN_SOUNDING_SHARE = 0.8  # of the excerpt's beats with at least one kept voice sounding
MIN_USABLE_SHARE = 0.3  # below this the piece is drawn again


class CorpusExistsError(RuntimeError):
    """The output folder holds a corpus built with different settings."""


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip (drawn from ``(seed, index)``)."""

    index: int
    piece_id: str
    ensemble: str
    voices: tuple[int, ...]  # indices into the piece's voices, top first
    programs: tuple[int, ...]
    tempo_bpm: int
    transpose: int
    start_q: float
    velocities: tuple[int, ...]
    gain_db: float
    solo: bool

    @property
    def clip_id(self) -> str:
        return f"clip_{self.index:05d}"


@dataclass(frozen=True)
class CorpusSummary:
    """What a build produced."""

    root: Path
    num_clips: int
    seconds: float
    build_seconds: float
    reused: bool


def _draw_spec(index: int, cfg: CorpusConfig, solo_override: bool | None = None) -> tuple[ClipSpec, Piece]:
    """Draw clip ``index``'s piece, excerpt, arrangement and mix from ``(seed, index)``."""
    rng = np.random.default_rng([cfg.seed, index])
    errors = []
    for _ in range(MAX_PIECE_ATTEMPTS):
        source = cfg.sources[int(rng.integers(len(cfg.sources)))]  # sources equally likely, whatever their size
        pool = corpus_pool((source,))
        piece_id = pool[int(rng.integers(len(pool)))]
        try:
            piece = load_piece(piece_id, cfg.max_voices)
        except ScoreError as exc:
            errors.append(str(exc))
            continue
        ensemble = cfg.ensembles[int(rng.integers(len(cfg.ensembles)))]
        solo = bool(rng.random() < cfg.solo_probability)
        solo = (solo if solo_override is None else solo_override) or len(piece.voices) == 1
        candidates = (0,) if solo else tuple(range(len(piece.voices)))
        lo, hi = int(np.ceil(cfg.tempo_bpm[0])), int(np.floor(cfg.tempo_bpm[1]))
        bpm = int(rng.integers(lo, max(lo, hi) + 1))
        transpose = int(rng.integers(cfg.transpose[0], cfg.transpose[1] + 1))
        clip_q = cfg.clip_seconds * bpm / 60.0
        spare = int(np.floor(piece.length_q - clip_q))
        start_q, best = 0.0, -1.0
        for _ in range(MAX_START_ATTEMPTS):  # prefer an excerpt in which the kept voices mostly sound
            candidate = float(rng.integers(0, spare + 1)) if spare > 0 else 0.0
            active = _sounding_share(tuple(piece.voices[v] for v in candidates), piece.length_q, candidate, clip_q)
            if active > best:
                start_q, best = candidate, active
            if active >= MIN_SOUNDING_SHARE:
                break
        # Voices with no note in the excerpt are not part of the arrangement (nor of the caption).
        voices = tuple(v for v in candidates if len(_excerpt(piece.voices[v], piece.length_q, start_q, clip_q)))
        if best < MIN_USABLE_SHARE or not voices:
            errors.append(f"{piece_id}: its best excerpt sounds only {max(best, 0.0):.0%} of the time")
            continue
        table = ENSEMBLE_PROGRAMS[ensemble]
        programs = []
        for rank in range(len(voices)):
            role = "top" if rank == 0 else ("bass" if rank == len(voices) - 1 else "inner")
            options = table[role]
            programs.append(int(options[int(rng.integers(len(options)))]))
        velocities = tuple(min(127, int(rng.integers(64, 100)) + (12 if rank == 0 else 0)) for rank in range(len(voices)))
        gain_db = float(np.round(rng.uniform(-6.0, 0.0), 2))
        spec = ClipSpec(index, piece_id, ensemble, voices, tuple(programs), bpm, transpose, start_q, velocities, gain_db, solo)
        return spec, piece
    raise ScoreError(f"clip {index}: no usable piece in {MAX_PIECE_ATTEMPTS} draws: {errors}")


def _excerpt(notes: np.ndarray, length_q: float, start_q: float, clip_q: float) -> np.ndarray:
    """Notes of ``[start_q, start_q + clip_q)``, looping the piece when it is shorter; ``(n, 3)`` in quarters."""
    repeats = int(np.ceil((start_q + clip_q) / length_q))
    parts = []
    for k in range(repeats):
        onset = notes[:, 0] + k * length_q - start_q
        end = np.minimum(onset + notes[:, 1], clip_q)
        keep = (onset < clip_q) & (end > 0)
        parts.append(np.stack([np.maximum(onset[keep], 0.0), end[keep], notes[keep, 2]], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 3))


def _sounding_share(voices: tuple[np.ndarray, ...], length_q: float, start_q: float, clip_q: float) -> float:
    """Share of the excerpt (sampled every 1/8 beat) during which at least one of ``voices`` sounds."""
    grid = np.arange(0.0, clip_q, 0.125)
    sounding = np.zeros(grid.shape, dtype=bool)
    for notes in voices:
        for start, end, _ in _excerpt(notes, length_q, start_q, clip_q):
            sounding[(grid >= start) & (grid < end)] = True
    return float(sounding.mean()) if grid.size else 0.0


def score_f0(voices: list[np.ndarray], times: np.ndarray) -> np.ndarray:
    """Top-voice f0 per frame: the highest sounding pitch at each frame time, 0 when silent.

    Args:
        voices: per voice ``(n, 3)`` ``[start_s, end_s, midi_pitch]``.
        times: ``(F,)`` frame centre times in seconds.

    Returns:
        ``(F,)`` float32 Hz.
    """
    top = np.full(times.shape, -1.0)
    for notes in voices:
        for start, end, pitch in notes:
            lo, hi = np.searchsorted(times, [start, end], side="left")
            top[lo:hi] = np.maximum(top[lo:hi], pitch)
    return np.where(top >= 0, 440.0 * 2.0 ** ((top - 69.0) / 12.0), 0.0).astype(np.float32)


@dataclass(frozen=True)
class Clip:
    """A rendered clip with its MIDI, facts and curves."""

    spec: ClipSpec
    audio: np.ndarray  # (C, N) float32
    midi: bytes
    metadata: dict[str, Any]


def make_clip(index: int, cfg: CorpusConfig, audio: AudioConfig, frame_rate: int, solo: bool | None = None) -> Clip:
    """Render clip ``index`` of the corpus ``cfg`` (pure function of its arguments).

    Args:
        solo: force a top-voice-only (``True``) or full (``False``) arrangement; ``None`` follows the seed.
    """
    spec, piece = _draw_spec(index, cfg, solo)
    seconds_per_q = 60.0 / spec.tempo_bpm
    clip_q = cfg.clip_seconds / seconds_per_q
    voices_s: list[np.ndarray] = []
    voices: list[Voice] = []
    n_voices = len(spec.voices)
    for v, notes in enumerate(piece.voices[i] for i in spec.voices):
        ex = _excerpt(notes, piece.length_q, spec.start_q, clip_q)
        ex[:, :2] *= seconds_per_q
        ex[:, 2] += spec.transpose
        ex = ex[(ex[:, 2] >= 0) & (ex[:, 2] <= 127) & (ex[:, 1] - ex[:, 0] > 1e-3)]
        voices_s.append(ex)
        pan = 64 if n_voices == 1 else round(24 + 80 * v / (n_voices - 1))
        voices.append(Voice(program=spec.programs[v], notes=ex, velocity=spec.velocities[v], pan=pan))
    midi = build_midi(voices, spec.tempo_bpm)
    num_samples = round(cfg.clip_seconds * audio.sample_rate)
    wave = render_midi(midi, audio.sample_rate, audio.channels, num_samples)
    peak = float(np.abs(wave).max())
    if peak > 0:
        wave *= 0.9 * 10.0 ** (spec.gain_db / 20.0) / peak
    grid = FeatureFrames(audio.sample_rate, frame_rate)
    times = grid.times(num_samples)
    all_notes = np.concatenate(voices_s)
    tonic, mode = estimate_key(all_notes[:, 2], all_notes[:, 1] - all_notes[:, 0])
    instruments = [pretty_midi.program_to_instrument_name(p).lower() for p in spec.programs]
    key = key_name(tonic, mode)
    metadata: dict[str, Any] = {
        "file_name": f"audio/{spec.clip_id}.flac",
        "clip_id": spec.clip_id,
        "caption": caption(piece.title, spec.ensemble, instruments, spec.tempo_bpm, key, spec.solo),
        "piece_id": spec.piece_id,
        "title": piece.title,
        "ensemble": spec.ensemble,
        "instruments": instruments,
        "programs": list(spec.programs),
        "tempo_bpm": spec.tempo_bpm,
        "key": key,
        "transpose": spec.transpose,
        "start_beat": spec.start_q,
        "solo": spec.solo,
        "sample_rate": audio.sample_rate,
        "channels": audio.channels,
        "seconds": cfg.clip_seconds,
        "frame_rate": frame_rate,
        "f0_hz": _rounded(score_f0(voices_s[:1] if spec.solo else voices_s, times)),
        "loudness_db": _rounded(loudness_db(wave, audio.sample_rate, frame_rate)),
        "brightness_hz": _rounded(spectral_centroid(wave, audio.sample_rate, frame_rate)),
    }
    return Clip(spec=spec, audio=wave, midi=midi, metadata=metadata)


def _rounded(curve: np.ndarray) -> list[float]:
    return [round(float(x), 3) for x in curve]


def _fingerprint(cfg: CorpusConfig, audio: AudioConfig, frame_rate: int) -> dict[str, Any]:
    """The settings that determine the corpus bytes (not the worker count)."""
    from importlib.metadata import version

    corpus = cfg.model_dump(mode="json", exclude={"workers"})
    return {
        "corpus": corpus,
        "audio": audio.model_dump(mode="json"),
        "frame_rate": frame_rate,
        "music21": version("music21"),
        "format": 1,
    }


def _render_to(args: tuple[int, CorpusConfig, AudioConfig, int, str]) -> int:
    index, cfg, audio, frame_rate, folder = args
    out = Path(folder)
    clip = make_clip(index, cfg, audio, frame_rate)
    write_audio(out / clip.metadata["file_name"], clip.audio, audio.sample_rate)
    (out / "midi" / f"{clip.spec.clip_id}.mid").write_bytes(clip.midi)
    row = out / "rows" / f"{clip.spec.clip_id}.json"
    row.with_suffix(".tmp").write_text(json.dumps(clip.metadata))
    row.with_suffix(".tmp").replace(row)  # the row appears only once audio and MIDI are on disk
    return index


def build_corpus(
    root: Path,
    cfg: CorpusConfig,
    audio: AudioConfig,
    frame_rate: int,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CorpusSummary:
    """Build (or reuse, or finish) the corpus in ``root``.

    The build writes into ``root.partial/`` and renames it to ``root`` when every clip is there, so a
    folder named ``root`` is always complete; an interrupted build resumes where it stopped.

    Args:
        progress: called as ``progress(done, total)`` after each clip.

    Raises:
        CorpusExistsError: ``root`` holds a corpus built with other settings and ``force`` is off.
    """
    root = Path(root)
    fingerprint = _fingerprint(cfg, audio, frame_rate)
    manifest = root / "corpus.json"
    if root.exists():
        if manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint and not force:
            info = json.loads(manifest.read_text())
            if "held_out" not in info:  # a corpus built before the split was recorded
                info["held_out"] = _held_out_record(cfg)
                manifest.write_text(json.dumps(info, indent=2))
            if progress:  # nothing to render: report it complete
                progress(info["num_clips"], info["num_clips"])
            return CorpusSummary(root, info["num_clips"], info["seconds"], info["build_seconds"], reused=True)
        if not force:
            raise CorpusExistsError(
                f"{root} holds a corpus built with other settings (see {manifest}); choose another data.root, or pass --force to rebuild it"
            )
        shutil.rmtree(root)
    partial = root.with_name(root.name + ".partial")
    stamp = partial / "fingerprint.json"
    if partial.exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != fingerprint):
        shutil.rmtree(partial)
    for sub in ("audio", "midi", "rows"):
        (partial / sub).mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(fingerprint))
    started = time.perf_counter()
    todo = [i for i in range(cfg.num_clips) if not (partial / "rows" / f"clip_{i:05d}.json").is_file()]
    done = cfg.num_clips - len(todo)
    if progress:
        progress(done, cfg.num_clips)
    jobs = [(i, cfg, audio, frame_rate, str(partial)) for i in todo]
    workers = min(cfg.workers, max(1, len(todo)), os.cpu_count() or 1)
    if workers == 1:
        for _ in map(_render_to, jobs):
            done += 1
            if progress:
                progress(done, cfg.num_clips)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for _ in pool.map(_render_to, jobs, chunksize=4):
                done += 1
                if progress:
                    progress(done, cfg.num_clips)
    with (partial / "metadata.jsonl").open("w") as f:
        for i in range(cfg.num_clips):
            f.write((partial / "rows" / f"clip_{i:05d}.json").read_text() + "\n")
    shutil.rmtree(partial / "rows")
    stamp.unlink()
    build_seconds = time.perf_counter() - started
    info = {
        "fingerprint": fingerprint,
        "num_clips": cfg.num_clips,
        "seconds": cfg.num_clips * cfg.clip_seconds,
        "build_seconds": round(build_seconds, 2),
        "held_out": _held_out_record(cfg),
    }
    (partial / "corpus.json").write_text(json.dumps(info, indent=2))
    partial.rename(root)
    return CorpusSummary(root, cfg.num_clips, info["seconds"], build_seconds, reused=False)


def _held_out_record(cfg: CorpusConfig) -> dict[str, Any]:
    from lmdm.data.split import HELD_OUT_FRACTION, SPLIT_RULE, held_out_indices

    clips = [f"clip_{i:05d}" for i in held_out_indices(cfg.seed, cfg.num_clips)]
    return {"rule": SPLIT_RULE, "fraction": HELD_OUT_FRACTION, "clips": clips}


def corpus_seed(root: Path) -> int:
    """The seed a built corpus was made with (its ``corpus.json``), which fixes its held-out split."""
    manifest = Path(root) / "corpus.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} is missing: {root} is not a built corpus (run `lmdm data build`)")
    return int(json.loads(manifest.read_text())["fingerprint"]["corpus"]["seed"])


def read_corpus_metadata(root: Path) -> list[dict[str, Any]]:
    """The rows of a built corpus' ``metadata.jsonl``."""
    with (Path(root) / "metadata.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]


def load_corpus_dataset(root: Path) -> Any:
    """The corpus as a ``datasets.Dataset`` (every metadata column, plus ``audio_path``, absolute).

    Audio stays as files: decode rows with :func:`lmdm.audio.io.load_audio` (``datasets``' own audio
    decoding needs torchcodec and FFmpeg, which the pinned stack does not carry).
    """
    import datasets

    root = Path(root).resolve()
    ds = datasets.Dataset.from_json(str(root / "metadata.jsonl"))
    return ds.add_column("audio_path", [str(root / name) for name in ds["file_name"]])
