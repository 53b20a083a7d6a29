"""``lmdm train``: Ray Train ``TorchTrainer`` + HF Accelerate (+ DeepSpeed ZeRO) for every stage (the driver).

Stages: ``autoencoder`` (on audio chunks), ``base`` (bidirectional DiT with random inpainting masks:
it is also the outpainting baseline), ``lmdm`` (the LMDM loss of DESIGN §4, ``stream.variant``
``block_causal`` or ``encdec``, usually initialised from a base, ours or an imported Stable Audio DiT,
with ``train.init``), and the LMM baseline's ``rvq`` (its tokenizer) and ``lmm`` (``lmm.kind``, on the
codes of the RVQ in ``lmm.tokenizer``); ``embedder`` trains the built-in text–audio embedder. Data are the precomputed latent shards (Ray Data, one shard per worker) and the
caption-keyed text-embedding table. Each worker runs :mod:`lmdm.pipelines.recipe`; a failed worker
restarts the group from the latest checkpoint (``FailureConfig``) and the step count continues.

Before any worker starts, ``train.init`` is checked against the run (:func:`lmdm.checkpoints.compat.check_init`),
and the checkpoints the run writes say what they are (:class:`lmdm.checkpoints.format.TrainedWith`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmdm.checkpoints.format import file_sha256
from lmdm.config import Config
from lmdm.pipelines.recipe import MIXED_PRECISION, epoch_batches, process_group_backend, train_worker, training_state_bytes

__all__ = [
    "LATENT_COLUMNS",
    "MIXED_PRECISION",
    "ProgressBoard",
    "TrainResult",
    "epoch_batches",
    "latent_dataset",
    "process_group_backend",
    "run_name",
    "run_train",
    "training_state_bytes",
]


STAGES = ("autoencoder", "base", "lmdm", "embedder", "rvq", "lmm", "arc")


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path | None  # the latest reported checkpoint folder
    metrics: dict[str, Any]


def _trained_with(cfg: Config, stage: str, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """What the run's checkpoints will say they are (:class:`~lmdm.checkpoints.format.TrainedWith`), from the
    config and the latents' manifest (the autoencoder and text encoder they were made with)."""
    if stage == "embedder":  # audio and captions: the text encoder is what it depends on
        from lmdm.text.encoders import build_text_encoder

        return {"stage": stage, "text_encoder": build_text_encoder(cfg).fingerprint()}
    if manifest is None:  # the autoencoder stage: no latents
        return {"stage": stage}
    if stage == "rvq":
        return {"stage": stage, "autoencoder": manifest.get("autoencoder_sha256")}
    if stage == "lmm":
        assert cfg.lmm.tokenizer is not None
        return {
            "stage": stage,
            "variant": cfg.lmm.kind,
            "block_frames": cfg.stream.block_frames,
            "context_blocks": cfg.stream.context_blocks,
            "autoencoder": manifest.get("autoencoder_sha256"),
            "text_encoder": manifest.get("text_encoder", {}).get("fingerprint") if cfg.dit.cond_token_dim else None,
            "rvq": file_sha256(Path(cfg.lmm.tokenizer) / "model.safetensors"),
        }
    return {
        "stage": stage,
        "objective": cfg.dit.objective,
        "variant": cfg.stream.variant if stage in ("lmdm", "arc") else None,
        "block_frames": cfg.stream.block_frames,
        "context_blocks": cfg.stream.context_blocks,
        "autoencoder": manifest.get("autoencoder_sha256"),
        "text_encoder": manifest.get("text_encoder", {}).get("fingerprint") if cfg.dit.cond_token_dim else None,
    }


def _require_chunks(latents: Path, manifest: dict[str, Any], cfg: Config | None = None) -> None:
    """Latents with nothing to train on, or too little for one batch per worker, are an error here, not a
    run that never takes a step."""
    counts = manifest.get("counts", {})
    chunks, t = int(counts.get("chunks") or 0), cfg.train if cfg is not None else None
    if chunks and t is not None and chunks // t.workers < t.batch_size:
        raise ValueError(
            f"{latents} holds {chunks} latent chunks: {chunks // t.workers} per worker for {t.workers} workers, fewer than "
            f"one batch (train.batch_size={t.batch_size}); lower train.batch_size or train.workers, or add data"
        )
    if not counts.get("chunks") or not any(latents.glob("shard_*.parquet")):
        reasons = sorted({s.get("reason", "?") for s in manifest.get("skipped", [])})
        raise ValueError(
            f"{latents} holds no latent chunks to train on ({counts.get('inputs', 0)} inputs, {counts.get('skipped', 0)} skipped"
            + (f": {'; '.join(reasons[:3])}" if reasons else "")
            + "); check the data and precompute.chunk_frames (inputs shorter than a chunk are skipped)"
        )


def _check_init(cfg: Config, stage: str, trained: dict[str, Any]) -> None:
    """``train.init`` fits this run (kind, model size, objective, autoencoder, text encoder), else a clear error."""
    from lmdm.builders import dit_args
    from lmdm.checkpoints.compat import check_init
    from lmdm.checkpoints.format import read_checkpoint_info

    if stage in ("rvq", "lmm"):
        _check_lmm_inputs(cfg, stage, trained)
        return
    if cfg.train.init is None:
        if stage == "arc":
            raise ValueError("ARC-Forcing post-trains an LMDM: set train.init=<folder> (`lmdm train --stage lmdm` writes one)")
        return
    info = read_checkpoint_info(cfg.train.init)
    if stage == "arc":
        _check_arc_init(cfg, info)
    check_init(
        info,
        stage=stage,
        args=dit_args(cfg),
        objective=cfg.dit.objective,
        autoencoder=trained.get("autoencoder"),
        text_encoder=trained.get("text_encoder"),
    )


def _check_arc_init(cfg: Config, info: Any) -> None:
    """``train.init`` of an ARC run is an LMDM of ``stream.variant`` (teacher-forced, or ARC-Forced already)."""
    from lmdm.checkpoints.errors import CheckpointError

    t = info.trained
    if t.stage not in ("lmdm", "arc"):
        raise CheckpointError(
            f"train.init={info.folder} was trained as stage {t.stage!r}; ARC-Forcing post-trains an LMDM (stage lmdm or arc): "
            "fine-tune it first with `lmdm train --stage lmdm`"
        )
    if t.variant and t.variant != cfg.stream.variant:
        raise CheckpointError(
            f"train.init={info.folder} is a {t.variant} LMDM, but stream.variant is {cfg.stream.variant}: set stream.variant={t.variant}"
        )
    for key in ("block_frames", "context_blocks"):
        if getattr(t, key) is not None and getattr(t, key) != getattr(cfg.stream, key):
            raise CheckpointError(f"train.init={info.folder} was trained with {key}={getattr(t, key)}: set stream.{key}={getattr(t, key)}")


def _tokenizer_info(cfg: Config) -> Any:
    """``lmm.tokenizer``'s checkpoint info; a clear error where it is unset, missing or not an RVQ."""
    from lmdm.checkpoints.errors import CheckpointError
    from lmdm.checkpoints.format import read_checkpoint_info

    if cfg.lmm.tokenizer is None:
        raise ValueError(
            "the lmm stage tokenises latents with a trained RVQ: set lmm.tokenizer=<folder> (`lmdm train --stage rvq` writes one)"
        )
    info = read_checkpoint_info(cfg.lmm.tokenizer)
    if info.kind != "rvq":
        raise CheckpointError(f"lmm.tokenizer={cfg.lmm.tokenizer} holds a checkpoint of kind {info.kind!r}; it must be an RVQ (kind 'rvq')")
    return info


def _check_lmm_inputs(cfg: Config, stage: str, trained: dict[str, Any]) -> None:
    """The LMM baseline's stages: the tokenizer (``lmm.tokenizer``) fits the config and the latents, and a
    ``train.init`` is an LMM of the same design; else a clear error."""
    from lmdm.builders import lmm_args
    from lmdm.checkpoints.compat import check_fingerprints
    from lmdm.checkpoints.errors import CheckpointError
    from lmdm.checkpoints.format import read_checkpoint_info

    if stage == "rvq":
        if cfg.train.init is not None:
            raise ValueError("the rvq stage starts from k-means on the data; train.init does not apply (unset it)")
        return
    info = _tokenizer_info(cfg)
    levels, codes = info.args.get("levels"), info.args.get("codes")
    if (levels, codes) != (cfg.rvq.levels, cfg.rvq.codes):
        raise CheckpointError(
            f"lmm.tokenizer={cfg.lmm.tokenizer} has {levels} levels of {codes} codes, but the config's LMM expects rvq.levels="
            f"{cfg.rvq.levels} of rvq.codes={cfg.rvq.codes}: set rvq.levels={levels} rvq.codes={codes}, or train an RVQ for this config"
        )
    check_fingerprints(info, autoencoder=trained.get("autoencoder"), text_encoder=None, what="these latents")
    if cfg.train.init is not None:
        init = read_checkpoint_info(cfg.train.init)
        if init.kind != "lmm" or init.args != dataclasses.asdict(lmm_args(cfg)):
            raise CheckpointError(
                f"train.init={cfg.train.init} is not an LMM of the config's design and sizes (lmm.kind={cfg.lmm.kind}, lmm.{cfg.lmm.kind}.*)"
            )


def _log_stage_params(cfg: Config, stage: str, run_id: str) -> None:
    """The stage's resolved config (absolute paths, stage overrides) as the run's params, every key the run
    does not hold yet (a parent command may have logged its own; MLflow refuses changing a value)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from lmdm.eval.tracking import flatten

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    held = client.get_run(run_id).data.params
    params = {**flatten(cfg.model_dump(mode="json")), "stage": stage}
    new = [Param(k, v) for k, v in params.items() if k not in held]
    for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=new[i : i + 100])


def _read_order(items: list[Any], cfg: Config) -> list[Any]:
    """``items`` in a seeded random order (``train.shuffle_buffer`` > 0), so workers do not read the
    inputs in the order they were written (clip by clip, shard by shard)."""
    if not cfg.train.shuffle_buffer:
        return list(items)
    order = list(items)
    random.Random(cfg.train.seed).shuffle(order)
    return order


LATENT_COLUMNS = ["caption", "latent_channels", "latent_frames", "latent_mean"]


def latent_dataset(shards: list[str]) -> Any:
    """The DiT stages' Ray Dataset: the listed latent shards (``shard_*.parquet``), in that order.

    Read with Ray Data's first Parquet datasource (``use_datasource_v2=False``), not the default V2:
    Ray Train runs the dataset again every epoch, and V2's ``ListFiles`` step starts 32 footer-reader
    actors (new worker processes) each time. On 2 cores that took 7-20 s per epoch against 0.3 s for
    V1 on the quickstart's one shard, and a small dataset has few batches per epoch (six per worker in
    ``lmdm quickstart --quick``). V1 reads the footers on the driver, once, when the dataset is made.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(shards).select_columns(LATENT_COLUMNS)
    finally:
        context.use_datasource_v2 = v2


def _audio_dataset(cfg: Config) -> Any:
    """Autoencoder stage: audio chunks of ``train.audio_chunk_frames`` latent frames, decoded by Ray Data tasks."""

    from lmdm.data.chunks import list_inputs
    from lmdm.pipelines.precompute import chunk_dataset

    source_path = cfg.data.root if cfg.data.source == "corpus" else cfg.data.path
    assert source_path is not None
    records = _read_order(list_inputs(cfg.data.source, source_path, cfg.data.captions, split="train"), cfg)
    ds = chunk_dataset(cfg, records, cfg.autoencoder.downsampling_ratio, cfg.train.audio_chunk_frames)
    return ds.filter(lambda row: not row["error"]).select_columns(["audio"])


def _captioned_audio_dataset(cfg: Config) -> Any:
    """Embedder stage: ``embedder.chunk_seconds`` of audio and its input's caption, from the training split."""
    from lmdm.data.chunks import list_inputs
    from lmdm.pipelines.precompute import chunk_dataset

    source_path = cfg.data.root if cfg.data.source == "corpus" else cfg.data.path
    assert source_path is not None
    records = _read_order(list_inputs(cfg.data.source, source_path, cfg.data.captions, split="train"), cfg)
    hop = cfg.audio.sample_rate // cfg.data.frame_rate
    frames = max(1, round(cfg.embedder.chunk_seconds * cfg.data.frame_rate))
    ds = chunk_dataset(cfg, records, hop, frames)
    return ds.filter(lambda row: not row["error"]).select_columns(["audio", "caption"])


# Settings that change where or how long a run goes, not what it trains: a rerun that differs only in
# these resumes the same Ray Train run (its latest checkpoint), e.g. to extend `train.steps`.
_RESUMABLE_CHANGES = {
    "train": ("steps", "checkpoint_every", "storage_path", "max_failures", "fail_once_at_step"),
    "tracking": None,
    "ray": None,
    "quickstart": None,
    "pretrain": None,
    "arc": ("autoencoder", "sample_blocks"),
}
# Sections a stage never reads: a change there neither starts a new run of that stage nor stops a resume (a
# long autoencoder run continues while the DiT settings that come after it are still being chosen).
_UNREAD_SECTIONS = {
    "autoencoder": ("dit", "stream", "text", "precompute", "embedder", "eval", "serve", "rvq", "lmm", "arc"),
    "embedder": ("autoencoder", "dit", "stream", "precompute", "eval", "serve", "rvq", "lmm", "arc"),
    "rvq": ("dit", "stream", "text", "precompute", "embedder", "eval", "serve", "lmm", "arc"),
    "lmm": ("precompute", "embedder", "eval", "serve", "arc"),
    "base": ("arc",),
    "lmdm": ("arc",),
    "arc": ("precompute", "embedder", "eval", "serve", "rvq", "lmm"),
}


def run_name(cfg: Config, stage: str, latents: Path | None) -> str:
    """The Ray Train run folder under ``train.storage_path``: ``<config name>-<stage>-<fingerprint>``.

    Ray Train resumes a run whose folder already exists. The fingerprint (model, data, optimizer and
    every other setting outside :data:`_RESUMABLE_CHANGES` and the sections the stage never reads,
    :data:`_UNREAD_SECTIONS`, plus the latents folder and the SHA-256 of ``train.init``'s weights) keeps a
    rerun with other settings, or from other weights, from silently continuing an old run's checkpoint.
    """
    settings = cfg.model_dump(mode="json")
    for section in _UNREAD_SECTIONS.get(stage, ()):
        settings.pop(section, None)
    for section, keys in _RESUMABLE_CHANGES.items():
        if keys is None:
            settings.pop(section, None)
        else:
            for key in keys:
                settings.get(section, {}).pop(key, None)
    settings["stage"], settings["latents"] = stage, str(Path(latents).resolve()) if latents else None
    if cfg.train.init is not None:
        # A run starts from the init's weights, not its folder's name: a base reshipped at the same path (a
        # new `builtin:corpus-base`, a retrained `runs/<name>/base`) must not resume the old base's fine-tune.
        weights = Path(cfg.train.init) / "model.safetensors"
        settings["train"]["init"] = file_sha256(weights) if weights.is_file() else str(Path(cfg.train.init).resolve())
    if stage == "lmm" and cfg.lmm.tokenizer is not None:  # likewise the tokenizer: its codes are the data
        weights = Path(cfg.lmm.tokenizer) / "model.safetensors"
        settings["lmm"]["tokenizer"] = file_sha256(weights) if weights.is_file() else str(Path(cfg.lmm.tokenizer).resolve())
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.name}-{stage}-{digest}"


class ProgressBoard:
    """The driver's end of the progress channel: rank 0 puts its latest ``{step, steps, loss, samples_per_s}``
    (fire-and-forget actor calls), the driver polls :meth:`get`. Runs as a zero-CPU Ray actor."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] | None = None

    def put(self, update: dict[str, Any]) -> None:
        self.latest = update

    def get(self) -> dict[str, Any] | None:
        return self.latest


@contextmanager
def _progress_board(progress: Callable[[dict[str, Any]], None] | None, every_s: float = 0.5) -> Iterator[Any]:
    """A :class:`ProgressBoard` actor and a thread that polls it every ``every_s`` and calls ``progress``
    with each new update (``None`` when there is no ``progress``)."""
    if progress is None:
        yield None
        return
    import ray

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    stop, seen = threading.Event(), [None]

    def poll() -> None:
        while True:
            stopping = stop.wait(every_s)
            try:
                update = ray.get(board.get.remote(), timeout=10)
            except Exception:
                update = None
            if update is not None and update != seen[0]:
                seen[0] = update
                progress(update)
            if stopping:
                return

    thread = threading.Thread(target=poll, name="lmdm-train-progress", daemon=True)
    thread.start()
    try:
        yield board
    finally:
        stop.set()
        thread.join(timeout=15)
        ray.kill(board)


def _absolute(cfg: Config) -> Config:
    """A copy of ``cfg`` with every path a worker reads made absolute (workers run in other directories)."""
    from lmdm.eval.tracking import absolute_tracking_uri

    cfg = cfg.model_copy(deep=True)
    cfg.tracking.tracking_uri = absolute_tracking_uri(cfg.tracking.tracking_uri)
    cfg.train.storage_path = Path(cfg.train.storage_path).resolve()
    if cfg.train.init is not None:
        cfg.train.init = Path(cfg.train.init).resolve()
    if cfg.lmm.tokenizer is not None:
        cfg.lmm.tokenizer = Path(cfg.lmm.tokenizer).resolve()
    return cfg


def _dataset(cfg: Config, stage: str, latents: Path | None) -> Any:
    if stage == "autoencoder":
        return _audio_dataset(cfg)
    if stage == "embedder":
        return _captioned_audio_dataset(cfg)
    assert latents is not None
    shards = _read_order(sorted(str(p) for p in latents.glob("shard_*.parquet")), cfg)  # not text_embeddings.parquet
    return latent_dataset(shards)


def _trainer(cfg: Config, stage: str, latents: Path | None, trained: dict[str, Any], extra: dict[str, Any]) -> Any:
    """The ``TorchTrainer`` whose workers run :func:`lmdm.pipelines.recipe.train_worker` on ``cfg.train.workers`` workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "stage": stage, "latents": str(latents or ""), "trained": trained, **extra},
        torch_config=TorchConfig(backend=process_group_backend(cfg)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu, resources_per_worker={"CPU": cfg.train.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=run_name(cfg, stage, latents),
            storage_path=str(cfg.train.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets={"train": _dataset(cfg, stage, latents)},
    )


def run_train(
    cfg: Config,
    stage: str,
    latents: Path | None,
    mlflow_run_id: str | None = None,
    measure: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``stage`` on the latent shards in ``latents`` with ``cfg.train.workers`` Ray Train workers.

    Args:
        mlflow_run_id: an existing MLflow run (e.g. the stage's nested run) that rank 0 logs metrics into.
        measure: also report samples/s (after the first step) and every worker's training-state bytes
            (:func:`training_state_bytes`) with the last step (``lmdm bench train``).
        progress: called on the driver with rank 0's latest ``{step, steps, loss, samples_per_s}``
            (about twice a second, from another thread; a progress bar).

    Returns:
        The latest checkpoint folder (``model/`` and ``ema/`` inside, in our format) and final metrics.

    Raises:
        ValueError: an unknown stage; :class:`~lmdm.checkpoints.errors.CheckpointError` (a ``ValueError``):
            a ``train.init`` that does not fit the run.
        FileNotFoundError: no precomputed latents for a DiT stage.
    """
    from lmdm.pipelines.ray_session import ensure_ray

    cfg = _absolute(cfg)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (available: {', '.join(STAGES)})")
    if stage == "autoencoder" and cfg.train.autoencoder.adversarial and cfg.train.strategy == "deepspeed":
        raise ValueError(
            "the autoencoder stage with a discriminator has two optimizers, which Accelerate's DeepSpeed path does not "
            "support: use train.strategy=ddp (or set train.autoencoder.adversarial_weight and feature_matching_weight to 0)"
        )
    manifest = None
    if stage in ("base", "lmdm", "rvq", "lmm", "arc"):
        if latents is None or not (Path(latents) / "manifest.json").is_file():
            raise FileNotFoundError(f"{latents}/manifest.json is missing: run `lmdm precompute` first (or point --latents at its output)")
        latents = Path(latents).resolve()
        manifest = json.loads((latents / "manifest.json").read_text())
        _require_chunks(latents, manifest, cfg)
    if stage == "arc":
        from lmdm.pipelines.arc import check_arc_data

        assert latents is not None and manifest is not None
        check_arc_data(cfg, latents, manifest)
    if stage == "lmm":
        _tokenizer_info(cfg)  # before anything reads it
    trained = _trained_with(cfg, stage, manifest)
    _check_init(cfg, stage, trained)
    ensure_ray(cfg)
    if mlflow_run_id:
        _log_stage_params(cfg, stage, mlflow_run_id)
    with _progress_board(progress) as board:
        trainer = _trainer(cfg, stage, latents, trained, {"mlflow_run_id": mlflow_run_id, "measure": measure, "progress": board})
        result = trainer.fit()
    folder = Path(result.checkpoint.path) if result.checkpoint is not None else None
    if mlflow_run_id and folder is not None:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=cfg.tracking.tracking_uri).set_tag(mlflow_run_id, "checkpoint", str(folder))
    return TrainResult(checkpoint=folder, metrics=dict(result.metrics or {}))
