"""``lmdm score``: how close a set of audio is to the corpus's held-out reference, with the floors beside it.

Figures, each for the evaluated set and for two floors at the same size:

- **FAD** (and FAD∞ where there are enough frames) in an audio embedder's space (CREPE by default,
  or a CLAP checkpoint), and the per-clip FAD of each evaluated clip;
- **CLAP score**: the audio–prompt cosine in a text–audio embedder's space (the built-in embedder by
  default), where the evaluated clips have prompts; the held-out clips against their own captions are
  its reference (what real audio of those captions scores);
- **likeness** (:mod:`lmdm.eval.likeness`): pitch classes, loudness, brightness, onset rate and
  pitch-change rate against the reference's.

Floors: the **training** split's clips (the data's own floor: what another sample of real music scores)
and, given an autoencoder, those clips **reconstructed** through it (the floor for any generator on
its latents). Both are cut to the evaluated set's length in seconds, so the FADs are at one N.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmdm.audio.io import load_audio
from lmdm.config import Config
from lmdm.data.corpus import corpus_seed, read_corpus_metadata
from lmdm.data.split import SPLIT_RULE, is_held_out
from lmdm.eval.embedders import Embedder, TextAudioEmbedder, load_embedder
from lmdm.eval.fad import fad_inf, frechet_distance
from lmdm.eval.likeness import AudioStats, audio_stats, likeness
from lmdm.eval.metrics import clap_scores, per_clip_fad

__all__ = ["AudioSet", "audio_folder", "embed_frames", "held_out_reference", "reconstructed", "run_score", "score_sets", "training_clips"]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
FAD_INF_MIN_FRAMES = 2000  # below this many frames FAD∞'s fit is noise: reported as null


@dataclass
class AudioSet:
    """Clips ``(C, S)`` at ``sample_rate`` with their prompts (``None`` where there is none)."""

    name: str
    clips: list[np.ndarray]
    prompts: list[str | None]
    sample_rate: int
    files: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(c.shape[-1] for c in self.clips) / self.sample_rate


def held_out_reference(cfg: Config, min_clips: int = 0, progress: Callable[[str], None] | None = None) -> AudioSet:
    """The held-out clips of the corpus at ``data.root`` (:mod:`lmdm.data.split`), with their captions.

    Where the corpus holds fewer than ``min_clips`` (a small one: 48 clips hold out 3), further held-out
    clips of the same seed and settings are rendered past its last index into ``<data.root>-reference/``
    (once; reused after). They are clips any corpus of that seed holds out, so no training stage ever
    sees them, and FAD gets a reference with enough frames to mean something.
    """
    root = Path(cfg.data.root)
    seed = corpus_seed(root)
    rows = read_corpus_metadata(root)
    held = [(root, r) for i, r in enumerate(rows) if is_held_out(seed, i)]
    if len(held) < min_clips:
        held += _rendered_held_out(root, len(rows), min_clips - len(held), progress)
    if not held:
        raise ValueError(f"{root} holds no held-out clip (split rule {SPLIT_RULE}): build a corpus of more clips (data.corpus.num_clips)")
    clips = [load_audio(folder / r["file_name"], cfg.audio.sample_rate, cfg.audio.channels) for folder, r in held]
    return AudioSet("held-out reference", clips, [r["caption"] for _, r in held], cfg.audio.sample_rate, [r["file_name"] for _, r in held])


def _rendered_held_out(root: Path, start: int, count: int, progress: Callable[[str], None] | None) -> list[tuple[Path, dict[str, Any]]]:
    """``count`` held-out clips past index ``start`` of the corpus at ``root``, rendered with its settings
    into ``<root>-reference/`` (kept, and reused while those settings stay the same)."""
    import json
    import shutil

    from lmdm.audio.io import write_audio
    from lmdm.config.schema import AudioConfig, CorpusConfig
    from lmdm.data.corpus import make_clip

    fingerprint = json.loads((root / "corpus.json").read_text())["fingerprint"]
    settings = {**fingerprint, "corpus": {k: v for k, v in fingerprint["corpus"].items() if k != "num_clips"}}
    folder = root.with_name(root.name + "-reference")
    manifest = folder / "reference.json"
    if folder.exists() and (not manifest.is_file() or json.loads(manifest.read_text()) != settings):
        shutil.rmtree(folder)  # rendered for other corpus settings: its clips are not this corpus's
    (folder / "rows").mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(settings, sort_keys=True))
    corpus = CorpusConfig(**{**fingerprint["corpus"], "workers": 1})
    audio = AudioConfig(**fingerprint["audio"])
    found: list[tuple[Path, dict[str, Any]]] = []
    index = start
    while len(found) < count:
        if is_held_out(corpus.seed, index):
            row_file = folder / "rows" / f"clip_{index:05d}.json"
            if not row_file.is_file():
                if progress:
                    progress(f"rendering held-out clip {index} ({len(found) + 1} of {count}) into {folder}")
                clip = make_clip(index, corpus, audio, int(fingerprint["frame_rate"]))
                (folder / clip.metadata["file_name"]).parent.mkdir(parents=True, exist_ok=True)
                write_audio(folder / clip.metadata["file_name"], clip.audio, audio.sample_rate)
                row_file.write_text(json.dumps(clip.metadata))
            found.append((folder, json.loads(row_file.read_text())))
        index += 1
    return found


def training_clips(cfg: Config, seconds: float) -> AudioSet:
    """Training-split clips of the corpus (the inputs every training stage reads), in order, cut to ``seconds`` in all."""
    from lmdm.data.chunks import list_inputs

    root = Path(cfg.data.root).resolve()
    clips, prompts, files, left = [], [], [], int(seconds * cfg.audio.sample_rate)
    for record in list_inputs("corpus", root, split="train"):
        if left <= 0:
            break
        audio = load_audio(record.path, cfg.audio.sample_rate, cfg.audio.channels)[:, :left]
        clips.append(audio)
        prompts.append(record.caption)
        files.append(Path(record.path).relative_to(root).as_posix())
        left -= audio.shape[-1]
    return AudioSet("training split (floor)", clips, prompts, cfg.audio.sample_rate, files)


@torch.inference_mode()
def reconstructed(clips: AudioSet, autoencoder: torch.nn.Module) -> AudioSet:
    """``clips`` encoded (posterior mean) and decoded by ``autoencoder``."""
    out = []
    ratio = int(autoencoder.downsampling_ratio)  # type: ignore[arg-type]
    for audio in clips.clips:
        length = audio.shape[-1] // ratio * ratio
        x = torch.from_numpy(np.ascontiguousarray(audio[:, :length]))[None]
        y = autoencoder.decode(autoencoder.encode(x).mean)  # type: ignore[operator]
        out.append(y[0, :, :length].float().numpy())
    return AudioSet("training split reconstructed (floor)", out, clips.prompts, clips.sample_rate, clips.files)


def audio_folder(folder: Path, cfg: Config, prompt: str | None = None) -> AudioSet:
    """Every audio file under ``folder`` (sorted), with ``prompt`` for all, or each file's caption from a
    ``metadata.jsonl`` there (``file_name`` and ``caption`` per line, the corpus's own layout)."""
    import json

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of audio to score")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no audio ({', '.join(AUDIO_SUFFIXES)})")
    captions: dict[str, str] = {}
    if (folder / "metadata.jsonl").is_file():
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
        captions = {str(r["file_name"]): str(r["caption"]) for r in rows if "file_name" in r and "caption" in r}
    names = [str(p.relative_to(folder)) for p in files]
    prompts = [prompt if prompt is not None else captions.get(n) for n in names]
    clips = [load_audio(p, cfg.audio.sample_rate, cfg.audio.channels) for p in files]
    return AudioSet(str(folder), clips, prompts, cfg.audio.sample_rate, names)


def _embed(embedder: Embedder, audio: AudioSet) -> list[torch.Tensor]:
    return [embedder.embed_audio(clip, audio.sample_rate).double() for clip in audio.clips]


def embed_frames(embedder: Embedder, audio: AudioSet) -> torch.Tensor:
    """Every clip's embedding frames, stacked: ``(N, D)`` float64."""
    return torch.cat(_embed(embedder, audio))


def _rows(frames: list[torch.Tensor], n: int, seed: int) -> torch.Tensor:
    """``n`` rows of the stacked frames (a seeded subset when there are more): one N for every FAD."""
    stacked = torch.cat(frames)
    if stacked.shape[0] <= n:
        return stacked
    keep = torch.randperm(stacked.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return stacked[keep.sort().values]


def _clap(embedder: TextAudioEmbedder, audio: AudioSet) -> float | None:
    pairs = [(clip, p) for clip, p in zip(audio.clips, audio.prompts, strict=True) if p]
    if not pairs:
        return None
    audio_emb = torch.stack([embedder.embed_audio(clip, audio.sample_rate).mean(0) for clip, _ in pairs])
    text_emb = torch.stack([embedder.embed_text(str(p)) for _, p in pairs])
    return float(clap_scores(audio_emb, text_emb).mean())


def score_sets(
    evaluated: AudioSet,
    reference: AudioSet,
    floors: Sequence[AudioSet],
    fad_embedder: Embedder,
    text_embedder: TextAudioEmbedder | None,
    seed: int = 0,
    reference_stats: AudioStats | None = None,
    progress: Callable[[str], None] | None = None,
    reference_frames: torch.Tensor | None = None,
    with_likeness: bool = True,
) -> dict[str, Any]:
    """Every figure for ``evaluated`` and each floor against ``reference`` (see the module docstring).

    Args:
        reference_frames: the reference's embedding frames (:func:`embed_frames`) when already computed.
        with_likeness: also the likeness figures (pyin: the slow part).
    """
    say = progress or (lambda _: None)
    if reference_frames is None:
        say(f"embedding the reference ({fad_embedder.name})")
        reference_frames = embed_frames(fad_embedder, reference)
    ref_frames = reference_frames
    say("embedding the evaluated set")
    eval_frames = _embed(fad_embedder, evaluated)
    n = sum(f.shape[0] for f in eval_frames)
    if n < 2:
        raise ValueError(f"{evaluated.name}: {n} embedding frame(s) is too little audio for a FAD")
    sets = [(evaluated, eval_frames)]
    for floor in floors:
        say(f"embedding the {floor.name}")
        sets.append((floor, _embed(fad_embedder, floor)))
    n = min(n, *(sum(f.shape[0] for f in frames) for _, frames in sets))
    fad: dict[str, Any] = {"embedder": fad_embedder.name, "frames": n, "reference_frames": int(ref_frames.shape[0])}
    for audio, frames in sets:
        fad[_key(audio, evaluated)] = frechet_distance(_rows(frames, n, seed), ref_frames)
    rows = torch.cat(eval_frames)
    if rows.shape[0] >= FAD_INF_MIN_FRAMES:
        limit = fad_inf(rows, ref_frames, min_n=max(2, rows.shape[0] // 5), steps=10, seed=seed)
        fad["fad_inf"] = {"score": limit.score, "slope": limit.slope, "r2": limit.r2}
    else:
        fad["fad_inf"] = None
        fad["fad_inf_note"] = f"needs >= {FAD_INF_MIN_FRAMES} frames, got {rows.shape[0]}"
    fad["per_clip"] = dict(
        zip(evaluated.files or map(str, range(len(eval_frames))), _finite(per_clip_fad(eval_frames, ref_frames)), strict=True)
    )
    result: dict[str, Any] = {
        "reference": {"clips": len(reference.clips), "seconds": round(reference.seconds, 2), "split_rule": SPLIT_RULE},
        "evaluated": {"name": evaluated.name, "clips": len(evaluated.clips), "seconds": round(evaluated.seconds, 2)},
        "fad": fad,
    }
    if text_embedder is not None:
        say(f"CLAP score ({text_embedder.name})")
        result["clap"] = {
            "embedder": text_embedder.name,
            "evaluated": _clap(text_embedder, evaluated),
            "reference": _clap(text_embedder, reference),
        }
    if with_likeness:
        say("likeness (pitch, loudness, brightness, onsets)")
        ref_stats = reference_stats or audio_stats(reference.clips, reference.sample_rate)
        result["likeness"] = {_key(a, evaluated): likeness(audio_stats(a.clips, a.sample_rate), ref_stats) for a, _ in sets}
        result["likeness"]["reference"] = asdict(ref_stats)
    return result


def _finite(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


def _key(audio: AudioSet, evaluated: AudioSet) -> str:
    if audio is evaluated:
        return "evaluated"
    return "floor_reconstructed" if "reconstructed" in audio.name else "floor_training"


def run_score(
    cfg: Config,
    evaluated: AudioSet,
    autoencoder: torch.nn.Module | None = None,
    fad_embedder: str = "crepe",
    text_embedder: str | None = "builtin:embedder",
    clap_tokenizer: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score ``evaluated`` against the held-out reference of the corpus at ``data.root`` (see :func:`score_sets`)."""
    reference = held_out_reference(cfg, cfg.eval.reference_clips, progress)
    floors = [training_clips(cfg, evaluated.seconds)]
    if autoencoder is not None:
        floors.append(reconstructed(floors[0], autoencoder))
    embedder = load_embedder(fad_embedder, clap_tokenizer)
    text = load_embedder(text_embedder, clap_tokenizer) if text_embedder else None
    if text is not None and not isinstance(text, TextAudioEmbedder):
        raise ValueError(f"{text_embedder} has no text side: pick a text–audio embedder (builtin:embedder or a CLAP checkpoint)")
    if progress:
        progress(f"likeness statistics of {min(cfg.eval.likeness_clips, len(reference.clips))} reference clips (pyin)")
    stats = audio_stats(reference.clips[: cfg.eval.likeness_clips], reference.sample_rate)
    return score_sets(evaluated, reference, floors, embedder, text, seed=cfg.eval.seed, reference_stats=stats, progress=progress)
