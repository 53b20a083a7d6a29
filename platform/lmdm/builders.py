"""Builders: the only place that turns config objects into flat constructor arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lmdm.config import Config
from lmdm.models.autoencoder import OobleckVAE, build_autoencoder
from lmdm.models.dit import DiT, DiTArgs
from lmdm.models.embedder import EmbedderArgs, TextAudioEmbedding
from lmdm.models.lmm import LMM, LMMArgs
from lmdm.models.rvq import ResidualVQ
from lmdm.runtime import Runtime, get_runtime
from lmdm.streaming.engines import LMDMEngine, OutpaintingEngine, Sampling
from lmdm.streaming.lmm_engine import LMMEngine, LMMSampling
from lmdm.streaming.sequences import BlockGeometry

__all__ = [
    "build_autoencoder_from",
    "build_dit",
    "build_embedder",
    "build_engine",
    "build_geometry",
    "build_lmm",
    "build_lmm_sampling",
    "build_runtime",
    "build_rvq",
    "build_sampling",
    "dit_args",
    "lmm_args",
    "load_stream_models",
]

EngineKind = Literal["outpainting", "encdec", "block_causal", "flat", "framewise"]
LMM_KINDS = ("flat", "framewise")


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


def build_rvq(cfg: Config) -> ResidualVQ:
    """The RVQ tokenizer over the autoencoder's latents (``rvq.*``)."""
    r = cfg.rvq
    return ResidualVQ(cfg.autoencoder.latent_channels, r.levels, r.codes, r.decay, r.dead_threshold, r.kmeans_iters)


def lmm_args(cfg: Config, kind: str | None = None) -> LMMArgs:
    """An LMM of ``kind`` (default ``lmm.kind``): its sizes from ``lmm.<kind>``, codes from ``rvq.*``, the LMDM's window
    (``(stream.context_blocks + 1) · stream.block_frames`` frames) and the text encoder's width."""
    kind = kind or cfg.lmm.kind
    size = cfg.lmm.flat if kind == "flat" else cfg.lmm.framewise
    return LMMArgs(
        kind=kind,
        latent_channels=cfg.autoencoder.latent_channels,
        levels=cfg.rvq.levels,
        codes=cfg.rvq.codes,
        width=size.width,
        depth=size.depth,
        window_frames=(cfg.stream.context_blocks + 1) * cfg.stream.block_frames,
        head_dim=size.head_dim,
        cond_token_dim=cfg.dit.cond_token_dim,
        embed_dim=size.embed_dim,
        depth_width=size.depth_width,
        depth_layers=size.depth_layers,
    )


def build_lmm(cfg: Config, kind: str | None = None, tokenizer: ResidualVQ | None = None) -> LMM:
    """The LMM of :func:`lmm_args`, holding ``tokenizer``'s codebooks (a trained RVQ) when given.

    Raises:
        ValueError: a tokenizer of another depth, codebook size or latent width than the config's ``rvq.*``.
    """
    lmm = LMM(lmm_args(cfg, kind))
    if tokenizer is not None:
        mine, theirs = (lmm.rvq.levels, lmm.rvq.codes, lmm.rvq.dim), (tokenizer.levels, tokenizer.codes, tokenizer.dim)
        if mine != theirs:
            raise ValueError(
                f"the RVQ tokenizer has {theirs[0]} levels of {theirs[1]} codes over {theirs[2]} channels, but the config's LMM "
                f"expects {mine[0]} of {mine[1]} over {mine[2]} (rvq.levels, rvq.codes, autoencoder.latent_channels): "
                f"set rvq.levels={theirs[0]} rvq.codes={theirs[1]}, or train a tokenizer for this config"
            )
        lmm.rvq.load_state_dict(tokenizer.state_dict())
    return lmm


def build_lmm_sampling(cfg: Config) -> LMMSampling:
    return LMMSampling(temperature=cfg.lmm.temperature, top_k=cfg.lmm.top_k, cfg_scale=cfg.stream.cfg_scale)


def build_geometry(cfg: Config) -> BlockGeometry:
    return BlockGeometry(block_frames=cfg.stream.block_frames, context_blocks=cfg.stream.context_blocks)


def build_sampling(cfg: Config) -> Sampling:
    s = cfg.stream
    return Sampling(steps=s.steps, sampler=s.sampler, cfg_scale=s.cfg_scale, objective=cfg.dit.objective, schedule=s.schedule)


def build_runtime(cfg: Config, dit: DiT | LMM, name: str | None = None) -> Runtime:
    """The runtime ``name`` (default: ``stream.runtime``) for the model's device (``auto``: packed on CPU, compile on CUDA)."""
    return get_runtime(name or cfg.stream.runtime, next(dit.parameters()).device)


def build_engine(
    cfg: Config, dit: DiT | LMM, variant: EngineKind | None = None, runtime: Runtime | None = None
) -> OutpaintingEngine | LMDMEngine | LMMEngine:
    """The engine for ``variant`` (default: ``stream.variant``; an LMM's kind for an LMM) on ``runtime`` (default: ``stream.runtime``).

    Raises:
        ValueError: an LMM with a diffusion variant, a DiT with an LMM kind, or an LMM of the other kind.
    """
    runtime = runtime or build_runtime(cfg, dit)
    if isinstance(dit, LMM):
        if variant is not None and variant != dit.args.kind:
            raise ValueError(f"this checkpoint is a {dit.args.kind} LMM; it streams as variant {dit.args.kind!r}, not {variant!r}")
        return LMMEngine(dit, build_geometry(cfg), build_lmm_sampling(cfg), runtime)
    kind = variant or cfg.stream.variant
    if kind == "flat" or kind == "framewise":
        raise ValueError(f"variant {kind!r} streams an LMM checkpoint (`lmdm train --stage lmm`), not a DiT")
    if kind == "outpainting":
        return OutpaintingEngine(dit, build_geometry(cfg), build_sampling(cfg), runtime)
    return LMDMEngine(dit, kind, build_geometry(cfg), build_sampling(cfg), rotary=cfg.stream.rotary, runtime=runtime)


def load_stream_models(
    cfg: Config, dit_path: Path | None, autoencoder_path: Path | None, encoder: Any, variant: EngineKind | None = None
) -> tuple[Any, OobleckVAE]:
    """The DiT (an LMM for variant ``flat`` or ``framewise``) and autoencoder (random init where no folder is
    given), checked against each other and against the stream about to run
    (:func:`lmdm.checkpoints.compat.check_streaming`, :func:`~lmdm.checkpoints.compat.check_lmm_streaming`) with
    ``variant`` (default ``stream.variant``) and the text ``encoder`` (a :class:`~lmdm.text.encoders.TextEncoder` or ``None``).

    Raises:
        CheckpointError: a folder that cannot be loaded, of the wrong kind, or trained for another
            variant, geometry, objective, autoencoder or text encoder.
        ValueError: latent channels that differ between the DiT and the autoencoder.
    """
    from lmdm.checkpoints.compat import check_lmm_streaming, check_streaming
    from lmdm.checkpoints.format import file_sha256, load_checkpoint, read_checkpoint_info

    kind = variant or cfg.stream.variant
    vae: Any = load_checkpoint(autoencoder_path, kind="autoencoder")[0] if autoencoder_path else build_autoencoder_from(cfg)
    ae_sha = file_sha256(Path(autoencoder_path) / "model.safetensors") if autoencoder_path else None
    if kind in LMM_KINDS:
        if dit_path is None:
            return build_lmm(cfg, kind), vae
        info = read_checkpoint_info(dit_path, kind="lmm")
        check_lmm_streaming(info, kind=kind, latent_channels=vae.latent_dim, autoencoder=ae_sha,
                            text_encoder=encoder.fingerprint() if encoder is not None else None)  # fmt: skip
        return load_checkpoint(dit_path, kind="lmm")[0], vae
    dit: Any = load_checkpoint(dit_path, kind="dit")[0] if dit_path else build_dit(cfg)
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
            autoencoder=ae_sha,
            text_encoder=encoder.fingerprint() if encoder is not None else None,
        )
    return dit, vae
