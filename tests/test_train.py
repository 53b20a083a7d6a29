"""`lmdm train` with real Ray Train (2 workers) + Accelerate on the precomputed latents of a tiny corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from lmdm.checkpoints.format import load_checkpoint, save_checkpoint
from lmdm.config import Config
from lmdm.data.corpus import CorpusSummary
from lmdm.models.autoencoder import OobleckVAE
from lmdm.models.dit import DiT
from lmdm.pipelines.precompute import run_precompute
from lmdm.pipelines.train import run_train

pytestmark = pytest.mark.slow

SMALL = [
    "dit.width=64",
    "dit.depth=1",
    "dit.head_dim=32",
    "dit.cond_token_dim=384",
    "dit.project_cond_tokens=true",
    "autoencoder.latent_channels=4",
]


@pytest.fixture(scope="module")
def latents(tmp_path_factory: pytest.TempPathFactory, local_ray: object, tiny_corpus: tuple[Config, CorpusSummary]) -> Path:
    _, summary = tiny_corpus
    torch.manual_seed(0)
    ae = save_checkpoint(tmp_path_factory.mktemp("ae") / "autoencoder", OobleckVAE(1, 4, [1, 2], [2, 4], 4))
    out = tmp_path_factory.mktemp("latents") / "latents"
    run_precompute(tiny_config(f"data.root={summary.root}", f"precompute.out={out}", "precompute.chunk_frames=96"), ae)
    return out


def train_cfg(tmp_path: Path, *more: str) -> Config:
    return tiny_config(
        *SMALL, "stream.block_frames=8", "stream.context_blocks=2", "train.workers=2", "train.batch_size=2", "train.lr=1e-3",
        "train.checkpoint_every=3", f"train.storage_path={tmp_path / 'ray_results'}", "train.overfit_batch=true", *more,
    )  # fmt: skip


def test_base_then_lmdm_with_two_workers(tmp_path: Path, latents: Path) -> None:
    base = run_train(train_cfg(tmp_path, "train.steps=6"), "base", latents)
    assert base.checkpoint is not None and base.metrics["step"] == 6
    model, meta = load_checkpoint(base.checkpoint / "model")
    assert isinstance(model, DiT) and meta == {"stage": "base", "step": 6}
    lmdm = run_train(
        train_cfg(tmp_path, "train.steps=3", f"train.init={base.checkpoint / 'model'}", "stream.variant=block_causal"), "lmdm", latents
    )
    assert lmdm.checkpoint is not None and (lmdm.checkpoint / "ema" / "model.safetensors").is_file()
