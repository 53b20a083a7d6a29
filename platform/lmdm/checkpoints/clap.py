"""LAION-CLAP checkpoints into transformers' ``ClapModel``, from local files only.

Two layouts load:

- the **Hugging Face folder** (``config.json``, ``model.safetensors``, the processor's files), such as
  ``laion/larger_clap_music``: :func:`load_clap_folder`;
- **LAION's own ``.pt``** training checkpoints (``music_audioset_epoch_15_esc_90.14.pt`` and kin: an
  HTSAT audio tower and RoBERTa text tower saved from DDP): :func:`load_laion_checkpoint`. Their keys
  are renamed with the rules of transformers' ``convert_clap_original_pytorch_to_hf.py``: the tower
  names (``text_branch`` → ``text_model``, ``audio_branch`` → ``audio_model.audio_encoder``), the
  Swin block parts (``attn`` → ``attention.self``, ``norm1`` → ``layernorm_before``, …), the fused
  ``qkv`` split in thirds, ``sequential.N`` → ``layers.{N // 3}.linear`` and ``_projection.0/2`` →
  ``_projection.linear1/2``. Unlike that script (``strict=False``), every ``ClapModel`` weight must be
  filled and every checkpoint key must land somewhere or be one of the parts ``ClapModel`` computes
  itself (the STFT and mel filters, the classification head): anything else is an error listing keys.

The ``.pt`` files are loaded with ``weights_only=True``; the only non-tensor objects allowed are the
NumPy scalars LAION's training loop stored beside the weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lmdm.checkpoints.errors import CheckpointError

if TYPE_CHECKING:
    from transformers import ClapConfig, ClapModel

__all__ = ["HTSAT_BASE", "htsat_config", "load_clap_folder", "load_laion_checkpoint", "read_laion_state", "rename_laion_keys"]

# (old, new) substring renames, applied in order (transformers' KEYS_TO_MODIFY_MAPPING).
_RENAMES = (
    ("text_branch", "text_model"),
    ("audio_branch", "audio_model.audio_encoder"),
    ("attn", "attention.self"),
    ("self.proj", "output.dense"),
    ("attention.self_mask", "attn_mask"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
    ("norm1", "layernorm_before"),
    ("norm2", "layernorm_after"),
    ("bn0", "batch_norm"),
)
_SEQUENTIAL = re.compile(r"sequential\.(\d+)\.")
_PROJECTION = re.compile(r"_projection\.(\d+)\.")
# LAION keys with no ClapModel counterpart: the spectrogram front end (ClapFeatureExtractor computes it),
# the AudioSet classification head, the MLP heads used only by LAION's training loss, and buffers
# transformers rebuilds.
_UNUSED = re.compile(
    r"(spectrogram_extractor|logmel_extractor|tscam_conv|audio_encoder\.head\.|^(text|audio)_transform\."
    r"|text_model\.embeddings\.position_ids|attn_mask$"
    r"|relative_position_index$)"
)
# ClapModel keys no LAION checkpoint holds (buffers ClapModel makes itself).
_BUILT_BY_CLAP = re.compile(r"(position_ids|token_type_ids|relative_position_index)$")

# The audio tower of LAION's HTSAT-base music checkpoints, with a RoBERTa-base text tower (their config
# HTSAT-base.json and roberta-base's config.json).
HTSAT_BASE: dict[str, Any] = {
    "audio": {"patch_embeds_hidden_size": 128, "depths": [2, 2, 12, 2], "num_attention_heads": [4, 8, 16, 32], "hidden_size": 1024},
    "text": {
        "vocab_size": 50265,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
    },
    "projection_dim": 512,
}


def htsat_config(preset: Mapping[str, Any] = HTSAT_BASE, enable_fusion: bool = False) -> ClapConfig:
    """A ``ClapConfig`` for a LAION checkpoint of the preset's sizes."""
    from transformers import ClapConfig

    audio = {**preset["audio"], "enable_fusion": enable_fusion, "projection_dim": preset["projection_dim"]}
    text = {**preset["text"], "projection_dim": preset["projection_dim"]}
    return ClapConfig(audio_config=audio, text_config=text, projection_dim=preset["projection_dim"])


def rename_laion_keys(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """LAION's keys (with or without DDP's ``module.``) renamed to ``ClapModel``'s.

    Returns:
        The renamed state dict, and the original keys left out as having no counterpart (``_UNUSED``).
    """
    out: dict[str, Tensor] = {}
    unused: list[str] = []
    for original, value in state.items():
        key = original.removeprefix("module.")
        for old, new in _RENAMES:
            key = key.replace(old, new)
        if _UNUSED.search(key):
            unused.append(original)
            continue
        if sequential := _SEQUENTIAL.search(key):
            key = key.replace(sequential[0], f"layers.{int(sequential[1]) // 3}.linear.")
        elif projection := _PROJECTION.search(key):
            key = key.replace(projection[0], f"_projection.linear{1 if projection[1] == '0' else 2}.")
        if "qkv" in key:
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[key.replace("qkv", part)] = chunk
        else:
            out[key] = value
    return out, unused


def _listing(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f", … ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_laion_state(path: Path) -> dict[str, Tensor]:
    """The weights of a LAION ``.pt`` checkpoint (a bare state dict or ``{"state_dict": ...}``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LAION-CLAP checkpoint file (nothing is downloaded: save the .pt there first)")
    scalar = np._core.multiarray.scalar  # type: ignore[attr-defined]
    # NumPy 1 pickles name it numpy.core.multiarray.scalar (LAION's files), NumPy 2 numpy._core.…
    allowed = [np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"), *(type(np.dtype(t)) for t in ("float64", "float32", "int64"))]
    with torch.serialization.safe_globals(allowed):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(f"{path}: not a LAION-CLAP checkpoint that loads with weights_only=True ({error})") from error
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or {{'state_dict': ...}}), got {type(loaded).__name__}")
    return state


def load_laion_checkpoint(path: Path, config: ClapConfig | None = None) -> ClapModel:
    """A ``ClapModel`` with the weights of LAION's ``.pt`` at ``path`` (HTSAT-base sizes unless ``config``).

    Raises:
        CheckpointError: unreadable file, a weight of another shape, ``ClapModel`` weights the checkpoint
            does not fill, or checkpoint keys that map to nothing (each listed).
    """
    from transformers import ClapModel

    renamed, _ = rename_laion_keys(read_laion_state(path))
    model = ClapModel(config or htsat_config()).eval()
    expected = model.state_dict()
    missing = [k for k in expected if k not in renamed and not _BUILT_BY_CLAP.search(k)]
    unexpected = [k for k in renamed if k not in expected]
    wrong = [
        f"{k} {tuple(v.shape)} (model {tuple(expected[k].shape)})"
        for k, v in renamed.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{what} ({len(keys)}): {_listing(keys)}"
            for what, keys in (("not in the checkpoint", missing), ("not in ClapModel", unexpected), ("other shapes", wrong))
            if keys
        ]
        raise CheckpointError(f"{path} does not fit ClapModel({_describe(model.config)}): " + "; ".join(parts))
    model.load_state_dict(renamed, strict=False)
    return model


def _describe(config: ClapConfig) -> str:
    audio = config.audio_config
    return f"audio width {audio.patch_embeds_hidden_size}, depths {list(audio.depths)}, text width {config.text_config.hidden_size}"


def load_clap_folder(path: Path) -> ClapModel:
    """A ``ClapModel`` from a Hugging Face folder (``config.json`` + ``*.safetensors``), offline.

    Raises:
        CheckpointError: no such folder, or no safetensors weights in it.
    """
    from transformers import ClapModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a Hugging Face CLAP folder (no config.json); nothing is downloaded at run time")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path}: no .safetensors weights (only safetensors are loaded from folders)")
    model: ClapModel = ClapModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    return model.eval()
