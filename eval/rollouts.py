"""One long rollout of one engine, cut into windows and measured: the unit of work of ``lmdm eval``.

A :class:`RolloutRunner` holds one engine's models at a time (and the embedders); :meth:`RolloutRunner.run`
streams ``seconds`` of audio block by block (timing the DiT and the autoencoder's streaming decode of each
block apart), then measures every window: its embedding frames (for FAD), its CLAP score against the
prompt, and its likeness statistics (pitch, loudness, brightness, onsets). It returns all of it
(:class:`RolloutOutput`), and :func:`write_rollout` writes the rollout's folder where the caller is (on a
cluster, the driver, not the node that ran it): ``audio.wav``, ``windows.npz`` (the frames) and, last and
atomically, ``rollout.json``, after removing any earlier one. A folder with a ``rollout.json`` of the same
fingerprint is a finished rollout, never redone.

No Ray here: ``lmdm.pipelines.evaluate`` runs runners in a Ray actor pool.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmdm.config import Config

__all__ = [
    "ROLLOUT_FILE",
    "RolloutOutput",
    "RolloutRunner",
    "RolloutTask",
    "finished_rollout",
    "load_window_frames",
    "window_count",
    "write_rollout",
]

ROLLOUT_FILE = "rollout.json"


@dataclass(frozen=True)
class RolloutTask:
    """Rollout ``index`` of engine ``engine``: ``seconds`` of audio under ``prompt`` from ``seed``, into ``folder``."""

    engine: str
    variant: str
    dit: str  # checkpoint folder
    autoencoder: str  # checkpoint folder
    index: int
    prompt: str | None
    seed: int
    seconds: float
    folder: str
    fingerprint: str  # what makes a finished rollout reusable (engine weights, stream settings, prompt, seed, ...)
    steps: int | None = None  # denoising steps per block; None = stream.steps


@dataclass
class RolloutOutput:
    """What a rollout made: its record (``rollout.json``), audio ``(A, S)`` and each window's frames ``(N_w, D)``."""

    record: dict[str, Any]
    audio: np.ndarray
    frames: list[np.ndarray]


def window_count(seconds: float, window_seconds: float) -> int:
    """Whole windows in a rollout (a partial last window is not measured; the config holds a rollout to at least one)."""
    return math.floor(seconds / window_seconds + 1e-9)


def write_rollout(output: RolloutOutput, sample_rate: int) -> dict[str, Any]:
    """Write ``output`` into its folder (``record["folder"]``): the old ``rollout.json`` goes first, the new one last.

    Returns:
        The record.
    """
    from lmdm.audio.io import write_audio

    folder = Path(output.record["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ROLLOUT_FILE).unlink(missing_ok=True)  # a rollout half rewritten is not a finished one
    write_audio(folder / "audio.wav", output.audio, sample_rate)
    offsets = np.cumsum([0, *(f.shape[0] for f in output.frames)])
    np.savez(folder / "windows.tmp.npz", frames=np.concatenate(output.frames).astype(np.float32), offsets=offsets)
    os.replace(folder / "windows.tmp.npz", folder / "windows.npz")
    tmp = folder / (ROLLOUT_FILE + ".tmp")
    tmp.write_text(json.dumps(output.record))
    os.replace(tmp, folder / ROLLOUT_FILE)  # last: the rollout is finished
    return output.record


def finished_rollout(folder: Path, fingerprint: str) -> dict[str, Any] | None:
    """The record of a finished rollout in ``folder`` with this ``fingerprint``, else ``None``."""
    path = folder / ROLLOUT_FILE
    if not path.is_file():
        return None
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    ok = record.get("fingerprint") == fingerprint and (folder / "windows.npz").is_file() and (folder / "audio.wav").is_file()
    return record if ok else None


def load_window_frames(folder: Path) -> list[torch.Tensor]:
    """A finished rollout's per-window embedding frames, each ``(N_w, D)`` float32."""
    with np.load(folder / "windows.npz") as data:
        frames, offsets = data["frames"], data["offsets"]
    return [torch.from_numpy(frames[offsets[w] : offsets[w + 1]]) for w in range(len(offsets) - 1)]


class RolloutRunner:
    """Runs :class:`RolloutTask` s; keeps the last engine's models (one model copy) and the embedders.

    Args:
        cfg: the config (``stream.*``: geometry and sampling; ``eval.*``: windows and embedders).
        threads: torch threads for this runner (an actor's share of the machine).
    """

    def __init__(self, cfg: Config, threads: int | None = None) -> None:
        from lmdm.eval.embedders import TextAudioEmbedder, load_embedder

        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.fad = load_embedder(cfg.eval.fad_embedder)
        text = load_embedder(cfg.eval.text_embedder) if cfg.eval.text_embedder else None
        if text is not None and not isinstance(text, TextAudioEmbedder):
            raise ValueError(
                f"eval.text_embedder={cfg.eval.text_embedder}: it has no text side (pick builtin:embedder or a CLAP checkpoint)"
            )
        self.clap = text
        self._loaded: tuple[str, str, str, int | None] | None = None
        self._models: Any = None

    def _models_for(self, task: RolloutTask) -> Any:
        key = (task.variant, task.dit, task.autoencoder, task.steps)
        if self._loaded != key:
            from lmdm.builders import build_engine, build_runtime, load_stream_models
            from lmdm.text.encoders import build_text_encoder

            self._models = None  # one model copy: drop the last engine's first
            encoder = build_text_encoder(self.cfg) if self.cfg.dit.cond_token_dim else None
            dit, vae = load_stream_models(self.cfg, Path(task.dit), Path(task.autoencoder), encoder, task.variant)  # type: ignore[arg-type]
            dit.eval()
            vae.eval()
            runtime = build_runtime(self.cfg, dit)
            cfg = (
                self.cfg
                if task.steps is None
                else self.cfg.model_copy(update={"stream": self.cfg.stream.model_copy(update={"steps": task.steps})})
            )
            self._models = (build_engine(cfg, dit, task.variant, runtime), vae, encoder, runtime.name)  # type: ignore[arg-type]
            self._loaded = key
        return self._models

    @torch.inference_mode()
    def run(self, task: RolloutTask, actor: str = "") -> RolloutOutput:
        """Stream and measure the rollout (see the module docstring); ``actor`` names who ran it (in its record)."""
        from lmdm.models.autoencoder import StreamingDecoder
        from lmdm.streaming.common import Condition

        engine, vae, encoder, runtime = self._models_for(task)
        cfg = self.cfg
        sr = cfg.audio.sample_rate
        latent_rate = sr / vae.downsampling_ratio
        Bf = cfg.stream.block_frames
        blocks = max(1, math.ceil(task.seconds * latent_rate / Bf))
        tokens = encoder.encode([task.prompt]).tokens if encoder is not None and task.prompt else None
        condition = Condition(tokens, task.prompt or "")
        generator = torch.Generator().manual_seed(task.seed)
        torch.manual_seed(task.seed)
        state = engine.start(condition, 1, generator=generator)
        decoder = StreamingDecoder(vae)
        chunks, dit_s, decode_s = [], [], []
        for _ in range(blocks):
            start = time.perf_counter()
            block = engine.step(state, condition)  # (1, C, Bf), committed as context
            middle = time.perf_counter()
            chunks.append(decoder.push(block.to(next(vae.parameters()).dtype)))
            dit_s.append(middle - start)
            decode_s.append(time.perf_counter() - middle)
        chunks.append(decoder.flush())
        audio = torch.cat(chunks, dim=-1)[0, :, : int(task.seconds * sr)].float().numpy()  # (A, S)
        audio = audio / max(float(np.abs(audio).max()), 1e-6) * 0.9
        windows = self.measure(audio, task.prompt)
        frames = windows.pop("frames")
        record = {
            **asdict(task),
            "blocks": blocks,
            "block_seconds": Bf / latent_rate,
            "runtime": runtime,
            "torch_threads": torch.get_num_threads(),
            "dit_s": dit_s,
            "decode_s": decode_s,
            "actor": actor,
            **windows,
        }
        return RolloutOutput(record, audio, frames)

    def measure(self, audio: np.ndarray, prompt: str | None) -> dict[str, Any]:
        """Per window of ``eval.window_seconds``: embedding frames ``(N, D)``, CLAP score (NaN without a prompt or
        text embedder) and likeness statistics."""
        from lmdm.eval.likeness import audio_stats
        from lmdm.eval.metrics import clap_scores

        cfg, sr = self.cfg, self.cfg.audio.sample_rate
        n = round(cfg.eval.window_seconds * sr)
        count = window_count(audio.shape[-1] / sr, cfg.eval.window_seconds)
        text = self.clap.embed_text(prompt) if self.clap is not None and prompt else None
        frames, clap, stats = [], [], []
        for w in range(count):
            clip = audio[:, w * n : (w + 1) * n]
            frames.append(self.fad.embed_audio(clip, sr).float().numpy())
            if text is not None and self.clap is not None:
                clap.append(float(clap_scores(self.clap.embed_audio(clip, sr).mean(0, keepdim=True), text)[0]))
            else:
                clap.append(float("nan"))
            stats.append(asdict(audio_stats([clip], sr, cfg.data.frame_rate)))
        return {"frames": frames, "clap": clap, "stats": stats, "windows": count, "fad_embedder": self.fad.name}
