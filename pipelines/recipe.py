"""The training recipe every Ray Train worker runs (torchtune's shape: setup, resume, train step,
checkpoint + report, tracking), with callbacks for what is not training itself.

One :class:`StageRecipe` per worker and attempt. :meth:`StageRecipe.train` is the whole loop; the
fault-tolerance drill (:class:`FaultDrill`), the training-state measurement of ``lmdm bench train``
(:class:`MeasureState`) and the driver's progress bar (:class:`ReportProgress`) are callbacks.

Every ``train.checkpoint_every`` steps each rank saves its share of the training state
(``accelerator.save_state``: ZeRO shards optimizer state per rank) and reports it with
``ray.train.report`` (the only reports: each one blocks until Ray Train's controller polls the
workers, every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default). Rank 0 also writes the model
(``model/``) and its EMA (``ema/``) in our format, saying what they are (:class:`TrainedWith`), and
commits the per-step metrics to MLflow with each checkpoint, so a resumed run's history has no
duplicate steps. Progress goes to the driver through a Ray actor, fire-and-forget (never blocks).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmdm.config import Config

__all__ = [
    "MIXED_PRECISION",
    "Callback",
    "FaultDrill",
    "MeasureState",
    "ReportProgress",
    "StageRecipe",
    "lr_factor",
    "process_group_backend",
    "train_worker",
]

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # train.precision → Accelerate's mixed_precision


def process_group_backend(cfg: Config) -> str:
    """``nccl`` on GPUs, ``gloo`` on CPUs (for Ray Train's process group and Accelerate's alike)."""
    return "nccl" if cfg.train.use_gpu else "gloo"


class Callback:
    """Hooks a recipe calls around each optimizer step (no-ops by default)."""

    def before_step(self, recipe: StageRecipe) -> None:
        """Before the forward pass of step ``recipe.step + 1``."""

    def after_step(self, recipe: StageRecipe, metrics: dict[str, Any]) -> None:
        """After step ``recipe.step``; may add to ``metrics`` (what the next report carries)."""


class EmptyShardError(ValueError):
    """A worker's share of the training data holds less than one batch (it would never take a step)."""


class StageRecipe:
    """One worker's training of one stage (``autoencoder``, ``base``, ``lmdm``, ``embedder``, ``rvq`` or ``lmm``).

    The ``rvq`` stage has no gradients: its codebooks are moving averages (:meth:`ResidualVQ.update
    <lmdm.models.rvq.ResidualVQ.update>`) whose statistics every step sums over the workers with
    ``torch.distributed`` collectives, so no optimizer, DDP or DeepSpeed wraps it (``train.strategy`` does not
    apply) and its checkpoints hold the codebooks themselves (``model/``, no ``ema/``)."""

    def __init__(self, config: dict[str, Any], callbacks: list[Callback]) -> None:
        import ray.train

        self.cfg = Config.model_validate(config["cfg"])
        self.stage, self.latents = config["stage"], Path(config["latents"])
        self.trained, self.mlflow_run_id = config.get("trained", {}), config.get("mlflow_run_id")
        self.rank = ray.train.get_context().get_world_rank()
        self.callbacks = callbacks
        self.step, self.grad_norm, self.loss = 0, float("nan"), float("nan")
        self.train_seconds = 0.0  # wall time of the training steps, summed over every attempt and rerun (restored on resume)
        self.parts: dict[str, float] = {}  # the loss's parts at the last step (autoencoder stage), logged as train/<part>
        self.pending_metrics: list[Any] = []
        self.reports = 0  # ray.train.report calls by this worker in this attempt (one per checkpoint)

    # ---- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        import torch

        torch.set_num_threads(self.cfg.train.torch_threads)
        torch.manual_seed(self.cfg.train.seed)
        self.accelerator = self._accelerator()
        self.module = self._build_model()
        self.ema = {k: v.detach().clone() for k, v in self.module.state_dict().items()} if self.rank == 0 and self.stage != "rvq" else None
        # On the training device: the losses draw every random tensor on the generator's device.
        self.generator = torch.Generator(device=self.accelerator.device).manual_seed(self.cfg.train.seed * 1000 + self.rank)
        t = self.cfg.train
        self.discriminator, self.disc_optimizer = self._discriminator()
        loss = _StageLoss.build(self.cfg, self.stage, self.module, self.generator, self.discriminator)
        self.texts = _text_table(self.latents) if self.stage in ("base", "lmdm", "lmm") else {}
        if self.stage == "rvq":  # moving averages, no gradients: nothing for an optimizer or a data-parallel wrapper
            self.model, self.optimizer = loss.to(self.accelerator.device), None
            self._start_tracking()
            return
        # Stable Audio's autoencoder recipe uses betas (0.8, 0.99); the DiT stages keep AdamW's defaults.
        betas = (0.8, 0.99) if self.stage == "autoencoder" else (0.9, 0.999)
        optimizer = torch.optim.AdamW([p for p in loss.parameters() if p.requires_grad], lr=t.lr, betas=betas)
        self.model, self.optimizer = self.accelerator.prepare(loss, optimizer)
        if self.discriminator is not None:
            self.discriminator, self.disc_optimizer = self.accelerator.prepare(self.discriminator, self.disc_optimizer)
        self._start_tracking()

    def _discriminator(self) -> tuple[Any, Any]:
        """The autoencoder stage's multi-scale STFT discriminator and its optimizer, where its weights ask for one."""
        import torch

        t, a = self.cfg.train, self.cfg.train.autoencoder
        if self.stage != "autoencoder" or not a.adversarial:
            return None, None
        from lmdm.training.autoencoder_loss import MultiScaleSTFTDiscriminator

        torch.manual_seed(t.seed + 1)
        discriminator = MultiScaleSTFTDiscriminator(a.discriminator_ffts, self.cfg.audio.channels, a.discriminator_filters)
        optimizer = torch.optim.AdamW(discriminator.parameters(), lr=a.discriminator_lr or t.lr, betas=(0.8, 0.99))
        return discriminator, optimizer

    def _accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        t = self.cfg.train
        self.deepspeed = t.strategy == "deepspeed"
        if self.deepspeed and not t.use_gpu:
            _no_deepspeed_ops()
        plugin = DeepSpeedPlugin(hf_ds_config=_deepspeed_config(self.cfg)) if self.deepspeed else None
        # On CPU, DDP needs `cpu=True` (else Accelerate runs every worker unsynchronised), while DeepSpeed must
        # not get it (Accelerate would silently drop DeepSpeed for DDP); the process-group kwargs (gloo on CPU,
        # nccl on GPUs) make Accelerate see every process under DeepSpeed.
        accelerator = Accelerator(
            cpu=plugin is None and not t.use_gpu,
            deepspeed_plugin=plugin,
            kwargs_handlers=[InitProcessGroupKwargs(backend=process_group_backend(self.cfg))],
            gradient_accumulation_steps=t.grad_accum,
            mixed_precision=MIXED_PRECISION[t.precision],
        )
        if accelerator.num_processes > 1 and str(accelerator.distributed_type) == "DistributedType.NO":
            raise RuntimeError(
                f"Accelerate sees {accelerator.num_processes} processes but no distributed backend: gradients would not sync"
            )
        if plugin is not None and type(accelerator.state.deepspeed_plugin).__name__ != "DeepSpeedPlugin":
            raise RuntimeError("DeepSpeed was requested but Accelerate is not using it")
        return accelerator

    def _build_model(self) -> Any:
        """The stage's model, from ``train.init`` when set (a narrower DiT widened with zeros: DESIGN §6)."""
        from lmdm.builders import build_autoencoder_from, build_dit
        from lmdm.checkpoints.compat import load_init

        if self.stage == "embedder":
            from lmdm.builders import build_embedder
            from lmdm.text.encoders import build_text_encoder

            self.sentences = _SentenceTable(build_text_encoder(self.cfg))
            return build_embedder(self.cfg, self.sentences.dim)
        if self.stage == "rvq":
            from lmdm.builders import build_rvq

            return build_rvq(self.cfg)
        if self.stage == "lmm":
            from lmdm.builders import build_lmm
            from lmdm.checkpoints.format import load_checkpoint, load_state_strict

            assert self.cfg.lmm.tokenizer is not None  # checked on the driver
            lmm = build_lmm(self.cfg, tokenizer=load_checkpoint(self.cfg.lmm.tokenizer, kind="rvq")[0])  # type: ignore[arg-type]
            if self.cfg.train.init is not None:
                load_state_strict(lmm, load_checkpoint(self.cfg.train.init, kind="lmm")[0].state_dict(), str(self.cfg.train.init))
            return lmm
        module: Any = build_autoencoder_from(self.cfg) if self.stage == "autoencoder" else build_dit(self.cfg)
        if self.cfg.train.init is not None:
            load_init(module, self.cfg.train.init)
        if getattr(module, "args", None) is not None and module.args.global_cond_dim:
            module.to_global_embed.requires_grad_(False)  # imported timing conditioning: no stage feeds it yet
        return module

    def _start_tracking(self) -> None:
        """Rank 0 logs into the stage's MLflow run. Steps it already holds (logged by an attempt that died
        after its last checkpoint Ray Train committed) keep their values: a retried step is not logged twice."""
        self.run, self.logged_through = None, 0
        if self.rank == 0 and self.mlflow_run_id:
            import mlflow

            mlflow.set_tracking_uri(self.cfg.tracking.tracking_uri)
            self.run = mlflow.start_run(run_id=self.mlflow_run_id)
            mlflow.set_tag("engine", type(self.model).__name__)
            history = mlflow.tracking.MlflowClient().get_metric_history(self.mlflow_run_id, "train/loss")
            self.logged_through = max((m.step for m in history), default=0)

    # ---- resume -----------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from Ray Train's latest checkpoint (after a failure, or a rerun of the same run)."""
        import ray.train

        from lmdm.checkpoints.format import load_checkpoint

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            self.accelerator.load_state(str(Path(folder) / "state"))
            if self.stage == "rvq":  # the codebooks are buffers no optimizer state holds
                self.module.load_state_dict(load_checkpoint(Path(folder) / "model", kind="rvq")[0].state_dict())
            progress = json.loads((Path(folder) / "step.json").read_text())
            self.step, self.train_seconds = progress["step"], float(progress.get("train_seconds", 0.0))
            if self.ema is not None and (Path(folder) / "ema").is_dir():
                self.ema = dict(load_checkpoint(Path(folder) / "ema")[0].state_dict())

    # ---- data -------------------------------------------------------------------------------

    def batches(self) -> Iterator[tuple[Any, Any]]:
        """``(inputs, text tokens or None)`` batches, epoch after epoch (``train.overfit_batch``: one, repeated)."""
        import ray.train

        shard, epoch, fixed = ray.train.get_dataset_shard("train"), 0, None
        while True:
            epoch += 1
            batches = 0
            for batches, batch in enumerate(epoch_batches(shard, self.cfg, self.rank, epoch), start=1):  # noqa: B007
                if self.cfg.train.overfit_batch:  # the same batch *and* the same noise, timesteps and masks every step
                    fixed = fixed or batch
                    batch = fixed
                    self.generator.manual_seed(self.cfg.train.seed * 1000 + self.rank)
                inputs, text = self._tensors(batch)
                device = self.accelerator.device
                yield inputs.to(device), (text.to(device) if text is not None else None)
            if batches == 0:  # else the loop would read the data forever and never train a step
                raise EmptyShardError(
                    f"worker {self.rank} got no full batch of train.batch_size={self.cfg.train.batch_size} rows in epoch {epoch}: "
                    f"its share of the data is smaller than one batch; lower train.batch_size or train.workers, or add data"
                )

    def _tensors(self, batch: dict[str, Any]) -> tuple[Any, Any]:
        import numpy as np
        import torch

        if self.stage == "autoencoder":
            return torch.from_numpy(np.ascontiguousarray(batch["audio"], dtype=np.float32)), None
        if self.stage == "embedder":  # mono audio and its caption's sentence embedding
            audio = torch.from_numpy(np.ascontiguousarray(batch["audio"], dtype=np.float32)).mean(1)
            return audio, self.sentences.embed([str(c) for c in batch["caption"]])
        D, T = int(batch["latent_channels"][0]), int(batch["latent_frames"][0])
        lat = torch.from_numpy(np.stack([np.asarray(m, dtype=np.float32) for m in batch["latent_mean"]])).reshape(-1, D, T)
        text = torch.stack([self.texts[str(c)] for c in batch["caption"]]) if self.cfg.dit.cond_token_dim and self.texts else None
        return lat, text

    # ---- one step ---------------------------------------------------------------------------

    def train_step(self, inputs: Any, text: Any) -> None:
        """Forward, backward, clip and step (Accelerate accumulates ``train.grad_accum`` micro-batches)."""
        if self.stage == "rvq":
            stats = self.module.update(inputs, self.generator, reduce=_all_reduce_sum, broadcast=_from_rank0)
            self.last_batch = inputs  # the checkpoint's per-depth error is measured on it
            self.step, self.loss = self.step + 1, stats["mse"]
            self.parts = {"restarted_codes": stats["restarted"], "codes_used": stats["used"]}
            return
        adversarial = self.discriminator is not None and self.step >= self.cfg.train.autoencoder.discriminator_start
        stage_loss = self.accelerator.unwrap_model(self.model)
        if self.discriminator is not None:
            stage_loss.adversarial = adversarial
        with self.accelerator.accumulate(self.model):
            loss = self.model(inputs, text)
            self.accelerator.backward(loss)
            sync = self.accelerator.sync_gradients
            if not self.deepspeed and sync:  # DeepSpeed clips itself (gradient_clipping)
                self.grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip))
            self._set_lr()
            self.optimizer.step()
            self.optimizer.zero_grad()
            if self.deepspeed and sync:
                self.grad_norm = float(self.model.get_global_grad_norm() or float("nan"))  # before clipping
        self.parts = dict(getattr(stage_loss, "parts", {}))
        if adversarial:
            self.parts["discriminator"] = self._discriminator_step(inputs, stage_loss.reconstruction)
        self.step, self.loss = self.step + 1, float(loss.detach())
        self._update_ema()

    def _set_lr(self) -> None:
        """``train.lr · lr_factor`` for the step being taken, set from the step count (no scheduler object: Accelerate's
        would advance once per process per step, and the rate needs no state of its own to resume)."""
        for group in _innermost(self.optimizer).param_groups:
            group["lr"] = self.cfg.train.lr * lr_factor(self.cfg, self.step)

    def _discriminator_step(self, audio: Any, reconstruction: Any) -> float:
        """One step of the discriminator on real audio and the generator's (detached) reconstruction."""
        from lmdm.training.autoencoder_loss import discriminator_loss

        with self.accelerator.accumulate(self.discriminator):
            loss = discriminator_loss(self.discriminator, audio, reconstruction)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.discriminator.parameters(), self.cfg.train.grad_clip)
            self.disc_optimizer.step()
            self.disc_optimizer.zero_grad()
        return float(loss.detach())

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        import torch

        with torch.no_grad():
            for k, v in self.accelerator.unwrap_model(self.model).dit.state_dict().items():
                if self.ema[k].is_floating_point():
                    self.ema[k].lerp_(v.detach().to(self.ema[k].dtype), 1 - self.cfg.train.ema_decay)
                else:
                    self.ema[k].copy_(v)

    # ---- tracking, checkpoint + report ------------------------------------------------------

    def track(self, seconds: float) -> None:
        """Queue this step's metrics for MLflow (committed with the next checkpoint)."""
        from mlflow.entities import Metric

        if self.step <= self.logged_through:
            return

        rows = self.cfg.train.batch_size * self.accelerator.num_processes
        per_step = {
            "train/loss": self.loss,
            "train/lr": float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else float("nan"),
            "train/grad_norm": self.grad_norm,
            "train/samples_per_s": rows / seconds if seconds > 0 else float("nan"),
            **{f"train/{part}": value for part, value in self.parts.items()},
        }
        stamp = int(time.time() * 1000)
        self.pending_metrics += [Metric(key, value, stamp, self.step) for key, value in per_step.items()]

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        """Save this rank's training state (rank 0: also the model and its EMA) and report it to Ray Train."""
        import ray.train

        if self.run is not None:
            from mlflow.tracking import MlflowClient

            # Steps after the last checkpoint are recomputed after a failure: committing metrics with checkpoints
            # (and skipping steps already logged, see _start_tracking) keeps one MLflow history without duplicates.
            MlflowClient().log_batch(self.run.info.run_id, metrics=self.pending_metrics)
        self.pending_metrics = []
        with tempfile.TemporaryDirectory() as folder:
            self.accelerator.save_state(str(Path(folder) / "state"))
            if self.rank == 0:
                self._save_models(Path(folder))
            self.reports += 1
            ray.train.report({**metrics, "reports": self.reports}, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def _save_models(self, folder: Path) -> None:
        from lmdm.checkpoints.format import TrainedWith, save_checkpoint

        trained, meta = TrainedWith(**self.trained), {"step": self.step, "train_seconds": round(self.train_seconds, 1)}
        if self.stage == "rvq":  # reconstruction error per depth on the last batch (`lmdm bench compare` prints it)
            import torch

            with torch.no_grad():
                meta["depth_mse"] = [round(float(e), 6) for e in self.module.depth_errors(self.last_batch)]
                meta["latent_power"] = round(float(self.last_batch.pow(2).mean()), 6)
        if self.stage == "embedder":  # how to rebuild the sentences it reads (checked against trained.text_encoder)
            meta["text_encoder"] = {"kind": self.cfg.text.encoder, "max_tokens": self.cfg.text.max_tokens}
            meta["window_s"] = self.cfg.embedder.chunk_seconds
        (folder / "step.json").write_text(json.dumps({"step": self.step, "train_seconds": self.train_seconds}))
        module = self.accelerator.unwrap_model(self.model).dit
        save_checkpoint(folder / "model", module, meta, trained)
        if self.ema is not None:
            save_checkpoint(folder / "ema", module, {**meta, "ema_decay": self.cfg.train.ema_decay}, trained, state=self.ema)

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> None:
        t = self.cfg.train
        last = time.perf_counter()
        batches = self.batches()
        while self.step < t.steps:
            for callback in self.callbacks:
                callback.before_step(self)
            self.train_step(*next(batches))
            now = time.perf_counter()
            self.train_seconds += now - last
            self.track(now - last)
            last = now
            metrics = {"step": self.step, "train/loss": self.loss, "engine": type(self.model).__name__}
            for callback in self.callbacks:
                callback.after_step(self, metrics)
            if self.step % t.checkpoint_every == 0 or self.step >= t.steps:
                self.checkpoint(metrics)
        if self.run is not None:
            import mlflow

            mlflow.end_run()


class FaultDrill(Callback):
    """``train.fail_once_at_step``: one worker (rank 1, else 0) raises once at that step (a marker file
    under ``train.storage_path`` makes it once per run); Ray Train restarts the group from the last checkpoint."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def after_step(self, recipe: StageRecipe, metrics: dict[str, Any]) -> None:
        cfg = recipe.cfg
        marker = Path(cfg.train.storage_path).resolve() / f"{cfg.name}-{recipe.stage}.failed-once"
        if recipe.step == self.at_step and recipe.rank == min(1, recipe.accelerator.num_processes - 1) and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("the fault-tolerance drill raised here once")
            raise RuntimeError(f"fault-tolerance drill: rank {recipe.rank} fails at step {recipe.step}")


class MeasureState(Callback):
    """``lmdm bench train``: samples/s after the first step, and every worker's training-state bytes
    (:func:`training_state_bytes`, measured inside the last optimizer step), in the last report."""

    def __init__(self) -> None:
        self.state_bytes: dict[str, int] = {}
        self.clock = (0.0, 0)

    def before_step(self, recipe: StageRecipe) -> None:
        if recipe.step + 1 == recipe.cfg.train.steps and not self.state_bytes:
            # Inside the torch optimizer's step (DDP: full gradients; ZeRO: this rank's partition), where
            # gradients, parameters and Adam state all exist at once.
            _measure_at_next_step(recipe.model, recipe.optimizer, self.state_bytes)

    def after_step(self, recipe: StageRecipe, metrics: dict[str, Any]) -> None:
        import torch

        t, step = recipe.cfg.train, recipe.step
        if step == 1 or self.clock[1] == 0:  # the first step (allocations, DeepSpeed's lazy buffers) is not timed
            self.clock = (time.perf_counter(), step)
        if step == t.steps:
            seconds = time.perf_counter() - self.clock[0]
            samples = (step - self.clock[1]) * t.batch_size * t.grad_accum * recipe.accelerator.num_processes
            metrics["samples_per_s"] = samples / seconds if seconds > 0 else float("nan")
            per_rank: list[Any] = [None] * recipe.accelerator.num_processes
            torch.distributed.all_gather_object(per_rank, self.state_bytes)
            metrics["state_bytes_per_worker"] = per_rank


class ReportProgress(Callback):
    """Rank 0 sends ``{step, steps, loss, samples_per_s}`` to the driver's progress actor after each
    step: a fire-and-forget actor call, so training never waits for the driver."""

    def __init__(self, board: Any) -> None:
        self.board, self.last = board, time.perf_counter()

    def after_step(self, recipe: StageRecipe, metrics: dict[str, Any]) -> None:
        now = time.perf_counter()
        rows = recipe.cfg.train.batch_size * recipe.accelerator.num_processes
        if recipe.rank == 0:
            self.board.put.remote(
                {
                    "step": recipe.step,
                    "steps": recipe.cfg.train.steps,
                    "loss": recipe.loss,
                    "samples_per_s": rows / max(now - self.last, 1e-9),
                }
            )
        self.last = now


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: build the recipe with its callbacks, resume, train."""
    cfg = Config.model_validate(config["cfg"])
    callbacks: list[Callback] = []
    if cfg.train.fail_once_at_step is not None:
        callbacks.append(FaultDrill(cfg.train.fail_once_at_step))
    if config.get("measure"):
        callbacks.append(MeasureState())
    if config.get("progress") is not None:
        callbacks.append(ReportProgress(config["progress"]))
    if config["stage"] == "arc":
        from lmdm.pipelines.arc import ArcRecipe

        recipe: StageRecipe = ArcRecipe(config, callbacks)
    else:
        recipe = StageRecipe(config, callbacks)
    recipe.setup()
    recipe.resume()
    recipe.train()


# ---- helpers ------------------------------------------------------------------------------------


def _all_reduce_sum(x: Any) -> Any:
    """``x`` summed over the workers (in place; ``x`` itself on one worker)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def _from_rank0(x: Any) -> Any:
    """Worker 0's ``x`` on every worker."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.contiguous()
        dist.broadcast(x, src=0)
    return x


def _no_deepspeed_ops() -> None:
    """Training on CPU uses no compiled DeepSpeed op (torch's AdamW, gloo collectives): say so before DeepSpeed
    starts. Otherwise every worker probes each of DeepSpeed's ops with compiler subprocesses and JIT-builds its
    shared-memory all-reduce (used by DeepSpeed inference only), about 35 s of a 3-step ZeRO-2 run on 2 cores.
    ``deepspeed.ops.__compatible_ops__`` is the table DeepSpeed reads (it keeps the first value it holds)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}  # type: ignore[attr-defined]


def _deepspeed_config(cfg: Config) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no fused_adam JIT build on CPU
        "gradient_clipping": cfg.train.grad_clip,
    }


class _SentenceTable:
    """Captions → sentence embeddings (the text encoder's tokens mean-pooled), each caption encoded once."""

    def __init__(self, encoder: Any) -> None:
        self.encoder, self.dim, self.cache = encoder, int(encoder.dim), {}

    def embed(self, captions: list[str]) -> Any:
        import torch

        from lmdm.models.embedder import sentence_embedding

        new = sorted({c for c in captions if c not in self.cache})
        if new:
            encoded = self.encoder.encode(new)
            for caption, row in zip(new, sentence_embedding(encoded.tokens, encoded.mask), strict=True):
                self.cache[caption] = row
        return torch.stack([self.cache[c] for c in captions])


def _text_table(latents: Path) -> dict[str, Any]:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    table = pq.read_table(latents / "text_embeddings.parquet").to_pylist()
    return {row["caption"]: torch.from_numpy(np.asarray(row["tokens"], dtype=np.float32).reshape(-1, row["dim"])) for row in table}


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
    def build(cfg: Config, stage: str, dit: Any, generator: Any, discriminator: Any = None) -> Any:
        from torch import Tensor, nn

        from lmdm.builders import build_geometry
        from lmdm.diffusion.objectives import get_objective
        from lmdm.training.losses import base_inpainting_loss, lmdm_block_causal_loss, lmdm_encdec_loss

        objective, geometry = get_objective(cfg.dit.objective), build_geometry(cfg)
        Bf, Ctx, t = geometry.block_frames, geometry.context_blocks, cfg.train

        class AutoencoderStageLoss(nn.Module):
            """The generator's loss; keeps its parts (``parts``) and detached ``reconstruction`` for the
            discriminator's step. The discriminator and mel filters are held outside the module tree, so
            DDP neither syncs the discriminator here (it has its own wrapper) nor broadcasts the filters."""

            def __init__(self) -> None:
                super().__init__()
                from lmdm.training.autoencoder_loss import AutoencoderWeights, MelLoss

                self.dit = dit  # the autoencoder (one attribute name for every stage's model)
                a = t.autoencoder
                self.weights = AutoencoderWeights(
                    a.stft_weight, a.mel_weight, a.waveform_weight, t.kl_weight, a.adversarial_weight, a.feature_matching_weight
                )
                self.without_adversarial = AutoencoderWeights(a.stft_weight, a.mel_weight, a.waveform_weight, t.kl_weight)
                self.outside = {"mel": MelLoss(cfg.audio.sample_rate) if a.mel_weight else None, "discriminator": discriminator}
                self.adversarial = discriminator is not None
                self.parts: dict[str, float] = {}
                self.reconstruction: Tensor | None = None

            def forward(self, audio: Tensor, text: Tensor | None) -> Tensor:
                from lmdm.training.autoencoder_loss import autoencoder_loss

                if self.outside["mel"] is not None:  # built before Accelerate moved the model to its device
                    self.outside["mel"] = self.outside["mel"].to(audio.device)
                loss, recon = autoencoder_loss(
                    self.dit,
                    audio,
                    self.weights if self.adversarial else self.without_adversarial,
                    generator,
                    mel=self.outside["mel"],
                    discriminator=self.outside["discriminator"] if self.adversarial else None,
                    stft_ffts=t.autoencoder.stft_ffts,
                )
                self.reconstruction = recon.detach()
                names = ("stft", "mel", "waveform", "kl", "adversarial", "feature_matching")
                self.parts = {name: float(getattr(loss, name).detach()) for name in names}
                return loss.loss

        if stage == "autoencoder":
            return AutoencoderStageLoss()

        class EmbedderStageLoss(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.dit = dit  # the embedder

            def forward(self, audio: Tensor, sentences: Tensor) -> Tensor:
                return self.dit(audio, sentences)

        if stage == "embedder":
            return EmbedderStageLoss()

        class RVQStageLoss(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.dit = dit  # the RVQ

        if stage == "rvq":
            return RVQStageLoss()

        class LMMStageLoss(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.dit = dit  # the LMM

            def forward(self, lat: Tensor, text: Tensor | None) -> Tensor:
                from lmdm.training.lmm_loss import lmm_loss

                frames = min(cfg.lmm.train_frames or self.dit.args.window_frames, lat.shape[-1])
                return lmm_loss(self.dit, lat, text, generator, frames, cfg_dropout=t.cfg_dropout)

        if stage == "lmm":
            return LMMStageLoss()

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


def lr_factor(cfg: Config, step: int) -> float:
    """The learning rate at ``step`` (0-based: the step about to be taken) as a factor of ``train.lr``: linear
    warm-up over ``train.lr_warmup_steps``, then constant or a cosine decay to ``train.lr_final_ratio`` at ``train.steps``."""
    import math

    t = cfg.train
    if step < t.lr_warmup_steps:
        return (step + 1) / t.lr_warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.lr_warmup_steps) / max(1, t.steps - t.lr_warmup_steps))
    return t.lr_final_ratio + (1.0 - t.lr_final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def torch_randint(high: int, generator: Any) -> int:
    import torch

    return int(torch.randint(0, high, (1,), generator=generator, device=generator.device))
