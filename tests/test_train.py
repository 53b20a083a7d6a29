"""`lmdm train` with real Ray Train (2 workers) + Accelerate on the precomputed latents of a tiny corpus."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import alive_actor_pids, tiny_config
from lmdm.builders import build_dit
from lmdm.checkpoints.format import TrainedWith, load_checkpoint, read_checkpoint_info
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


def write_sao_folder(folder: Path) -> Path:
    """A tiny Stable Audio folder written by hand in stable-audio-tools' layout: a ``diffusion_cond``
    ``model_config.json`` and one ``model.safetensors`` with the DiT (``model.model.*``, no conditioning
    inputs: a bidirectional text-to-audio DiT) and its pretransform (``pretransform.model.*``, Oobleck,
    weight norm as ``weight_g``/``weight_v``). The DiT's io channels are the autoencoder's latent channels
    and its text width the built-in encoder's (384), at the sizes of ``SMALL``."""
    from safetensors.torch import save_file

    from lmdm.checkpoints.sao_autoencoder import lmdm_key_to_sao
    from lmdm.models.dit import DiTArgs

    torch.manual_seed(0)
    dit = DiT(DiTArgs(io_channels=4, width=64, depth=1, head_dim=32, cond_token_dim=384, project_cond_tokens=True))
    vae = OobleckVAE(1, 4, [1, 2], [2, 4], 4)
    tensors = {f"model.model.{k}": v for k, v in dit.state_dict().items()}
    tensors |= {f"pretransform.model.{lmdm_key_to_sao(k)}": v for k, v in vae.state_dict().items()}
    oobleck = {"channels": 4, "c_mults": [1, 2], "strides": [2, 4], "use_snake": True}
    config = {
        "model_type": "diffusion_cond",
        "sample_rate": 16000,
        "audio_channels": 1,
        "model": {
            "io_channels": 4,
            "pretransform": {
                "type": "autoencoder",
                "config": {
                    "encoder": {"type": "oobleck", "config": {**oobleck, "in_channels": 1, "latent_dim": 8}},
                    "decoder": {"type": "oobleck", "config": {**oobleck, "out_channels": 1, "latent_dim": 4, "final_tanh": False}},
                    "bottleneck": {"type": "vae"},
                    "latent_dim": 4,
                    "downsampling_ratio": 8,
                    "io_channels": 1,
                },
            },
            "conditioning": {"configs": [{"id": "prompt", "type": "t5", "config": {}}], "cond_dim": 384},
            "diffusion": {
                "type": "dit",
                "cross_attention_cond_ids": ["prompt"],
                "diffusion_objective": "rectified_flow",
                "config": {
                    "io_channels": 4,
                    "embed_dim": 64,
                    "depth": 1,
                    "num_heads": 2,
                    "cond_token_dim": 384,
                    "project_cond_tokens": True,
                },
            },
        },
    }
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "model_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The hand-written Stable Audio folder, imported (``dit/``, ``autoencoder/`` in our format)."""
    from lmdm.checkpoints.sao_dit import import_sao

    root = tmp_path_factory.mktemp("sao")
    return import_sao(write_sao_folder(root / "sao"), root / "imported")


@pytest.fixture(scope="module")
def latents(
    tmp_path_factory: pytest.TempPathFactory, local_ray: object, tiny_corpus: tuple[Config, CorpusSummary], imported: dict[str, Path]
) -> Path:
    """The tiny corpus encoded by the imported Stable Audio pretransform (the paper's path: its latents)."""
    _, summary = tiny_corpus
    out = tmp_path_factory.mktemp("latents") / "latents"
    run_precompute(tiny_config(f"data.root={summary.root}", f"precompute.out={out}", "precompute.chunk_frames=96"), imported["autoencoder"])
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
    assert isinstance(model, DiT) and meta["step"] == 8 and meta["train_seconds"] > 0
    trained = read_checkpoint_info(base.checkpoint / "model").trained
    assert (trained.stage, trained.objective, trained.variant, trained.block_frames, trained.context_blocks) == (
        "base",
        "rectified_flow",
        None,
        8,
        2,
    )
    assert trained.autoencoder == json.loads((latents / "manifest.json").read_text())["autoencoder_sha256"] and trained.text_encoder
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


def test_fine_tune_an_imported_stable_audio_dit_into_an_lmdm(tmp_path: Path, latents: Path, imported: dict[str, Path]) -> None:
    """The paper's path: `lmdm train --stage lmdm train.init=<imported SAO dit>` on latents its own
    pretransform encoded. The LMDM's extra inputs (clean context + mask) start at zero and every imported
    weight loads unchanged; 2 workers; the loss falls."""
    from safetensors.torch import load_file

    from lmdm.checkpoints.compat import load_init
    from lmdm.eval.tracking import mlflow_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = train_cfg(tmp_path, "train.steps=8", "train.checkpoint_every=8", f"train.init={imported['dit']}", f"tracking.tracking_uri={uri}")
    lmdm = build_dit(cfg)
    load_init(lmdm, imported["dit"])  # what every worker does with train.init
    sao = {
        k.removeprefix("model.model."): v
        for k, v in load_file(str(imported["dit"].parent.parent / "sao" / "model.safetensors")).items()
        if k.startswith("model.model.")
    }
    state = lmdm.state_dict()
    assert set(state) == set(sao)
    for key, value in sao.items():
        if key == "transformer.project_in.weight":
            assert torch.equal(state[key][:, :4], value) and not state[key][:, 4:].any()
        elif key == "preprocess_conv.weight":
            assert torch.equal(state[key][:4, :4], value) and not state[key][4:].any() and not state[key][:, 4:].any()
        else:
            assert torch.equal(state[key], value), key
    with mlflow_run(cfg, "sao-lmdm") as run:
        result = run_train(cfg, "lmdm", latents, mlflow_run_id=run.info.run_id)
    assert result.checkpoint is not None and result.metrics["step"] == 8
    history = loss_history(uri, run.info.run_id)
    assert decreases(history), " ".join(f"{v:.4f}" for _, v in history)
    trained = read_checkpoint_info(result.checkpoint / "model").trained
    assert trained.stage == "lmdm" and trained.variant == "block_causal"
    assert trained.autoencoder == read_checkpoint_info(imported["dit"]).trained.autoencoder  # the imported pretransform's latents


def loss_history(uri: str, run_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")]


def checkpointed_steps(storage: Path) -> list[int]:
    """The step of every checkpoint folder written under ``storage`` (committed or not)."""
    return sorted(json.loads(p.read_text())["step"] for p in storage.glob("*/checkpoint_*/step.json"))


def committed_step(storage: Path) -> int:
    """The step of the latest checkpoint Ray Train has committed (its checkpoint manager's snapshot), 0 if none.

    Ray Train commits a reported checkpoint at its controller's next poll of the workers
    (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 0.2 s in the test session): only committed ones survive a worker's death.
    """
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (OSError, ValueError, KeyError):  # being written
            return 0
        return int(latest["metrics"]["step"]) if latest else 0
    return 0


def test_a_worker_killed_with_sigkill_resumes_from_the_last_checkpoint(tmp_path: Path, latents: Path) -> None:
    """A real fault: a training worker process is SIGKILLed from outside mid-run (its pid from Ray's state
    API) and the run resumes from the latest checkpoint, at most one checkpoint interval lost, with one
    continuous MLflow history. The same run also takes the in-loop drill (``train.fail_once_at_step``)."""
    import os
    import signal
    import threading

    from lmdm.eval.tracking import mlflow_run

    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "ray_results"
    cfg = train_cfg(
        tmp_path,
        "train.steps=16",
        "train.checkpoint_every=4",
        "train.fail_once_at_step=13",
        "train.max_failures=2",
        f"tracking.tracking_uri={uri}",
    )
    killed: dict[str, Any] = {}
    stop = threading.Event()

    def kill_after_the_first_commit() -> None:
        pids: list[int] = []
        while not pids and not stop.wait(0.01):  # the workers' pids first (a state-API call: slow)
            pids = alive_actor_pids("RayTrainWorker")
        while not stop.wait(0.005):  # then kill one the moment Ray Train commits a checkpoint
            committed = committed_step(storage)
            if committed:
                written = checkpointed_steps(storage)
                os.kill(pids[0], signal.SIGKILL)
                killed.update(pid=pids[0], committed=committed, written=written)
                return

    watcher = threading.Thread(target=kill_after_the_first_commit)
    watcher.start()
    try:
        with mlflow_run(cfg, "fault") as run:
            result = run_train(cfg, "base", latents, mlflow_run_id=run.info.run_id)
    finally:
        stop.set()
        watcher.join()
    assert killed and killed["committed"] in (4, 8) and max(killed["written"]) < 13, killed
    assert result.metrics["step"] == 16
    assert (storage / "quickstart-base.failed-once").is_file()  # the drill fired too
    assert [s for s, _ in loss_history(uri, run.info.run_id)] == list(range(1, 17))  # one continuous history
    # Resumed from the committed checkpoint: the first checkpoint written after the kill is the next one.
    after = checkpointed_steps(storage)
    for step in killed["written"]:
        after.remove(step)
    assert min(after) == killed["committed"] + 4, (killed, after)
    # At most one interval lost: at the kill, at most one checkpoint past the committed one had been written.
    assert max(killed["written"]) - killed["committed"] <= 4, killed
    assert killed["pid"] not in alive_actor_pids("RayTrainWorker")
    # The training time carries over the restarts: the last checkpoint's exceeds the first one's.
    assert result.checkpoint is not None
    first = json.loads(sorted(storage.glob("quickstart-base-*/checkpoint_*/step.json"))[0].read_text())
    last = load_checkpoint(result.checkpoint / "model")[1]
    assert 0 < first["train_seconds"] < last["train_seconds"]


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
    assert isinstance(vae, OobleckVAE) and meta["step"] == 10 and result.metrics["step"] == 10
    assert read_checkpoint_info(result.checkpoint / "model").trained == TrainedWith(stage="autoencoder")  # type: ignore[operator]
    history = loss_history(uri, run.info.run_id)  # 10 steps: at 8 it ended 9.96% below its start on a Xeon (AVX-512), short of 10%
    assert decreases(history), " ".join(f"{v:.4f}" for _, v in history)


def test_bench_train_zero2_partitions_optimizer_state(tmp_path: Path, latents: Path) -> None:
    """`lmdm bench train`'s figures: ZeRO-2's optimizer state per worker is about 1/N of DDP's; and DeepSpeed
    ZeRO-2 really runs (its engine) and trains as DDP does (the same loss after 3 steps on the same batch and noise)."""
    from lmdm.pipelines.bench_train import run_train_bench

    results = run_train_bench(train_cfg(tmp_path, "train.steps=3"), latents)
    ddp, zero2 = results["ddp"], results["zero2"]
    assert (ddp["engine"], zero2["engine"]) == ("DistributedDataParallel", "DeepSpeedEngine")
    assert abs(ddp["final_loss"] - zero2["final_loss"]) <= 1e-4 * max(1.0, abs(ddp["final_loss"])), (ddp["final_loss"], zero2["final_loss"])
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


def test_latents_without_chunks_are_a_clear_error(tmp_path: Path) -> None:
    """Every input shorter than a chunk: precompute writes a manifest with 0 chunks; training says so
    (it used to fail inside Ray Data with "Must provide at least one path")."""
    latents = tmp_path / "latents"
    latents.mkdir()
    manifest = {
        "counts": {"inputs": 8, "chunks": 0, "skipped": 8, "shards": 1},
        "skipped": [{"input_id": "clip_00000", "reason": "too short: 10.00 s < one chunk of 15.36 s"}],
    }
    (latents / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"holds no latent chunks to train on \(8 inputs, 8 skipped: too short: 10.00 s < one chunk"):
        run_train(train_cfg(tmp_path), "base", latents)


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
    # What an LMDM fine-tune starts from is the init's weights: a base reshipped at the same path starts a new
    # run (the quickstart resumed the old base's finished fine-tune before); the same weights moved do not.
    base, moved = tmp_path / "base", tmp_path / "moved"
    for folder in (base, moved):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights of the first base")
    first = run_name(train_cfg(tmp_path, f"train.init={base}"), "lmdm", tmp_path / "latents")
    assert run_name(train_cfg(tmp_path, f"train.init={moved}"), "lmdm", tmp_path / "latents") == first
    (base / "model.safetensors").write_bytes(b"weights of the reshipped base")
    assert run_name(train_cfg(tmp_path, f"train.init={base}"), "lmdm", tmp_path / "latents") != first
    # The autoencoder stage reads no DiT setting: choosing those later does not restart (or orphan) its run.
    autoencoder = run_name(cfg, "autoencoder", None)
    assert run_name(train_cfg(tmp_path, "dit.depth=3", "stream.block_frames=4"), "autoencoder", None) == autoencoder
    assert run_name(train_cfg(tmp_path, "autoencoder.channels=8"), "autoencoder", None) != autoencoder


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


def test_embedder_stage_trains_the_contrastive_embedder_on_captioned_audio(
    tmp_path: Path, local_ray: object, tiny_corpus: tuple[Config, CorpusSummary]
) -> None:
    """`lmdm train --stage embedder`: Ray Train (2 workers, DDP) on the training split's audio chunks and their
    captions; the InfoNCE loss falls on a fixed batch; the checkpoint is an `embedder` that says which text
    encoder its sentences came from."""
    from lmdm.eval.tracking import mlflow_run
    from lmdm.models.embedder import TextAudioEmbedding
    from lmdm.text.encoders import build_text_encoder

    _, summary = tiny_corpus
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config(
        f"data.root={summary.root}", "embedder.width=16", "embedder.dim=16", "embedder.layers=2", "embedder.chunk_seconds=1.5",
        "train.workers=2", "train.batch_size=4", "train.steps=10", "train.checkpoint_every=10", "train.lr=3e-3",
        "train.overfit_batch=true", f"train.storage_path={tmp_path / 'ray_results'}", f"tracking.tracking_uri={uri}",
    )  # fmt: skip
    with mlflow_run(cfg, "embedder") as run:
        result = run_train(cfg, "embedder", None, mlflow_run_id=run.info.run_id)
    model, meta = load_checkpoint(result.checkpoint / "model", kind="embedder")  # type: ignore[operator]
    assert isinstance(model, TextAudioEmbedding) and meta["step"] == 10 and model.args.width == 16
    fingerprint = build_text_encoder(cfg).fingerprint()
    assert read_checkpoint_info(result.checkpoint / "model").trained == TrainedWith(stage="embedder", text_encoder=fingerprint)  # type: ignore[operator]
    history = loss_history(uri, run.info.run_id)
    assert decreases(history), " ".join(f"{v:.4f}" for _, v in history)


def test_too_little_data_for_one_batch_per_worker_is_an_error_not_a_run_that_never_steps(
    tmp_path: Path, local_ray: object, tiny_corpus: tuple[Config, CorpusSummary], latents: Path
) -> None:
    """6 chunks on 2 workers are 3 rows each: a batch of 4 never fills (drop_last), and the loop read the data
    forever (the quickstart hung on a corpus of 8 clips, 2 held out). Now: a clear error, before training for
    latents (the manifest counts them), and from the worker after one empty epoch for audio stages."""
    from ray.train import TrainingFailedError

    chunks = json.loads((latents / "manifest.json").read_text())["counts"]["chunks"]
    with pytest.raises(ValueError, match=r"fewer than one batch \(train.batch_size=\d+\)"):
        run_train(train_cfg(tmp_path, f"train.batch_size={chunks}", "train.steps=1"), "base", latents)
    _, summary = tiny_corpus
    cfg = tiny_config(
        f"data.root={summary.root}", "embedder.width=8", "embedder.dim=8", "embedder.layers=1", "embedder.chunk_seconds=5",
        "train.workers=2", "train.batch_size=4", "train.steps=2", "train.max_failures=0", f"train.storage_path={tmp_path / 'r'}",
    )  # fmt: skip
    with pytest.raises(TrainingFailedError, match=r"got no full batch of train\.batch_size=4 rows"):
        run_train(cfg, "embedder", None)


def test_rvq_then_flat_lmm_with_two_workers_stream_as_an_engine(tmp_path: Path, latents: Path, imported: dict[str, Path]) -> None:
    """The LMM baseline's stages: the RVQ's codebooks stay identical on both workers (all-reduced statistics) and
    its error falls with depth; the LMM's loss falls on a fixed batch, its checkpoint says what it was trained
    on, and it streams through build_engine."""
    from lmdm.builders import build_engine, load_stream_models
    from lmdm.checkpoints.errors import CheckpointError
    from lmdm.streaming.common import Condition
    from lmdm.streaming.rollout import rollout

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    small_lmm = ["rvq.levels=4", "rvq.codes=32", "lmm.flat.width=64", "lmm.flat.depth=1", "lmm.flat.head_dim=32", "lmm.flat.embed_dim=8"]
    cfg = train_cfg(tmp_path, *small_lmm, "train.steps=4", "train.checkpoint_every=4", f"tracking.tracking_uri={uri}")
    rvq = run_train(cfg, "rvq", latents)
    assert rvq.checkpoint is not None and not (rvq.checkpoint / "ema").exists()
    info = read_checkpoint_info(rvq.checkpoint / "model")
    errors = info.meta["depth_mse"]
    assert info.kind == "rvq" and len(errors) == 4 and all(b < a for a, b in itertools.pairwise(errors)), errors
    assert info.trained.autoencoder == json.loads((latents / "manifest.json").read_text())["autoencoder_sha256"]

    tokenizer = rvq.checkpoint / "model"
    with pytest.raises(CheckpointError, match=r"has 4 levels of 32 codes, but the config's LMM expects rvq.levels=8"):
        run_train(train_cfg(tmp_path, *small_lmm, "rvq.levels=8", f"lmm.tokenizer={tokenizer}"), "lmm", latents)
    with pytest.raises(CheckpointError, match=r"holds a checkpoint of kind 'dit'; it must be an RVQ"):
        run_train(train_cfg(tmp_path, *small_lmm, f"lmm.tokenizer={imported['dit']}"), "lmm", latents)

    cfg = train_cfg(
        tmp_path, *small_lmm, "train.steps=8", "train.checkpoint_every=8", "train.lr=3e-3", "lmm.train_frames=16", f"lmm.tokenizer={tokenizer}",
        f"tracking.tracking_uri={uri}",
    )  # fmt: skip
    from lmdm.eval.tracking import mlflow_run

    with mlflow_run(cfg, "lmm") as run:
        lmm = run_train(cfg, "lmm", latents, mlflow_run_id=run.info.run_id)
    assert lmm.checkpoint is not None
    assert decreases(loss_history(uri, run.info.run_id))
    trained = read_checkpoint_info(lmm.checkpoint / "model").trained
    assert (trained.stage, trained.variant, trained.block_frames) == ("lmm", "flat", 8)
    from lmdm.checkpoints.format import file_sha256

    assert trained.rvq == file_sha256(tokenizer / "model.safetensors")

    model, _vae = load_stream_models(cfg, lmm.checkpoint / "model", None, None, "flat")
    engine = build_engine(cfg, model.eval(), "flat")
    out = rollout(engine, 2, Condition(), batch=1, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 4, 16) and torch.isfinite(out).all()
    with pytest.raises(CheckpointError, match=r"is a flat LMM, not framewise"):
        load_stream_models(cfg, lmm.checkpoint / "model", None, None, "framewise")
    with pytest.raises(CheckpointError, match=r"kind 'rvq' where kind 'lmm' is needed"):
        load_stream_models(cfg, tokenizer, None, None, "flat")
