"""What a replica holds and what one session is, in plain PyTorch (no Ray, no web): the models with their
caches (engines per sampling setting, prompt embeddings, blended prompt sets) and :class:`StreamSession`, a
:class:`~lmdm.streaming.stream.Stream` that yields 16-bit PCM. The app (:mod:`lmdm.serve.app`) runs these
off its event loop; tests and the offline reference use the same functions (:func:`pcm16`,
:func:`encode_context`).

Legend: C audio channels, n samples, D latent channels, F latent frames.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmdm.config import Config
from lmdm.models.autoencoder import StreamingDecoder
from lmdm.serve.protocol import WeightedPrompt, prompt_key
from lmdm.streaming.common import Condition
from lmdm.streaming.rollout import condition_at
from lmdm.streaming.stream import Stream

__all__ = ["Pacer", "ServeModels", "SessionError", "StreamSession", "blend", "encode_context", "next_chunks", "pcm16"]


class SessionError(ValueError):
    """A session request the models cannot serve (a prompt too long, a context of the wrong shape, ...)."""


def pcm16(audio: Tensor) -> np.ndarray:
    """``(C, n)`` float audio → ``(n, C)`` int16, channels interleaved (clipped to [-1, 1], rounded)."""
    pcm: np.ndarray = (audio.detach().float().clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16).T.contiguous().numpy()
    return pcm


def encode_context(vae: Any, pcm: np.ndarray) -> Tensor:
    """Starting context latents ``(1, D, F)`` of ``(n, C)`` int16 audio: the autoencoder's posterior mean.

    Raises:
        SessionError: a length that is not whole latent frames, or another channel count than the autoencoder's.
    """
    n, C = pcm.shape
    if C != vae.audio_channels or n % vae.downsampling_ratio:
        raise SessionError(
            f"context audio must be whole latent frames ({vae.downsampling_ratio} samples) of {vae.audio_channels} channel(s), got {n} × {C}"
        )
    audio = torch.from_numpy(pcm.astype(np.float32) / 32767.0).T[None]  # (1, C, n)
    dtype = next(vae.parameters()).dtype
    with torch.inference_mode():
        mean: Tensor = vae.encode(audio.to(dtype)).mean
    return mean


def blend(tokens: list[Tensor], weights: list[float]) -> Tensor:
    """Prompts blended in the text-embedding space: the weighted mean of their ``(1, L, Dc)`` token embeddings."""
    total = sum(weights)
    out = tokens[0] * (weights[0] / total)
    for t, w in zip(tokens[1:], weights[1:], strict=True):
        out = out + t * (w / total)
    return out


class _LRU(OrderedDict[str, Any]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or(self, key: str, make: Any) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class ServeModels:
    """A replica's models: the streaming DiT, its autoencoder and text encoder, one runtime, and caches of
    engines (per steps × CFG scale), prompt embeddings (per text) and blended prompt sets (per set).

    Not thread-safe: the app calls it from its one torch worker thread only.
    """

    def __init__(self, cfg: Config, dit: Any, vae: Any, encoder: Any, dit_source: str, autoencoder_source: str) -> None:
        from lmdm.builders import build_runtime

        self.cfg, self.dit, self.vae, self.encoder = cfg, dit, vae, encoder
        self.dit_source, self.autoencoder_source = dit_source, autoencoder_source
        self.runtime = build_runtime(cfg, dit)
        self.sample_rate = cfg.audio.sample_rate
        self.channels = int(vae.audio_channels)
        self.hop = int(vae.downsampling_ratio)
        self.block_samples = cfg.stream.block_frames * self.hop
        self.context_blocks = cfg.stream.context_blocks
        self.latency_samples = StreamingDecoder(vae).latency_samples
        self.text = encoder is not None and getattr(dit.args, "cond_token_dim", 0) > 0
        self._engines = _LRU(4)
        self._pools: dict[int, Any] = {}  # id(engine) → its cache pool (serve.max_sessions rows, made on first use)
        self._tokens = _LRU(64)
        self._sets = _LRU(64)

    @staticmethod
    def load(cfg: Config, dit_path: Path | None, autoencoder_path: Path | None) -> ServeModels:
        """Load the checkpoints (``None``: random init, said in :attr:`dit_source`) and check them against the
        stream settings and the text encoder (:func:`lmdm.builders.load_stream_models`).

        Raises:
            CheckpointError / ValueError: checkpoints that cannot be loaded or do not fit together.
        """
        from lmdm.builders import load_stream_models
        from lmdm.models.lmm import LMM
        from lmdm.text.encoders import load_text_encoder

        encoder = load_text_encoder(cfg.text.encoder, cfg.text.path, cfg.text.max_tokens)
        dit, vae = load_stream_models(cfg, dit_path, autoencoder_path, encoder)
        if isinstance(dit, LMM):
            raise SessionError("lmdm serve streams a diffusion checkpoint (an LMDM or outpainting DiT), not an LMM")
        dit.eval()
        vae.eval()
        if dit.args.cond_token_dim and dit.args.cond_token_dim != encoder.dim:
            raise SessionError(
                f"the DiT takes {dit.args.cond_token_dim}-d text tokens but text encoder {cfg.text.encoder!r} gives {encoder.dim}-d: "
                "set text.encoder/text.path to the one it was trained with"
            )
        return ServeModels(cfg, dit, vae, encoder, str(dit_path or "random init"), str(autoencoder_path or "random init"))

    def engine(self, steps: int | None, cfg_scale: float | None) -> Any:
        """The engine for these sampling settings (``None``: ``stream.steps`` / ``stream.cfg_scale``), cached."""
        from lmdm.builders import build_engine

        s = self.cfg.stream
        steps, cfg_scale = steps or s.steps, s.cfg_scale if cfg_scale is None else cfg_scale
        limit = self.cfg.serve.max_steps
        if steps > limit:
            raise SessionError(f"steps = {steps}; this server allows at most {limit} (serve.max_steps)")

        def make() -> Any:
            stream = s.model_copy(update={"steps": steps, "cfg_scale": cfg_scale})
            return build_engine(self.cfg.model_copy(update={"stream": stream}), self.dit, runtime=self.runtime)

        return self._engines.get_or(f"{steps}:{cfg_scale!r}", make)

    def take_row(self, engine: Any) -> tuple[Any, int, Any] | None:
        """A pooled cache row of ``engine`` for a new session: ``(pool, row, cache)``; ``None`` for an engine
        without pooled caches (outpainting).

        Raises:
            SessionError: every row is taken (more sessions than ``serve.max_sessions``).
        """
        if not hasattr(engine, "cache_pool"):
            return None
        pool = self._pools.get(id(engine))
        if pool is None:
            pool = self._pools[id(engine)] = engine.cache_pool(self.cfg.serve.max_sessions)
        try:
            row, cache = pool.take()
        except RuntimeError as exc:
            raise SessionError(str(exc)) from None
        return pool, row, cache

    def condition(self, prompts: list[WeightedPrompt]) -> Condition:
        """The condition of a prompt set: its prompts' token embeddings blended by weight, cached per set
        (an empty set, or a model without text: unconditional).

        Raises:
            SessionError: a prompt over ``serve.max_prompt_chars`` or the text encoder's tokens, too many
                prompts, or weights that sum to zero.
        """
        if not prompts or not self.text:
            return Condition()
        limits = self.cfg.serve
        if len(prompts) > limits.max_prompts:
            raise SessionError(f"{len(prompts)} prompts in one set; this server takes at most {limits.max_prompts} (serve.max_prompts)")
        for p in prompts:
            if len(p.text) > limits.max_prompt_chars:
                raise SessionError(
                    f"a prompt of {len(p.text)} characters; this server takes at most {limits.max_prompt_chars} (serve.max_prompt_chars)"
                )
        if sum(p.weight for p in prompts) <= 0:
            raise SessionError("the prompt weights sum to 0: give at least one prompt a weight above 0")
        key = prompt_key(prompts)
        dtype = next(self.dit.parameters()).dtype

        def make() -> Condition:
            from lmdm.text.encoders import TextEncoderError

            try:
                tokens = [self._tokens.get_or(p.text, lambda p=p: self.encoder.encode([p.text]).tokens.to(dtype)) for p in prompts]
            except TextEncoderError as exc:
                raise SessionError(str(exc)) from None
            return Condition(blend(tokens, [p.weight for p in prompts]), key)

        condition: Condition = self._sets.get_or(key, make)
        return condition

    def warm_up(self, blocks: int) -> float:
        """Generate ``blocks`` blocks (compiling where the runtime compiles) so the first session starts warm;
        returns the seconds of the last block (its compute time)."""
        import time

        if blocks < 1:
            return 0.0
        session = StreamSession(self, Condition(), seed=0, steps=None, cfg_scale=None)
        seconds = 0.0
        for _ in range(blocks):
            begin = time.perf_counter()
            session.next_chunk()
            seconds = time.perf_counter() - begin
        return seconds


@dataclass
class Chunk:
    """One block's audio: the block it ends, its first sample's index in the session, ``(n, C)`` int16 PCM."""

    block: int
    first_sample: int
    pcm: np.ndarray


class StreamSession:
    """One stream's engine state, streaming decoder and current condition; :meth:`next_chunk` generates a block."""

    def __init__(
        self,
        models: ServeModels,
        condition: Condition,
        seed: int,
        steps: int | None,
        cfg_scale: float | None,
        context: Tensor | None = None,
        pooled: bool = False,
    ) -> None:
        self.models = models
        self.condition = condition
        engine = models.engine(steps, cfg_scale)
        self._row = models.take_row(engine) if pooled else None  # (pool, row, cache): given back by close()
        if context is not None:
            Bf, k = models.cfg.stream.block_frames, models.context_blocks
            if k == 0:
                context = None
            elif context.shape[-1] % Bf:
                raise SessionError(f"the starting context is {context.shape[-1]} latent frames, not whole blocks of {Bf}")
            else:
                context = context[..., -k * Bf :]
        cache = None if self._row is None else self._row[2]
        generator = torch.Generator().manual_seed(seed)
        self.stream = Stream(engine, models.vae, condition, context=context, generator=generator, cache=cache)
        self.samples = 0  # samples emitted so far (per channel)

    def close(self) -> None:
        """The session left: its pooled cache row goes back to the pool (once)."""
        if self._row is not None:
            pool, row, _ = self._row
            self._row = None
            pool.give(row)

    @property
    def block(self) -> int:
        """The index of the next block."""
        return self.stream.blocks

    def set_condition(self, condition: Condition) -> int:
        """Use ``condition`` from the next block on; returns that block's index."""
        self.condition = condition
        self.stream.set_condition(condition)
        return self.stream.blocks

    def next_chunk(self) -> Chunk:
        """Generate the next block; its final audio as int16 PCM."""
        with torch.inference_mode():
            audio = self.stream.next_chunk()[0]  # (C, n)
        return self._chunk(audio)

    def _chunk(self, audio: Tensor) -> Chunk:
        chunk = Chunk(self.stream.blocks - 1, self.samples, pcm16(audio))
        self.samples += chunk.pcm.shape[0]
        return chunk

    def share_key(self) -> tuple[Any, ...]:
        """Sessions with equal keys can step their next block as one batch: the same engine (steps, CFG scale,
        sampler), the same first step (a pending block to commit or none), prompts alike in having text; an
        engine that cannot renumber its streams (``encdec``, growing rotary) also needs the same block and
        context fill. An engine without batching (outpainting) keys each session apart."""
        engine, state = self.stream.engine, self.stream.state
        if not hasattr(engine, "stack"):
            return ("alone", id(self))
        condition = condition_at(self.stream.schedule, self.stream.blocks)
        key: tuple[Any, ...] = (id(engine), state.pending is None, condition.text is None, condition.global_cond is None)
        if not (engine.variant == "block_causal" and engine.rotary == "fixed"):
            key += (state.progress.block, tuple(k is None for k in state.window.keys))
        return key


def next_chunks(sessions: list[StreamSession]) -> list[Chunk]:
    """The next block of each session, as :meth:`StreamSession.next_chunk` gives it, with the sessions that can
    share a step (:meth:`StreamSession.share_key`) stepped as one batch and every block decoded in batches
    (:func:`~lmdm.models.autoencoder.push_together`): a replica's scheduler serving many sessions at once.
    Each session's audio equals its own ``next_chunk`` (within float rounding of the batched matmuls)."""
    from lmdm.models.autoencoder import push_together
    from lmdm.streaming.batching import step_together

    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, session in enumerate(sessions):
        groups.setdefault(session.share_key(), []).append(i)
    blocks: list[Tensor | None] = [None] * len(sessions)
    with torch.inference_mode():
        for members in groups.values():
            streams = [sessions[i].stream for i in members]
            conditions = [condition_at(s.schedule, s.blocks) for s in streams]
            made = step_together(streams[0].engine, [s.state for s in streams], conditions)
            for i, block in zip(members, made, strict=True):
                blocks[i] = block
        dtype = next(sessions[0].models.vae.parameters()).dtype
        for s in sessions:
            s.stream.blocks += 1
        audio = push_together([s.stream.decoder for s in sessions], [b.to(dtype) for b in blocks if b is not None])
    return [s._chunk(a[0]) for s, a in zip(sessions, audio, strict=True)]


@dataclass
class Pacer:
    """The client's playback position as the server reckons it: playback starts when the first samples go out
    (not with a first frame shorter than the decoder's lookahead, which has none), runs at the sample rate, and
    stops while paused. A session generates while :meth:`ahead` is under its ``blocks_ahead`` budget."""

    sample_rate: int
    t0: float | None = None
    sent: int = 0
    paused_at: float | None = None
    paused_total: float = 0.0

    def played(self, now: float) -> float:
        """Samples the client has played by ``now``."""
        if self.t0 is None:
            return 0.0
        paused = self.paused_total + ((now - max(self.paused_at, self.t0)) if self.paused_at is not None else 0.0)
        return max(0.0, (now - self.t0 - paused) * self.sample_rate)

    def ahead(self, now: float) -> float:
        """Samples sent but not yet played (negative: the client ran dry)."""
        return self.sent - self.played(now)

    def send(self, samples: int, now: float) -> bool:
        """Count a frame of ``samples`` going out at ``now``; ``True`` when it comes too late (an underrun)."""
        late = False
        if self.t0 is None:
            if samples:
                self.t0 = now
        else:
            late = self.ahead(now) < 0
        self.sent += samples
        return late

    def pause(self, now: float) -> None:
        if self.paused_at is None:
            self.paused_at = now

    def play(self, now: float) -> None:
        if self.paused_at is not None:
            if self.t0 is not None:  # only the part of the pause after playback began
                self.paused_total += max(0.0, now - max(self.paused_at, self.t0))
            self.paused_at = None
