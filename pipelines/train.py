"""``lmdm train``: Ray Train ``TorchTrainer`` + HF Accelerate (+ DeepSpeed ZeRO) for the DiT stages.

Stages here: ``base`` (bidirectional DiT with random inpainting masks: it is also the outpainting
baseline) and ``lmdm`` (the LMDM loss of DESIGN §4, ``stream.variant`` ``block_causal`` or
``encdec``, usually initialised from the base with ``train.init``). Data are the precomputed latent
shards (Ray Data, one shard per worker) and the caption-keyed text-embedding table.

Every ``train.checkpoint_every`` steps each rank saves its share of the training state
(``accelerator.save_state``: ZeRO shards optimizer state per rank) and reports it with
``ray.train.report`` (the only reports: Ray Train's report blocks until its controller polls);
rank 0 also writes the model in our format (``model/``) and its EMA
(``ema/``). A failed worker restarts the group from the latest checkpoint (``FailureConfig``), and the
step count continues. Metrics go to MLflow from rank 0 only, committed with each checkpoint (so a
resumed run's history has no duplicate steps).
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmdm.config import Config

__all__ = ["MIXED_PRECISION", "TrainResult", "process_group_backend", "run_name", "run_train", "training_state_bytes"]


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path | None  # the latest reported checkpoint folder
    metrics: dict[str, Any]


MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # train.precision → Accelerate's mixed_precision


def process_group_backend(cfg: Config) -> str:
    """``nccl`` on GPUs, ``gloo`` on CPUs (for Ray Train's process group and Accelerate's alike)."""
    return "nccl" if cfg.train.use_gpu else "gloo"


def _deepspeed_config(cfg: Config) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no fused_adam JIT build on CPU
        "gradient_clipping": cfg.train.grad_clip,
    }


def _text_table(latents: Path) -> dict[str, Any]:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    table = pq.read_table(latents / "text_embeddings.parquet").to_pylist()
    return {row["caption"]: torch.from_numpy(np.asarray(row["tokens"], dtype=np.float32).reshape(-1, row["dim"])) for row in table}


def _innermost(optimizer: Any) -> Any:
    """Accelerate's wrapper → (DeepSpeed's ZeRO optimizer →) the torch optimizer that holds the state."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _measure_at_next_step(model: Any, optimizer: Any, into: dict[str, int]) -> None:
    """Fill ``into`` with :func:`training_state_bytes` once, just before the torch optimizer's next step."""
    inner = _innermost(optimizer)

    def pre_hook(*_: Any) -> None:
        into.update(training_state_bytes(model, optimizer))
        handle.remove()

    handle = inner.register_step_pre_hook(pre_hook)


def training_state_bytes(model: Any, optimizer: Any) -> dict[str, int]:
    """Bytes of this worker's training state, measured from the tensors themselves (each storage once).

    ``params``: the model's parameters (a full replica under DDP and ZeRO-1/2 alike); ``grads``: their
    ``.grad`` tensors plus, under DeepSpeed ZeRO, its gradient buffers (this rank's reduced partition
    and the reduction buckets);
    ``optimizer``: every tensor in the wrapped torch optimizer's own ``state`` (Adam's moments). Under
    ZeRO the fp32 master partition that optimizer steps counts as parameters, its ``.grad`` as grads.
    DDP's internal gradient buckets are not reachable through a public API and are not counted.
    """
    import torch

    seen: set[int] = set()

    def size(tensors: Any) -> int:
        total = 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel():
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
        return total

    module = getattr(model, "module", model)
    params = list(module.parameters())
    inner = _innermost(optimizer)
    zero_opt = getattr(model, "optimizer", None)  # a DeepSpeed engine's ZeRO optimizer (DDP: none)
    # Parameters: the model's, plus under ZeRO the fp32 master partition its optimizer steps.
    masters = [p for group in inner.param_groups for p in group["params"]]
    figures = {"params": size(params) + size(masters)}
    grads = [p.grad for p in params + masters]
    if hasattr(zero_opt, "single_partition_of_fp32_groups"):
        averaged = getattr(zero_opt, "averaged_gradients", {}).values()  # per group: a tensor or a list of them
        grads += [t for v in averaged for t in (v if isinstance(v, list) else [v])]
        grads.append(getattr(zero_opt, "grads_in_partition", None))  # ZeRO-2: this rank's reduced gradients
        grads += [t for bucket in getattr(zero_opt, "ipg_buckets", {}).values() for t in getattr(bucket, "buffer", [])]
    figures["grads"] = size(grads)
    figures["optimizer"] = size(t for per_param in inner.state.values() for t in per_param.values())
    figures["total"] = figures["params"] + figures["grads"] + figures["optimizer"]
    return figures


class _StageLoss:
    """Built inside the worker (torch imported there): an ``nn.Module`` whose ``forward`` is the stage's
    loss, so DDP / DeepSpeed wrap it and their forward hooks run (the DiT's own methods are not ``forward``)."""

    @staticmethod
    def build(cfg: Config, stage: str, dit: Any, generator: Any) -> Any:
        from torch import Tensor, nn

        from lmdm.builders import build_geometry
        from lmdm.diffusion.objectives import get_objective
        from lmdm.training.losses import base_inpainting_loss, lmdm_block_causal_loss, lmdm_encdec_loss

        objective, geometry = get_objective(cfg.dit.objective), build_geometry(cfg)
        Bf, Ctx, t = geometry.block_frames, geometry.context_blocks, cfg.train

        class AutoencoderStageLoss(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.dit = dit  # the autoencoder (one attribute name for every stage's model)

            def forward(self, audio: Tensor, text: Tensor | None) -> Tensor:
                from lmdm.training.autoencoder_loss import autoencoder_loss

                return autoencoder_loss(self.dit, audio, t.kl_weight, generator).loss

        if stage == "autoencoder":
            return AutoencoderStageLoss()

        class StageLoss(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.dit = dit

            def forward(self, lat: Tensor, text: Tensor | None) -> Tensor:
                T = lat.shape[-1]
                if stage == "base" or cfg.stream.variant == "encdec":
                    W = (Ctx + 1) * Bf
                    if W > T:
                        raise ValueError(f"a window of {W} latent frames does not fit chunks of {T}: raise precompute.chunk_frames")
                    start = int(torch_randint(T - W + 1, generator))
                    window = lat[..., start : start + W]
                    if stage == "base":
                        return base_inpainting_loss(self.dit, objective, window, text, generator=generator, cfg_dropout=t.cfg_dropout).loss
                    return lmdm_encdec_loss(
                        self.dit, objective, geometry, window[..., : Ctx * Bf], window[..., Ctx * Bf :], text, generator=generator,
                        context_dropout=t.context_dropout, oldest_dropout=t.oldest_dropout, cfg_dropout=t.cfg_dropout,
                    ).loss  # fmt: skip
                N = T // Bf
                return lmdm_block_causal_loss(
                    self.dit, objective, geometry, lat[..., : N * Bf], text, targets_per_sequence=min(t.targets_per_sequence, N),
                    generator=generator, context_dropout=t.context_dropout, oldest_dropout=t.oldest_dropout, cfg_dropout=t.cfg_dropout,
                ).loss  # fmt: skip

        return StageLoss()


def torch_randint(high: int, generator: Any) -> int:
    import torch

    return int(torch.randint(0, high, (1,), generator=generator))


def _train_loop(config: dict[str, Any]) -> None:  # runs on every Ray Train worker
    import mlflow
    import numpy as np
    import ray.train
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    from lmdm.builders import build_autoencoder_from, build_dit
    from lmdm.checkpoints.format import load_checkpoint, save_checkpoint

    cfg = Config.model_validate(config["cfg"])
    stage, latents = config["stage"], Path(config["latents"])
    torch.set_num_threads(cfg.train.torch_threads)
    plugin = DeepSpeedPlugin(hf_ds_config=_deepspeed_config(cfg)) if cfg.train.strategy == "deepspeed" else None
    # On CPU, DDP needs `cpu=True` (else Accelerate runs every worker unsynchronised), while DeepSpeed must
    # not get it (Accelerate would silently drop DeepSpeed for DDP); the process-group kwargs (gloo on CPU,
    # nccl on GPUs) make Accelerate see every process under DeepSpeed.
    accelerator = Accelerator(
        cpu=plugin is None and not cfg.train.use_gpu,
        deepspeed_plugin=plugin,
        kwargs_handlers=[InitProcessGroupKwargs(backend=process_group_backend(cfg))],
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=MIXED_PRECISION[cfg.train.precision],
    )
    if accelerator.num_processes > 1 and str(accelerator.distributed_type) == "DistributedType.NO":
        raise RuntimeError(f"Accelerate sees {accelerator.num_processes} processes but no distributed backend: gradients would not sync")
    rank = ray.train.get_context().get_world_rank()
    if plugin is not None and type(accelerator.state.deepspeed_plugin).__name__ != "DeepSpeedPlugin":
        raise RuntimeError("DeepSpeed was requested but Accelerate is not using it")
    torch.manual_seed(cfg.train.seed)
    build = build_autoencoder_from if stage == "autoencoder" else build_dit
    dit = build(cfg)
    if cfg.train.init is not None:
        init, _ = load_checkpoint(cfg.train.init)
        dit.load_state_dict(init.state_dict())
    ema = {k: v.detach().clone() for k, v in dit.state_dict().items()} if rank == 0 else None
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
    model = _StageLoss.build(cfg, stage, dit, generator)
    # Stable Audio's autoencoder recipe uses betas (0.8, 0.99); the DiT stages keep AdamW's defaults.
    betas = (0.8, 0.99) if stage == "autoencoder" else (0.9, 0.999)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=betas)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            accelerator.load_state(str(Path(folder) / "state"))
            step = json.loads((Path(folder) / "step.json").read_text())["step"]
            if ema is not None and (Path(folder) / "ema").is_dir():
                ema = dict(load_checkpoint(Path(folder) / "ema")[0].state_dict())
    texts = _text_table(latents) if stage != "autoencoder" else {}
    run = None
    if rank == 0 and config.get("mlflow_run_id"):
        mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
        run = mlflow.start_run(run_id=config["mlflow_run_id"])
        mlflow.set_tag("engine", type(model).__name__)
    shard = ray.train.get_dataset_shard("train")
    fixed: dict[str, Any] | None = None
    pending_metrics: list[Any] = []
    clock, state_bytes = (time.perf_counter(), step), dict[str, int]()
    last_step_at, grad_norm = time.perf_counter(), float("nan")
    reports = 0  # ray.train.report calls by this worker in this attempt (one per checkpoint)
    epoch = 0
    while step < cfg.train.steps:
        epoch += 1
        for batch in epoch_batches(shard, cfg, rank, epoch):
            if cfg.train.overfit_batch:  # the same batch *and* the same noise, timesteps and masks every step
                fixed = fixed or batch
                batch = fixed
                generator.manual_seed(cfg.train.seed * 1000 + rank)
            if stage == "autoencoder":
                lat, text = torch.from_numpy(np.ascontiguousarray(batch["audio"], dtype=np.float32)), None
            else:
                D, T = int(batch["latent_channels"][0]), int(batch["latent_frames"][0])
                lat = torch.from_numpy(np.stack([np.asarray(m, dtype=np.float32) for m in batch["latent_mean"]])).reshape(-1, D, T)
                text = torch.stack([texts[str(c)] for c in batch["caption"]]) if cfg.dit.cond_token_dim else None
            with accelerator.accumulate(model):
                loss = model(lat, text)
                if config.get("measure") and step + 1 == cfg.train.steps and not state_bytes:
                    # Measured inside the torch optimizer's step (DDP: full gradients; ZeRO: this rank's
                    # partition), where gradients, parameters and Adam state all exist at once.
                    _measure_at_next_step(model, optimizer, state_bytes)
                accelerator.backward(loss)
                if plugin is None and accelerator.sync_gradients:  # DeepSpeed clips itself (gradient_clipping)
                    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
                optimizer.step()
                optimizer.zero_grad()
                if plugin is not None and accelerator.sync_gradients:
                    grad_norm = float(model.get_global_grad_norm() or float("nan"))  # the DeepSpeed engine's, before clipping
            step += 1
            drill = cfg.train.fail_once_at_step
            marker = Path(cfg.train.storage_path).resolve() / f"{cfg.name}-{stage}.failed-once"
            if drill is not None and step == drill and rank == min(1, accelerator.num_processes - 1) and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text("the fault-tolerance drill raised here once")
                raise RuntimeError(f"fault-tolerance drill: rank {rank} fails at step {step}")
            metrics = {"step": step, "train/loss": float(loss.detach()), "engine": type(model).__name__}
            if config.get("measure"):
                if step == 1:  # the first step (allocations, DeepSpeed's lazy buffers) is not timed
                    clock = (time.perf_counter(), step)
                if step == cfg.train.steps:
                    seconds = time.perf_counter() - clock[0]
                    samples = (step - clock[1]) * cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
                    metrics["samples_per_s"] = samples / seconds if seconds > 0 else float("nan")
                    per_rank: list[Any] = [None] * accelerator.num_processes
                    torch.distributed.all_gather_object(per_rank, state_bytes)
                    metrics["state_bytes_per_worker"] = per_rank
            if ema is not None:
                with torch.no_grad():
                    for k, v in accelerator.unwrap_model(model).dit.state_dict().items():
                        if ema[k].is_floating_point():
                            ema[k].lerp_(v.detach().to(ema[k].dtype), 1 - cfg.train.ema_decay)
                        else:
                            ema[k].copy_(v)
            now, stamp = time.perf_counter(), int(time.time() * 1000)
            rows = cfg.train.batch_size * accelerator.num_processes
            per_step = {
                "train/loss": metrics["train/loss"],
                "train/lr": float(optimizer.param_groups[0]["lr"]),
                "train/grad_norm": grad_norm,
                "train/samples_per_s": rows / (now - last_step_at) if now > last_step_at else float("nan"),
            }
            last_step_at = now
            pending_metrics += [mlflow.entities.Metric(key, value, stamp, step) for key, value in per_step.items()]
            if step % cfg.train.checkpoint_every == 0 or step >= cfg.train.steps:
                # Metrics are committed with checkpoints: steps after the last checkpoint are recomputed after
                # a failure, so MLflow keeps one continuous history without duplicate steps.
                if run is not None:
                    mlflow.tracking.MlflowClient().log_batch(run.info.run_id, metrics=pending_metrics)
                pending_metrics = []
                with tempfile.TemporaryDirectory() as folder:
                    accelerator.save_state(str(Path(folder) / "state"))
                    if rank == 0:
                        (Path(folder) / "step.json").write_text(json.dumps({"step": step}))
                        save_checkpoint(Path(folder) / "model", accelerator.unwrap_model(model).dit, {"stage": stage, "step": step})
                        ema_model = build(cfg)
                        ema_model.load_state_dict(ema)  # type: ignore[arg-type]
                        save_checkpoint(Path(folder) / "ema", ema_model, {"stage": stage, "step": step, "ema_decay": cfg.train.ema_decay})
                    reports += 1
                    ray.train.report({**metrics, "reports": reports}, checkpoint=ray.train.Checkpoint.from_directory(folder))
            # No `ray.train.report` between checkpoints: each report blocks until the Train controller
            # polls the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), which capped
            # training at one step per 2 s. Per-step metrics reach MLflow from rank 0 (above).
            if step >= cfg.train.steps:
                break
    if run is not None:
        mlflow.end_run()


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


def epoch_batches(shard: Any, cfg: Config, rank: int, epoch: int) -> Any:
    """One epoch of a worker's Ray Data shard as numpy batches of ``train.batch_size`` rows, shuffled
    through a local buffer of ``train.shuffle_buffer`` rows seeded by (seed, rank, epoch).

    Inputs arrive grouped (every chunk of one clip in one block): without the buffer a batch would be
    consecutive seconds of a single clip.
    """
    buffer = cfg.train.shuffle_buffer
    return shard.iter_batches(
        batch_size=cfg.train.batch_size,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=buffer or None,
        local_shuffle_seed=(cfg.train.seed * 1_000_003 + rank * 1009 + epoch) if buffer else None,
    )


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
    records = _read_order(list_inputs(cfg.data.source, source_path, cfg.data.captions), cfg)
    ds = chunk_dataset(cfg, records, cfg.autoencoder.downsampling_ratio, cfg.train.audio_chunk_frames)
    return ds.filter(lambda row: not row["error"]).select_columns(["audio"])


# Settings that change where or how long a run goes, not what it trains: a rerun that differs only in
# these resumes the same Ray Train run (its latest checkpoint), e.g. to extend `train.steps`.
_RESUMABLE_CHANGES = {
    "train": ("steps", "checkpoint_every", "storage_path", "max_failures", "fail_once_at_step"),
    "tracking": None,
    "ray": None,
    "quickstart": None,
}


def run_name(cfg: Config, stage: str, latents: Path | None) -> str:
    """The Ray Train run folder under ``train.storage_path``: ``<config name>-<stage>-<fingerprint>``.

    Ray Train resumes a run whose folder already exists. The fingerprint (model, data, optimizer and
    every other setting outside :data:`_RESUMABLE_CHANGES`, plus the latents folder) keeps a rerun with
    other settings from silently continuing an old run's checkpoint.
    """
    settings = cfg.model_dump(mode="json")
    for section, keys in _RESUMABLE_CHANGES.items():
        if keys is None:
            settings.pop(section, None)
        else:
            for key in keys:
                settings[section].pop(key, None)
    settings["stage"], settings["latents"] = stage, str(Path(latents).resolve()) if latents else None
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.name}-{stage}-{digest}"


def run_train(cfg: Config, stage: str, latents: Path | None, mlflow_run_id: str | None = None, measure: bool = False) -> TrainResult:
    """Train ``stage`` on the latent shards in ``latents`` with ``cfg.train.workers`` Ray Train workers.

    Args:
        mlflow_run_id: an existing MLflow run (e.g. the stage's nested run) that rank 0 logs metrics into.
        measure: also report samples/s (after the first step) and every worker's training-state bytes
            (:func:`training_state_bytes`) with the last step (``lmdm bench train``).

    Returns:
        The latest checkpoint folder (``model/`` and ``ema/`` inside, in our format) and final metrics.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from lmdm.eval.tracking import absolute_tracking_uri
    from lmdm.pipelines.ray_session import ensure_ray

    # Workers run in other directories: every path they read must be absolute.
    cfg = cfg.model_copy(deep=True)
    cfg.tracking.tracking_uri = absolute_tracking_uri(cfg.tracking.tracking_uri)
    cfg.train.storage_path = Path(cfg.train.storage_path).resolve()
    if cfg.train.init is not None:
        cfg.train.init = Path(cfg.train.init).resolve()
    if stage not in ("autoencoder", "base", "lmdm"):
        raise ValueError(f"stage {stage!r} is not implemented yet (available: autoencoder, base, lmdm)")
    ensure_ray(cfg)
    if stage == "autoencoder":
        dataset = _audio_dataset(cfg)
    else:
        if latents is None or not (Path(latents) / "manifest.json").is_file():
            raise FileNotFoundError(f"{latents}/manifest.json is missing: run `lmdm precompute` first (or point --latents at its output)")
        latents = Path(latents).resolve()
        shards = _read_order(sorted(str(p) for p in latents.glob("shard_*.parquet")), cfg)  # not text_embeddings.parquet
        dataset = latent_dataset(shards)
    storage = Path(cfg.train.storage_path).resolve()
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "stage": stage,
            "latents": str(latents or ""),
            "mlflow_run_id": mlflow_run_id,
            "measure": measure,
        },
        torch_config=TorchConfig(backend=process_group_backend(cfg)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu, resources_per_worker={"CPU": cfg.train.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=run_name(cfg, stage, latents),
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets={"train": dataset},
    )
    if mlflow_run_id:
        _log_stage_params(cfg, stage, mlflow_run_id)
    result = trainer.fit()
    folder = Path(result.checkpoint.path) if result.checkpoint is not None else None
    if mlflow_run_id and folder is not None:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=cfg.tracking.tracking_uri).set_tag(mlflow_run_id, "checkpoint", str(folder))
    return TrainResult(checkpoint=folder, metrics=dict(result.metrics or {}))
