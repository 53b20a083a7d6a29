"""Shipped weights (lmdm.checkpoints.builtin): shipped with recorded hashes, loaded by name, and refused
with a clear error when a file is tampered with, truncated or missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmdm.checkpoints.builtin import WEIGHTS, builtin_names, load_builtin, resolve_checkpoint, ship, verify_builtin
from lmdm.checkpoints.errors import CheckpointError
from lmdm.checkpoints.format import TrainedWith, save_checkpoint
from lmdm.models.embedder import EmbedderArgs, TextAudioEmbedding


def _shipped(tmp_path: Path) -> tuple[Path, TextAudioEmbedding]:
    torch.manual_seed(0)
    model = TextAudioEmbedding(EmbedderArgs(width=8, layers=1, dim=8, text_dim=12))
    save_checkpoint(tmp_path / "trained", model, {"step": 3}, TrainedWith(stage="embedder"))
    weights = tmp_path / "weights"
    ship(tmp_path / "trained", "tiny", "# tiny\n", weights)
    return weights, model


def test_shipped_weights_load_by_name_with_their_card(tmp_path: Path) -> None:
    weights, model = _shipped(tmp_path)
    loaded, meta = load_builtin("builtin:tiny", kind="embedder", weights=weights)
    assert meta["step"] == 3 and builtin_names(weights) == ["tiny"] and (weights / "tiny" / "MODEL_CARD.md").is_file()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    index = json.loads((weights / "index.json").read_text())
    assert index["tiny"]["kind"] == "embedder" and set(index["tiny"]["sha256"]) == {"model.safetensors", "config.json"}
    with pytest.raises(CheckpointError, match="no built-in model builtin:other; shipped: builtin:tiny"):
        load_builtin("other", weights=weights)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "edit config", "delete"])
def test_a_tampered_truncated_or_missing_file_is_refused(tmp_path: Path, damage: str) -> None:
    weights, _ = _shipped(tmp_path)
    target = weights / "tiny" / ("config.json" if damage == "edit config" else "model.safetensors")
    data = target.read_bytes()
    if damage == "flip a byte":
        target.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    elif damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "edit config":
        target.write_text(target.read_text().replace('"width": 8', '"width": 9'))
    else:
        target.unlink()
    expected = (
        "is missing; reinstall lmdm" if damage == "delete" else f"{target.name} has SHA-256 [0-9a-f]{{64}}, but [0-9a-f]{{64}} was shipped"
    )
    with pytest.raises(CheckpointError, match=expected):
        load_builtin("tiny", weights=weights)


def _shipped_pair(tmp_path: Path) -> Path:
    """A pair as `lmdm pretrain` writes it (autoencoder/, base/, MODEL_CARD.md), shipped as builtin:pair."""
    from lmdm.models.autoencoder import OobleckVAE

    torch.manual_seed(0)
    pair = tmp_path / "pretrained"
    save_checkpoint(pair / "autoencoder", OobleckVAE(1, 4, [1, 2], [2, 4], 4), {"step": 5}, TrainedWith(stage="autoencoder"))
    save_checkpoint(pair / "base", TextAudioEmbedding(EmbedderArgs(width=8, layers=1, dim=8, text_dim=12)), {"step": 7})
    (pair / "MODEL_CARD.md").write_text("# pair\n")
    weights = tmp_path / "weights"
    ship(pair, "pair", (pair / "MODEL_CARD.md").read_text(), weights, parts=["autoencoder", "base"])
    return weights


def test_a_shipped_pair_loads_by_part_and_refuses_a_whole_or_unknown_part(tmp_path: Path) -> None:
    weights = _shipped_pair(tmp_path)
    _vae, meta = load_builtin("builtin:pair/autoencoder", kind="autoencoder", weights=weights)
    assert meta["step"] == 5 and load_builtin("pair/base", weights=weights)[1]["step"] == 7
    index = json.loads((weights / "index.json").read_text())["pair"]
    assert index["parts"] == {"autoencoder": "autoencoder", "base": "embedder"} and len(index["sha256"]) == 4
    with pytest.raises(CheckpointError, match="builtin:pair holds several models: name one, builtin:pair/autoencoder or builtin:pair/base"):
        load_builtin("pair", weights=weights)
    with pytest.raises(CheckpointError, match="builtin:pair has no part 'dit': its parts are builtin:pair/autoencoder, builtin:pair/base"):
        load_builtin("pair/dit", weights=weights)


def test_a_tampered_part_of_a_pair_is_refused(tmp_path: Path) -> None:
    """Either part damaged refuses both: the pair is one shipped thing."""
    weights = _shipped_pair(tmp_path)
    target = weights / "pair" / "base" / "model.safetensors"
    target.write_bytes(target.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match=r"builtin:pair: .*base/model.safetensors has SHA-256"):
        load_builtin("pair/autoencoder", weights=weights)


def test_the_shipped_models_are_intact_and_resolve() -> None:
    """The package's own shipped weights match their recorded hashes (a broken wheel fails here)."""
    from lmdm.checkpoints.builtin import _index

    for name, entry in _index().items():
        verify_builtin(name)
        for part in entry.get("parts", {"": None}):
            assert resolve_checkpoint(f"builtin:{name}/{part}".rstrip("/")) == WEIGHTS / name / part
    assert resolve_checkpoint("runs/x") == Path("runs/x")


def test_the_builtin_embedder_ranks_true_captions_of_held_out_clips_well_above_chance() -> None:
    """builtin:embedder (trained on the training split of corpus seed 0, configs/embedder.yaml) on 8 clips
    that split holds out, rendered here: each clip's own caption beats another clip's far above chance."""
    from lmdm.config import load_config
    from lmdm.data.corpus import make_clip
    from lmdm.data.split import held_out_indices, is_held_out
    from lmdm.eval.embedders import BuiltinEmbedder, load_embedder
    from lmdm.eval.retrieval import retrieval
    from lmdm.eval.score import AudioSet

    cfg = load_config("embedder", ["data.corpus.clip_seconds=6"])  # shorter renders: one 4-s window each
    assert cfg.data.corpus.seed == 0
    indices = held_out_indices(0, 400)[:8]
    assert all(is_held_out(0, i) for i in indices)
    clips = [make_clip(i, cfg.data.corpus, cfg.audio, cfg.data.frame_rate) for i in indices]
    held_out = AudioSet("held out", [c.audio for c in clips], [c.metadata["caption"] for c in clips], cfg.audio.sample_rate)
    embedder = load_embedder("builtin:embedder")
    assert isinstance(embedder, BuiltinEmbedder)
    figures = retrieval(embedder, held_out)
    assert figures["pairwise_accuracy"] > 0.8 and figures["top1"] > 3 * figures["top1_chance"], figures


def test_every_shipped_file_is_packaged() -> None:
    """Every file index.json records, and every model card, matches a package-data glob of lmdm.weights
    (else it would be missing from the wheel; the cluster test checks the built wheel itself)."""
    import fnmatch
    import tomllib

    from conftest import REPO
    from lmdm.checkpoints.builtin import _index

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lmdm.weights"]
    for name, entry in _index().items():
        for file in [*entry["sha256"], "MODEL_CARD.md"]:
            assert any(fnmatch.fnmatch(f"{name}/{file}", g) and g.count("/") == f"{name}/{file}".count("/") for g in globs), (name, file)
