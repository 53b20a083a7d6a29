"""`lmdm train` with real Ray Train (2 workers) + Accelerate on the precomputed latents of a tiny corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from lmdm.builders import build_dit
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


def decreases(history: list[tuple[int, float]]) -> bool:
    """The loss on the fixed batch (fixed noise too: ``train.overfit_batch``) ends well below where it began."""
    losses = [v for _, v in history]
    return losses[-1] < 0.9 * losses[0] and min(losses[len(losses) // 2 :]) < min(losses[: len(losses) // 2])


def test_base_then_lmdm_with_two_workers_and_the_loss_decreases(tmp_path: Path, latents: Path) -> None:
    from mlflow.tracking import MlflowClient

    from lmdm.eval.tracking import mlflow_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = train_cfg(tmp_path, "train.steps=8", "train.checkpoint_every=4", f"tracking.tracking_uri={uri}")
    with mlflow_run(cfg, "base") as run:
        base = run_train(cfg, "base", latents, mlflow_run_id=run.info.run_id)
    assert base.checkpoint is not None and base.metrics["step"] == 8
    # Reports only with the 2 checkpoints: each `ray.train.report` waits for the controller's 2-s poll.
    assert base.metrics["reports"] == 2
    model, meta = load_checkpoint(base.checkpoint / "model")
    assert isinstance(model, DiT) and meta == {"stage": "base", "step": 8}
    history = loss_history(uri, run.info.run_id)
    assert [s for s, _ in history] == list(range(1, 9)) and decreases(history), history
    stage_run = MlflowClient(tracking_uri=uri).get_run(run.info.run_id)
    assert stage_run.data.params["train.lr"] == "0.001" and stage_run.data.params["stage"] == "base"
    assert stage_run.data.tags["checkpoint"] == str(base.checkpoint)
    for key in ("train/lr", "train/grad_norm", "train/samples_per_s"):
        values = [m.value for m in MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, key)]
        assert len(values) == 8 and all(v > 0 for v in values), (key, values)
    cfg = train_cfg(
        tmp_path, "train.steps=8", "train.checkpoint_every=8", f"train.init={base.checkpoint / 'model'}",
        "stream.variant=block_causal", f"tracking.tracking_uri={uri}",
    )  # fmt: skip
    with mlflow_run(cfg, "lmdm") as run:
        lmdm = run_train(cfg, "lmdm", latents, mlflow_run_id=run.info.run_id)
    assert lmdm.checkpoint is not None and (lmdm.checkpoint / "ema" / "model.safetensors").is_file()
    history = loss_history(uri, run.info.run_id)
    assert decreases(history), " ".join(f"{v:.4f}" for _, v in history)


def loss_history(uri: str, run_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")]


def test_deepspeed_zero2_runs_and_matches_ddp(tmp_path: Path, latents: Path) -> None:
    from lmdm.eval.tracking import mlflow_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    histories = {}
    for strategy in ("ddp", "deepspeed"):
        cfg = train_cfg(
            tmp_path / strategy,
            "train.steps=3",
            f"train.strategy={strategy}",
            "train.zero_stage=2",
            f"tracking.tracking_uri={uri}",
            "name=ds",
        )
        with mlflow_run(cfg, strategy) as run:
            result = run_train(cfg, "base", latents, mlflow_run_id=run.info.run_id)
        assert result.metrics["engine"] == ("DeepSpeedEngine" if strategy == "deepspeed" else "DistributedDataParallel")
        histories[strategy] = loss_history(uri, run.info.run_id)
    assert [s for s, _ in histories["ddp"]] == [1, 2, 3]
    for (_, a), (_, b) in zip(histories["ddp"], histories["deepspeed"], strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a))


def test_worker_failure_resumes_from_the_last_checkpoint(tmp_path: Path, latents: Path) -> None:
    from lmdm.eval.tracking import mlflow_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = train_cfg(
        tmp_path,
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.fail_once_at_step=3",
        "train.max_failures=1",
        f"tracking.tracking_uri={uri}",
    )
    with mlflow_run(cfg, "fault") as run:
        result = run_train(cfg, "base", latents, mlflow_run_id=run.info.run_id)
    assert result.metrics["step"] == 4
    assert (tmp_path / "ray_results" / "quickstart-base.failed-once").is_file()  # the drill really fired
    assert [s for s, _ in loss_history(uri, run.info.run_id)] == [1, 2, 3, 4]  # one continuous history


def test_autoencoder_stage_on_audio_chunks_and_the_loss_decreases(
    tmp_path: Path, local_ray: object, tiny_corpus: tuple[Config, CorpusSummary]
) -> None:
    from lmdm.eval.tracking import mlflow_run

    _, summary = tiny_corpus
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config(
        f"data.root={summary.root}", "autoencoder.channels=4", "autoencoder.latent_channels=4", "autoencoder.strides=[2,4]",
        "autoencoder.channel_mults=[1,2]", "train.audio_chunk_frames=256", "train.workers=2", "train.batch_size=2", "train.steps=10",
        "train.checkpoint_every=10", f"train.storage_path={tmp_path / 'ray_results'}", "train.lr=3e-3", "train.overfit_batch=true",
        f"tracking.tracking_uri={uri}",
    )  # fmt: skip
    with mlflow_run(cfg, "autoencoder") as run:
        result = run_train(cfg, "autoencoder", None, mlflow_run_id=run.info.run_id)
    vae, meta = load_checkpoint(result.checkpoint / "model")  # type: ignore[operator]
    assert isinstance(vae, OobleckVAE) and meta["stage"] == "autoencoder" and result.metrics["step"] == 10
    history = loss_history(uri, run.info.run_id)  # 10 steps: at 8 it ended 9.96% below its start on a Xeon (AVX-512), short of 10%
    assert decreases(history), " ".join(f"{v:.4f}" for _, v in history)


def test_bench_train_zero2_partitions_optimizer_state(tmp_path: Path, latents: Path) -> None:
    """`lmdm bench train`'s figures: ZeRO-2's optimizer state per worker is about 1/N of DDP's."""
    from lmdm.pipelines.bench_train import run_train_bench

    results = run_train_bench(train_cfg(tmp_path, "train.steps=3", "train.overfit_batch=false"), latents)
    ddp, zero2 = results["ddp"], results["zero2"]
    assert (ddp["engine"], zero2["engine"]) == ("DistributedDataParallel", "DeepSpeedEngine")
    assert len(ddp["state_bytes_per_worker"]) == len(zero2["state_bytes_per_worker"]) == 2
    n_params = sum(p.numel() for p in build_dit(train_cfg(tmp_path)).parameters())
    # DDP: Adam's two fp32 moments of every parameter (+ its step counters) on every worker.
    assert 2 * 4 * n_params <= ddp["max_optimizer_bytes"] <= 2 * 4 * n_params + 4096
    assert 0.45 <= results["train"]["zero2_vs_ddp_state_memory_ratio"] <= 0.55
    # Measured inside the optimizer step: DDP holds every gradient, ZeRO-2 this rank's half (and an fp32 master half).
    worst = {name: max(r["state_bytes_per_worker"], key=lambda w: w["total"]) for name, r in (("ddp", ddp), ("zero2", zero2))}
    assert worst["ddp"]["grads"] >= 4 * n_params and 0 < worst["zero2"]["grads"] <= 0.55 * worst["ddp"]["grads"]
    assert 0.7 <= results["train"]["zero2_vs_ddp_total_state_ratio"] <= 0.8
    assert ddp["samples_per_s"] > 0 and zero2["samples_per_s"] > 0


def test_run_name_resumes_only_the_same_training(tmp_path: Path) -> None:
    """Ray Train continues a run whose folder exists: a rerun with another model, optimizer or data must
    get a new folder (it resumed the old checkpoint before), one that only extends the steps the same one."""
    from lmdm.pipelines.train import run_name

    cfg = train_cfg(tmp_path)
    name = run_name(cfg, "base", tmp_path / "latents")
    assert name.startswith("quickstart-base-")
    assert (
        run_name(
            train_cfg(tmp_path, "train.steps=999", "train.max_failures=0", "tracking.tracking_uri=sqlite:///x.db"),
            "base",
            tmp_path / "latents",
        )
        == name
    )
    for changed in (
        run_name(train_cfg(tmp_path, "train.lr=1e-4"), "base", tmp_path / "latents"),
        run_name(train_cfg(tmp_path, "dit.depth=3"), "base", tmp_path / "latents"),
        run_name(cfg, "base", tmp_path / "other-latents"),
        run_name(cfg, "lmdm", tmp_path / "latents"),
    ):
        assert changed != name


def test_workers_read_shuffled_batches(local_ray: object) -> None:
    """Inputs arrive grouped (a clip's chunks in one block): a worker's batches are drawn through a seeded
    local shuffle buffer, every row once per epoch, in another order the next epoch; 0 turns it off."""
    import ray.data

    from lmdm.pipelines.train import epoch_batches

    cfg = tiny_config("train.batch_size=4", "train.shuffle_buffer=32")
    rows = ray.data.range(64, override_num_blocks=4)

    def epoch(c: Config, number: int) -> list[int]:
        return [int(i) for b in epoch_batches(rows.iterator(), c, rank=0, epoch=number) for i in b["id"]]

    first = epoch(cfg, 1)
    assert sorted(first) == list(range(64))
    assert first != list(range(64)) and first[:4] != [0, 1, 2, 3]
    assert epoch(cfg, 1) == first  # seeded
    assert epoch(cfg, 2) != first
    assert epoch(tiny_config("train.batch_size=4", "train.shuffle_buffer=0"), 1) == list(range(64))


def test_latent_dataset_is_read_without_a_listing_step_per_epoch(latents: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ray Train runs the dataset again every epoch; Ray Data's V2 Parquet reader lists files with 32 new
    footer-reader actors each time (7-20 s an epoch on 2 cores). The training dataset uses the V1 reader
    (no ``ListFiles`` step) and leaves the process-wide setting as it found it."""
    import json

    import ray.data

    from lmdm.pipelines.train import LATENT_COLUMNS, latent_dataset

    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2
    shards = sorted(str(p) for p in latents.glob("shard_*.parquet"))
    dataset = latent_dataset(shards)
    assert context.use_datasource_v2 == before
    capsys.readouterr()
    dataset.explain()
    plan = capsys.readouterr().out
    assert "ReadParquet" in plan and "ListFiles" not in plan, plan
    rows = dataset.take_all()
    assert len(rows) == json.loads((latents / "manifest.json").read_text())["counts"]["chunks"]
    assert set(rows[0]) == set(LATENT_COLUMNS)
