"""``lmdm arc``: ARC-Forcing on Ray Train (DESIGN §5): the recipe every worker runs, and the driver's checks.

Same recipe as every stage (:class:`~lmdm.pipelines.recipe.StageRecipe`: Accelerate with DDP or DeepSpeed,
checkpoints, resume, MLflow), with two models and two optimizers stepped alternately:

1. **generator step**: from each example's real context (``Ctx`` blocks), the LMDM rolls out ``arc.blocks``
   blocks through its streaming engine (``arc.steps`` steps, CFG 1; per block an exit step drawn from
   ``(train.seed, step)``, the same on every worker); the discriminator (frozen) scores real and generated
   continuations, noised alike; loss ``softplus(D(real) − D(fake))``;
2. **discriminator step** on the same (detached) rollout: relativistic + contrastive (+ R1/R2).

An example is ``(Ctx + K)·Bf`` latent frames cropped from a precomputed chunk at a random offset: the real
context, then the real continuation the discriminator compares against. The generator is ``model/`` (kind
``dit``, trained as stage ``arc``; its EMA ``ema/``) and streams like any LMDM; the discriminator lives in
the training state only (Accelerate's, for resume). At each checkpoint rank 0 logs a sample rollout from a
fixed real context (and that context's real continuation once) to MLflow as audio.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from lmdm.config import Config
from lmdm.pipelines.recipe import StageRecipe, _innermost, _text_table, lr_factor, torch_randint

__all__ = ["ArcRecipe", "arc_window_frames", "check_arc_data", "default_arc_inputs", "disc_layer"]


def arc_window_frames(cfg: Config) -> int:
    """Latent frames one ARC example needs: the real context and ``arc.blocks`` real blocks."""
    return (cfg.stream.context_blocks + cfg.arc.blocks) * cfg.stream.block_frames


def disc_layer(cfg: Config) -> int:
    """The discriminator's depth: ``arc.disc_layer``, or half the base's depth."""
    return cfg.arc.disc_layer if cfg.arc.disc_layer is not None else max(1, cfg.dit.depth // 2)


def default_arc_inputs(cfg: Config) -> Config:
    """``cfg`` with ``train.init`` (the quickstart's LMDM, ``runs/<name>/lmdm``) and ``arc.autoencoder`` (the one
    that LMDM was trained on) filled in where unset and found."""
    from lmdm.pipelines.generate import default_checkpoints

    cfg = cfg.model_copy(deep=True)
    dit, autoencoder = default_checkpoints(cfg)
    if cfg.train.init is None:
        cfg.train.init = dit
    if cfg.arc.autoencoder is None:
        cfg.arc.autoencoder = autoencoder
    return cfg


def check_arc_data(cfg: Config, latents: Path, manifest: dict[str, Any]) -> None:
    """Refuse, before any worker starts, a run whose latents or settings cannot supply ARC's examples.

    Raises:
        ValueError: chunks shorter than one example (saying which precompute makes them), a variant that is not
            an LMDM, a discriminator deeper than the base, or a batch of one with the contrastive term on.
    """
    a, s = cfg.arc, cfg.stream
    if s.variant not in ("block_causal", "encdec"):
        raise ValueError(f"ARC-Forcing post-trains an LMDM: stream.variant must be block_causal or encdec, got {s.variant!r}")
    if disc_layer(cfg) > cfg.dit.depth:
        raise ValueError(f"arc.disc_layer={a.disc_layer} is deeper than the base DiT (dit.depth={cfg.dit.depth})")
    if a.contrastive_weight > 0 and cfg.dit.cond_token_dim and cfg.train.batch_size < 2:
        raise ValueError(
            "the contrastive term rolls the prompts by one within a batch: set train.batch_size >= 2 (or arc.contrastive_weight=0)"
        )
    need = arc_window_frames(cfg)
    have = int(manifest.get("latent", {}).get("frames") or manifest.get("chunk_frames") or 0)
    if have < need:
        rate = float(manifest.get("latent", {}).get("rate") or 0.0)
        seconds = f" ({need / rate:.1f} s of audio: clips at least that long)" if rate else ""
        raise ValueError(
            f"ARC-Forcing reads {s.context_blocks} context + arc.blocks={a.blocks} blocks of {s.block_frames} frames = {need} latent "
            f"frames per example, but {latents} holds chunks of {have}: precompute latents with precompute.chunk_frames={need} "
            f"or more{seconds} into another folder (precompute.out) and pass that with --latents, or lower arc.blocks"
        )


class ArcRecipe(StageRecipe):
    """One worker's ARC-Forcing: the generator (``self.model``) and discriminator (``self.discriminator``),
    each with its optimizer and learning rate, stepped alternately."""

    def setup(self) -> None:
        import torch

        from lmdm.builders import build_geometry
        from lmdm.diffusion.objectives import get_objective
        from lmdm.models.discriminator import Discriminator

        cfg, a = self.cfg, self.cfg.arc
        torch.set_num_threads(cfg.train.torch_threads)
        torch.manual_seed(cfg.train.seed)
        self.accelerator = self._accelerator()
        self.module = self._build_model()  # the LMDM (train.init)
        self.ema = {k: v.detach().clone() for k, v in self.module.state_dict().items()} if self.rank == 0 else None
        self.generator = torch.Generator(device=self.accelerator.device).manual_seed(cfg.train.seed * 1000 + self.rank)
        self.texts = _text_table(self.latents) if cfg.dit.cond_token_dim else {}
        self.objective, self.geometry = get_objective(cfg.dit.objective), build_geometry(cfg)
        torch.manual_seed(cfg.train.seed + 1)  # the head's initialisation, the same on every worker
        disc = Discriminator(self.module, disc_layer(cfg), a.head_width, a.head_kernel)
        g_module, d_module = _arc_generator(cfg, self.module, disc, self.generator), _arc_discriminator(cfg, disc, self.generator)
        g_opt = torch.optim.AdamW([p for p in g_module.parameters() if p.requires_grad], lr=a.g_lr, betas=(0.0, 0.99))
        d_opt = torch.optim.AdamW([p for p in d_module.parameters() if p.requires_grad], lr=a.d_lr, betas=(0.0, 0.99))
        self.model, self.optimizer = self.accelerator.prepare(g_module, g_opt)
        self.discriminator, self.disc_optimizer = self.accelerator.prepare(d_module, d_opt)
        self.sample: tuple[Any, Any, Any] | None = None  # (context, real continuation, text) of the first example
        self.samples_logged = 0
        self._start_tracking()

    def _build_model(self) -> Any:
        from lmdm.builders import build_dit
        from lmdm.checkpoints.compat import load_init

        module = build_dit(self.cfg)
        assert self.cfg.train.init is not None  # checked on the driver
        load_init(module, self.cfg.train.init)
        if module.args.global_cond_dim:
            module.to_global_embed.requires_grad_(False)
        return module

    def _tensors(self, batch: dict[str, Any]) -> tuple[Any, Any]:
        """A random ``(Ctx + K)·Bf``-frame window of each chunk (one offset per batch) and its prompt tokens."""
        lat, text = super()._tensors(batch)
        need, T = arc_window_frames(self.cfg), lat.shape[-1]
        start = torch_randint(T - need + 1, self.generator)
        return lat[..., start : start + need], text

    def train_step(self, inputs: Any, text: Any) -> None:
        from lmdm.training.arc import draw_exit_steps

        a, Kc = self.cfg.arc, self.geometry.context_frames
        context, real = inputs[..., :Kc], inputs[..., Kc:]
        if self.sample is None:
            self.sample = (context[:1].clone(), real[:1].clone(), text[:1].clone() if text is not None else None)
        exits = draw_exit_steps(self.cfg.train.seed, self.step, a.blocks, a.steps, a.full_chain_p)
        generator = self.accelerator.unwrap_model(self.model)
        self._set_lr()
        with self.accelerator.accumulate(self.model):
            g_loss = self.model(context, real, text, exits)
            self.grad_norm = self._backward_and_step(self.model, self.optimizer, g_loss, self.grad_norm)
        discriminator = self.accelerator.unwrap_model(self.discriminator)
        with self.accelerator.accumulate(self.discriminator):
            d_loss = self.discriminator(context, real, generator.fake, text)
            self._backward_and_step(self.discriminator, self.disc_optimizer, d_loss, float("nan"))
        out = discriminator.last
        self.step, self.loss = self.step + 1, float(g_loss.detach())
        self.parts = {
            "g_loss": self.loss,
            "d_loss": float(d_loss.detach()),
            "d_relativistic": out.relativistic,
            "d_contrastive": out.contrastive,
            "d_penalty": out.penalty,
            "d_acc_real": out.acc_real,
            "d_acc_fake": out.acc_fake,
            "d_acc_contrastive": out.acc_contrastive,
            "exit_step_mean": sum(exits) / len(exits),
        }
        self._update_ema()

    def _backward_and_step(self, model: Any, optimizer: Any, loss: Any, grad_norm: float) -> float:
        """Backward, clip and step one of the two models; returns its gradient norm (before clipping) where synced.

        Under DeepSpeed each model is its own engine: ``accelerator.backward`` drives only the engine prepared last,
        so each engine runs its own backward and step (clipping with ``gradient_clipping``)."""
        sync = self.accelerator.sync_gradients
        if self.deepspeed:
            from accelerate.utils import DeepSpeedEngineWrapper

            DeepSpeedEngineWrapper(model).backward(loss, sync_gradients=sync)
            return float(model.get_global_grad_norm() or float("nan")) if sync else grad_norm
        self.accelerator.backward(loss)
        if sync:
            grad_norm = float(self.accelerator.clip_grad_norm_(model.parameters(), self.cfg.train.grad_clip))
        optimizer.step()
        optimizer.zero_grad()
        return grad_norm

    def _set_lr(self) -> None:
        a, factor = self.cfg.arc, lr_factor(self.cfg, self.step)
        for optimizer, lr in ((self.optimizer, a.g_lr), (self.disc_optimizer, a.d_lr)):
            for group in _innermost(optimizer).param_groups:
                group["lr"] = lr * factor

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        if self.rank == 0 and self.run is not None and self.sample is not None:
            self._log_samples()
        super().checkpoint(metrics)

    def _log_samples(self) -> None:
        """A rollout of ``arc.sample_blocks`` blocks (the streaming engine, inference mode) from the first example's
        real context, decoded to ``samples/step_<n>.wav`` in the stage's MLflow run (the real continuation once)."""
        import mlflow
        import torch

        from lmdm.audio.io import write_audio
        from lmdm.checkpoints.format import load_checkpoint
        from lmdm.training.arc import self_rollout

        if self.cfg.arc.autoencoder is None:
            return
        if not hasattr(self, "autoencoder"):
            self.autoencoder = load_checkpoint(self.cfg.arc.autoencoder, "autoencoder")[0].eval()
        assert self.sample is not None
        context, real, text = self.sample
        generator = self.accelerator.unwrap_model(self.model)
        with torch.inference_mode():
            fake = self_rollout(generator.engine(), context, text, self.cfg.arc.sample_blocks, None, torch.Generator().manual_seed(0))
            pieces = {f"step_{self.step:06d}": torch.cat([context, fake], -1)}
            if self.samples_logged == 0:
                pieces["real"] = torch.cat([context, real], -1)
            with tempfile.TemporaryDirectory() as folder:
                for name, latents in pieces.items():
                    audio = self.autoencoder.decode(latents.to(next(self.autoencoder.parameters()).dtype).cpu())[0].float().numpy()
                    write_audio(Path(folder) / f"{name}.wav", audio / max(1e-6, float(abs(audio).max())) * 0.9, self.cfg.audio.sample_rate)
                mlflow.log_artifacts(folder, "samples")
        self.samples_logged += 1


def _arc_generator(cfg: Config, dit: Any, disc: Any, generator: Any) -> Any:
    """The generator's loss module, built inside the worker (torch imported there, as every stage's loss)."""
    from torch import Tensor, nn

    from lmdm.builders import build_geometry
    from lmdm.diffusion.objectives import get_objective
    from lmdm.streaming.engines import LMDMEngine, Sampling
    from lmdm.training.arc import draw_noise, generator_loss, self_rollout

    a, s = cfg.arc, cfg.stream
    sampling = Sampling(steps=a.steps, sampler=s.sampler, cfg_scale=1.0, objective=cfg.dit.objective, schedule=s.schedule)
    geometry, objective = build_geometry(cfg), get_objective(cfg.dit.objective)

    class ArcGenerator(nn.Module):
        """The generator's loss as a module ``forward`` (so DDP / DeepSpeed see one forward per step): the
        self-rollout and the frozen discriminator's relativistic verdict. Keeps the rollout (``fake``,
        detached) for the discriminator's step; the discriminator is held outside the module tree."""

        def __init__(self) -> None:
            super().__init__()
            self.dit = dit
            self.outside = {"disc": disc, "engine": None}
            self.fake: Tensor | None = None

        def engine(self) -> Any:
            """The streaming engine over ``dit``, made where the parameters now live (after Accelerate moved them)."""
            engine = self.outside["engine"]
            device = next(self.dit.parameters()).device
            if engine is None or engine.core.device != device:
                engine = self.outside["engine"] = LMDMEngine(self.dit, s.variant, geometry, sampling, rotary=s.rotary)  # type: ignore[arg-type]
            return engine

        def forward(self, context: Tensor, real: Tensor, text: Tensor | None, exits: list[int]) -> Tensor:
            fake = self_rollout(self.engine(), context, text, a.blocks, exits, generator)
            self.fake = fake.detach()
            noise = draw_noise(real, a.t_min, a.t_max, generator)
            return generator_loss(self.outside["disc"], objective, context, real, fake, text, noise)

    return ArcGenerator()


def _arc_discriminator(cfg: Config, disc: Any, generator: Any) -> Any:
    """The discriminator's loss module, built inside the worker."""
    from torch import Tensor, nn

    from lmdm.diffusion.objectives import get_objective
    from lmdm.training.arc import discriminator_loss, draw_noise

    a, objective = cfg.arc, get_objective(cfg.dit.objective)

    class ArcDiscriminator(nn.Module):
        """The discriminator's loss as a module ``forward``; its parts are kept in ``last``."""

        def __init__(self) -> None:
            super().__init__()
            self.disc = disc
            self.last: Any = None

        def forward(self, context: Tensor, real: Tensor, fake: Tensor, text: Tensor | None) -> Tensor:
            noise = draw_noise(real, a.t_min, a.t_max, generator)
            self.last = discriminator_loss(
                self.disc, objective, context, real, fake, text, noise, contrastive_weight=a.contrastive_weight,
                r1_weight=a.r1_weight, r2_weight=a.r2_weight, penalty_sigma=a.penalty_sigma, generator=generator,
            )  # fmt: skip
            loss: Tensor = self.last.loss
            return loss

    return ArcDiscriminator()
