"""Builders: the only place that turns config objects into flat constructor arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lmdm.config import Config
from lmdm.models.autoencoder import OobleckVAE, build_autoencoder
from lmdm.models.dit import DiT, DiTArgs
from lmdm.models.embedder import EmbedderArgs, TextAudioEmbedding
from lmdm.runtime import Runtime, get_runtime
from lmdm.streaming.engines import LMDMEngine, OutpaintingEngine, Sampling
from lmdm.streaming.sequences import BlockGeometry

__all__ = [
    "build_autoencoder_from",
    "build_dit",
    "build_embedder",
    "build_engine",
    "build_geometry",
    "build_runtime",
    "build_sampling",
    "dit_args",
    "load_stream_models",
]

EngineKind = Literal["outpainting", "encdec", "block_causal"]


def dit_args(cfg: Config) -> DiTArgs:
    """The streaming DiT's sizes: latent channels from the autoencoder, inputs ``[noisy | clean | mask]``."""
    io = cfg.autoencoder.latent_channels
    return DiTArgs(
        io_channels=io,
        width=cfg.dit.width,
        depth=cfg.dit.depth,
        head_dim=cfg.dit.head_dim,
        cond_token_dim=cfg.dit.cond_token_dim,
        project_cond_tokens=cfg.dit.project_cond_tokens,
        global_cond_dim=cfg.dit.global_cond_dim,
        input_concat_dim=io + 1,
    )


def build_dit(cfg: Config) -> DiT:
    """The streaming DiT of :func:`dit_args`."""
    return DiT(dit_args(cfg))


def build_autoencoder_from(cfg: Config) -> OobleckVAE:
    return build_autoencoder(cfg.autoencoder, cfg.audio)


def build_embedder(cfg: Config, text_dim: int) -> TextAudioEmbedding:
    """The text–audio embedder over sentence embeddings ``text_dim`` wide (the text encoder's width)."""
    e = cfg.embedder
    return TextAudioEmbedding(
        EmbedderArgs(sample_rate=cfg.audio.sample_rate, n_mels=e.n_mels, hop=cfg.audio.sample_rate // cfg.data.frame_rate,
                     text_dim=text_dim, width=e.width, layers=e.layers, dim=e.dim)
    )  # fmt: skip


def build_geometry(cfg: Config) -> BlockGeometry:
    return BlockGeometry(block_frames=cfg.stream.block_frames, context_blocks=cfg.stream.context_blocks)


def build_sampling(cfg: Config) -> Sampling:
    s = cfg.stream
    return Sampling(steps=s.steps, sampler=s.sampler, cfg_scale=s.cfg_scale, objective=cfg.dit.objective, schedule=s.schedule)


def build_runtime(cfg: Config, dit: DiT, name: str | None = None) -> Runtime:
    """The runtime ``name`` (default: ``stream.runtime``) for ``dit``'s device (``auto``: packed on CPU, compile on CUDA)."""
    return get_runtime(name or cfg.stream.runtime, next(dit.parameters()).device)


def build_engine(
    cfg: Config, dit: DiT, variant: EngineKind | None = None, runtime: Runtime | None = None
) -> OutpaintingEngine | LMDMEngine:
    """The engine for ``variant`` (default: ``stream.variant``) on ``runtime`` (default: ``stream.runtime``)."""
    kind = variant or cfg.stream.variant
    runtime = runtime or build_runtime(cfg, dit)
    if kind == "outpainting":
        return OutpaintingEngine(dit, build_geometry(cfg), build_sampling(cfg), runtime)
    return LMDMEngine(dit, kind, build_geometry(cfg), build_sampling(cfg), rotary=cfg.stream.rotary, runtime=runtime)


def load_stream_models(
    cfg: Config, dit_path: Path | None, autoencoder_path: Path | None, encoder: Any, variant: EngineKind | None = None
) -> tuple[DiT, OobleckVAE]:
    """The DiT and autoencoder (random init where no folder is given), checked against each other and
    against the stream about to run (:func:`lmdm.checkpoints.compat.check_streaming`) with ``variant``
    (default ``stream.variant``) and the text ``encoder`` (a :class:`~lmdm.text.encoders.TextEncoder` or ``None``).

    Raises:
        CheckpointError: a folder that cannot be loaded, of the wrong kind, or trained for another
            variant, geometry, objective, autoencoder or text encoder.
        ValueError: latent channels that differ between the DiT and the autoencoder.
    """
    from lmdm.checkpoints.compat import check_streaming
    from lmdm.checkpoints.format import file_sha256, load_checkpoint, read_checkpoint_info

    dit: Any = load_checkpoint(dit_path, kind="dit")[0] if dit_path else build_dit(cfg)
    vae: Any = load_checkpoint(autoencoder_path, kind="autoencoder")[0] if autoencoder_path else build_autoencoder_from(cfg)
    if dit.args.io_channels != vae.latent_dim:
        raise ValueError(
            f"the DiT ({dit_path or 'random init'}) makes {dit.args.io_channels}-channel latents but the autoencoder "
            f"({autoencoder_path or 'random init'}) decodes {vae.latent_dim}: pass a matching --dit and --autoencoder"
        )
    if dit_path:
        s = cfg.stream
        check_streaming(
            read_checkpoint_info(dit_path),
            variant=variant or s.variant,
            block_frames=s.block_frames,
            context_blocks=s.context_blocks,
            objective=cfg.dit.objective,
            autoencoder=file_sha256(Path(autoencoder_path) / "model.safetensors") if autoencoder_path else None,
            text_encoder=encoder.fingerprint() if encoder is not None else None,
        )
    return dit, vae
