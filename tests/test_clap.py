"""CLAP from local files (lmdm.checkpoints.clap, lmdm.eval.embedders): LAION's .pt layout reproduces
laion_clap's own embeddings, the Hugging Face folder reproduces the model it was saved from, the key
renaming covers the real HTSAT-base music checkpoint, and a checkpoint that does not fit is an error
listing keys. The fixtures come from laion_clap's own code (tools/clap_reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmdm.checkpoints.clap import htsat_config, load_laion_checkpoint, read_laion_state, rename_laion_keys
from lmdm.checkpoints.errors import CheckpointError
from lmdm.eval.embedders import ClapEmbedder, Embedder, EmbedderError, TextAudioEmbedder, laion_feature_extractor, load_clap

FIXTURES = Path(__file__).parent / "fixtures" / "clap"
TINY = json.loads((FIXTURES / "tiny_laion.json").read_text())


def tiny_waveforms() -> np.ndarray:
    """The two 10-s clips at 48 kHz tools/clap_reference.py embedded with laion_clap."""
    t = torch.arange(480000, dtype=torch.float64) / 48000
    first = 0.3 * torch.sin(2 * torch.pi * 220.0 * t) + 0.1 * torch.sin(2 * torch.pi * 3000.0 * t)
    second = 0.2 * torch.sin(2 * torch.pi * 440.0 * t * (1 + 0.1 * t))
    return torch.stack([first, second]).float().numpy()


def test_laion_pt_reproduces_laion_clap_embeddings() -> None:
    """The tiny LAION-layout .pt through our renaming, ClapModel and transformers' log-mel front end gives
    the embeddings laion_clap's own forward pass gave (audio to 1e-4: two STFT implementations)."""
    embedder = load_clap(FIXTURES / "tiny_laion.pt", config=htsat_config(TINY["config"]))
    audio = torch.cat([embedder.embed_audio(clip, 48000) for clip in tiny_waveforms()])
    torch.testing.assert_close(audio, torch.tensor(TINY["audio_embeddings"]), atol=1e-4, rtol=0)
    ids = torch.tensor(TINY["tokens"])
    text = embedder.embed_tokens(ids, (ids != 1).long())
    torch.testing.assert_close(text, torch.tensor(TINY["text_embeddings"]), atol=1e-6, rtol=0)
    assert isinstance(embedder, TextAudioEmbedder) and isinstance(embedder, Embedder)
    with pytest.raises(EmbedderError, match="tokenizer"):
        embedder.embed_text("a cello")


def test_every_key_of_the_real_htsat_base_checkpoint_maps_and_none_is_left() -> None:
    """The key names and shapes of LAION's HTSAT-base + RoBERTa model (enumerated from laion_clap's own
    code) land on every ClapModel weight with the same shape; what is left over is only what ClapModel
    computes itself (STFT, mel filters, the AudioSet head, the training-only MLP heads, buffers)."""
    from transformers import ClapModel

    keys = json.loads((FIXTURES / "htsat_base_keys.json").read_text())["keys"]
    renamed, unused = rename_laion_keys({k: torch.empty(shape, device="meta") for k, shape in keys.items()})
    with torch.device("meta"):
        expected = ClapModel(htsat_config()).state_dict()
    buffers = {k for k in expected if k.endswith(("position_ids", "token_type_ids", "relative_position_index"))}
    assert set(renamed) == set(expected) - buffers
    assert all(renamed[k].shape == expected[k].shape for k in renamed)
    kinds = {k.split(".")[2] if "audio_branch" in k else k.split(".")[1] for k in unused}
    assert kinds <= {"spectrogram_extractor", "logmel_extractor", "tscam_conv", "head", "text_transform", "audio_transform", "layers"}
    assert all(k.endswith(("relative_position_index", "attn_mask")) for k in unused if ".layers." in k)


def _save_laion(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "edited.pt"
    torch.save({"epoch": 3, "state_dict": state}, path)
    return path


def test_a_checkpoint_that_does_not_fit_is_an_error_listing_keys(tmp_path: Path) -> None:
    state = read_laion_state(FIXTURES / "tiny_laion.pt")
    config = htsat_config(TINY["config"])
    missing = dict(state)
    del missing["module.text_projection.0.weight"]
    with pytest.raises(CheckpointError, match=r"not in the checkpoint \(1\): text_projection\.linear1\.weight"):
        load_laion_checkpoint(_save_laion(tmp_path, missing), config)
    extra = {**state, "module.audio_branch.layers.9.blocks.0.norm1.weight": torch.zeros(8)}
    with pytest.raises(
        CheckpointError, match=r"not in ClapModel \(1\): audio_model\.audio_encoder\.layers\.9\.blocks\.0\.layernorm_before"
    ):
        load_laion_checkpoint(_save_laion(tmp_path, extra), config)
    with pytest.raises(CheckpointError, match="other shapes"):
        load_laion_checkpoint(FIXTURES / "tiny_laion.pt")  # HTSAT-base sizes
    # A RoBERTa position_ids buffer (older transformers saved it) is skipped, as laion_clap's load_ckpt does.
    older = {**state, "module.text_branch.embeddings.position_ids": torch.arange(40)[None]}
    load_laion_checkpoint(_save_laion(tmp_path, older), config)
    with pytest.raises(CheckpointError, match="no such LAION-CLAP checkpoint"):
        load_laion_checkpoint(tmp_path / "absent.pt", config)


def _tiny_tokenizer(folder: Path) -> object:
    """A byte-level BPE tokenizer with RoBERTa's special tokens and a 32-entry vocabulary (no merges)."""
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, "\u0120": 5}
    vocab.update({chr(c): 6 + i for i, c in enumerate(range(ord("a"), ord("z") + 1))})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def test_a_hugging_face_folder_gives_the_embeddings_of_the_model_it_was_saved_from(tmp_path: Path) -> None:
    from transformers import ClapModel, ClapProcessor

    torch.manual_seed(0)
    model = ClapModel(htsat_config(TINY["config"])).eval()
    tokenizer = _tiny_tokenizer(tmp_path / "tok")
    folder = tmp_path / "clap"
    model.save_pretrained(folder, safe_serialization=True)
    ClapProcessor(feature_extractor=laion_feature_extractor(), tokenizer=tokenizer).save_pretrained(folder)
    direct = ClapEmbedder(model, laion_feature_extractor(), tokenizer, "direct")
    loaded = load_clap(folder)
    clip = tiny_waveforms()[0][:240000]  # 5 s: one window, repeated to 10 s
    torch.testing.assert_close(loaded.embed_audio(clip, 48000), direct.embed_audio(clip, 48000), atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded.embed_text("a bright cello"), direct.embed_text("a bright cello"), atol=1e-6, rtol=0)
    assert loaded.embed_audio(np.tile(clip, 5), 48000).shape == (2, 16)  # 25 s: two windows and a dropped 5-s tail
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_clap(tmp_path / "tok")
