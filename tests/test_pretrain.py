"""`lmdm pretrain` on a tiny config: an autoencoder trained with the discriminator (Ray Train, DDP), its
reconstruction figures, precompute with the half-precision copy, a base DiT on those latents; the pair
loads, carries a model card, and ships as builtin:<name>/<part>."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from lmdm.checkpoints.builtin import load_builtin, ship
from lmdm.checkpoints.format import file_sha256, load_checkpoint, read_checkpoint_info
from lmdm.pipelines.cli import app

pytestmark = pytest.mark.slow


def test_pretrain_makes_a_loadable_pair_with_a_model_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_ray: object) -> None:
    monkeypatch.chdir(tmp_path)
    overrides = [
        "name=tiny-base",
        "data.root=runs/data/tiny-base",
        "data.corpus.num_clips=8",
        "data.corpus.seed=5",  # holds out clips 2 and 4 of 8
        "data.corpus.clip_seconds=8",
        "autoencoder.channels=4",
        "train.autoencoder.adversarial_weight=0.1",  # the discriminator's path, in Ray Train's DDP
        "train.autoencoder.feature_matching_weight=5",
        "train.autoencoder.discriminator_filters=4",
        "train.autoencoder.discriminator_ffts=[256,128]",
        "train.autoencoder.discriminator_start=2",  # steps 1-2 without it, 3-4 with it
        "train.lr_schedule=cosine",
        "dit.depth=1",
        "train.batch_size=2",
        "stream.block_frames=16",
        "precompute.chunk_frames=96",
        "pretrain.autoencoder_steps=4",
        "pretrain.autoencoder_batch_size=2",
        "pretrain.base_steps=3",
        "pretrain.checkpoint_every=2",
        "pretrain.reconstruction_clips=1",
    ]
    result = CliRunner().invoke(app, ["pretrain", "--config", "corpus-base", *overrides])
    assert result.exit_code == 0, result.output
    pair = tmp_path / "runs" / "tiny-base" / "pretrained"
    vae, ae_meta = load_checkpoint(pair / "autoencoder", "autoencoder")
    _dit, base_meta = load_checkpoint(pair / "base", "dit")
    assert ae_meta["step"] == 4 and base_meta["step"] == 3 and ae_meta["stored_dtype"] == "float16"
    assert next(vae.parameters()).dtype == torch.float32  # stored in half precision, loaded as the model's dtype
    # The base records the autoencoder it was trained on: the shipped (half-precision) file itself.
    assert read_checkpoint_info(pair / "base").trained.autoencoder == file_sha256(pair / "autoencoder" / "model.safetensors")
    card = (pair / "MODEL_CARD.md").read_text()
    assert "lmdm pretrain --config corpus-base name=tiny-base" in card and "mel l1 db" in card and "pitch class accuracy" in card
    figures = json.loads((pair / "figures.json").read_text())
    assert figures["steps"] == {"autoencoder": 4, "base": 3} and figures["reconstruction"]["mean"]["mel_l1_db"] > 0
    assert figures["parameters"]["autoencoder"] == sum(p.numel() for p in vae.parameters())
    assert 0 < figures["train_seconds"]["autoencoder"] and 0 < figures["train_seconds"]["base"]
    assert (pair / "reconstruction.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("tiny-base").experiment_id])}
    ae_metrics = runs["autoencoder"].data.metrics
    assert {"train/mel", "train/stft", "train/adversarial", "train/feature_matching", "train/discriminator"} <= set(ae_metrics)
    lr = [m.value for m in client.get_metric_history(runs["autoencoder"].info.run_id, "train/lr")]
    assert lr[0] > lr[-1]  # the cosine schedule decays

    weights = tmp_path / "weights"
    ship(pair, "tiny-base", card, weights, parts=["autoencoder", "base"])
    shipped, _ = load_builtin("builtin:tiny-base/autoencoder", "autoencoder", weights)
    for key, value in vae.state_dict().items():
        assert torch.equal(shipped.state_dict()[key], value)
