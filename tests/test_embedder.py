"""The built-in text–audio embedder's model (lmdm.models.embedder) and its loading (lmdm.eval.embedders)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmdm.checkpoints.format import TrainedWith, save_checkpoint
from lmdm.eval.embedders import BuiltinEmbedder, EmbedderError, load_embedder
from lmdm.models.embedder import EmbedderArgs, TextAudioEmbedding, contrastive_loss, sentence_embedding


def test_the_contrastive_loss_rewards_matching_pairs_and_shares_duplicate_captions() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(math.log(20.0))
    matched = contrastive_loss(emb, emb, scale)
    shuffled = contrastive_loss(emb, emb.roll(1, 0), scale)
    assert matched < 0.5 * shuffled
    # Rows 0 and 1 share a caption: their texts are equal, and each audio's target spreads over both.
    text = emb.clone()
    text[1] = text[0]
    same = (text[:, None] == text[None]).all(-1)
    assert same[0, 1] and same[1, 0] and same.sum() == 8
    with_same = contrastive_loss(emb, text, scale, same=same)
    logits = scale.exp() * emb @ text.T
    targets = same.float() / same.float().sum(-1, keepdim=True)
    expected = (torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(with_same, expected)


def test_sentence_embedding_is_the_mean_over_the_prompt_tokens() -> None:
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]])
    assert sentence_embedding(tokens, torch.tensor([[True, True, False]])).tolist() == [[2.0, 3.0]]


def test_embeddings_are_unit_vectors_of_the_joint_width() -> None:
    model = TextAudioEmbedding(EmbedderArgs(width=16, layers=2, dim=8, text_dim=12)).eval()
    audio = model.embed_audio(torch.randn(3, 16000))
    text = model.embed_text(torch.randn(3, 12))
    assert audio.shape == text.shape == (3, 8)
    torch.testing.assert_close(audio.norm(dim=-1), torch.ones(3))
    assert model.log_mel(torch.randn(1, 16000)).shape == (1, 64, 51)  # 50 frames a second, centred


def test_an_embedder_trained_on_another_text_encoder_is_refused(tmp_path: Path) -> None:
    model = TextAudioEmbedding(EmbedderArgs(width=16, layers=2, dim=8, text_dim=384))
    save_checkpoint(
        tmp_path / "other",
        model,
        {"text_encoder": {"kind": "minilm", "max_tokens": 64}},
        TrainedWith(stage="embedder", text_encoder="f" * 64),
    )
    with pytest.raises(EmbedderError, match="trained on sentences of a text encoder with fingerprint ffffffffffff"):
        load_embedder(tmp_path / "other")
    from lmdm.text.encoders import load_text_encoder

    fingerprint = load_text_encoder("minilm", None, 64).fingerprint()
    save_checkpoint(tmp_path / "ours", model, {"window_s": 1.0}, TrainedWith(stage="embedder", text_encoder=fingerprint))
    embedder = load_embedder(tmp_path / "ours")
    assert isinstance(embedder, BuiltinEmbedder)
    frames = embedder.embed_audio(np.zeros((1, 40000), np.float32), 16000)  # 2.5 s: 2 windows and a dropped half
    assert frames.shape == (2, 8) and embedder.embed_text("a chorale").shape == (8,)
