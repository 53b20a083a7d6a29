"""The LMM baseline's engine: token-by-token decoding with preallocated KV caches, a block of latents per ``step``.

It implements :class:`~lmdm.streaming.common.Engine` (``start``, ``step``, ``progress``), so rollout,
streams, eval and the benches drive it as they drive the LMDM. A ``step`` samples ``block_frames`` frames
of RVQ codes and returns them decoded to latents ``(B, C, Bf)`` by the model's RVQ (the autoencoder does
the rest, as for the LMDM).

Decode paths are as lean as the LMDM's: the temporal stack writes each token into a
:class:`~lmdm.models.kv_cache.TokenRingCache` (sliding window, bounded rotary positions), the
``framewise`` depth transformer into a ``K``-slot cache reused for every frame; no concatenation, no
allocation that grows, no host sync (sampled codes stay on the device and feed the next step). Text
keys/values are cached per prompt (:class:`~lmdm.streaming.common.PromptCache`); a prompt that changes
between blocks applies to the tokens generated after it, the cached ones keep theirs. With
classifier-free guidance the rows are ``[cond; uncond]`` (uncond: no text), both fed the sampled code.

Legend: B batch, R rows (B × branches), C latent channels, K levels, V codes, Bf block frames, W window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmdm.diffusion.noise import Generator, rand
from lmdm.diffusion.samplers import cfg_combine
from lmdm.models.dit import TextKV
from lmdm.models.kv_cache import CacheIO, TokenRingCache
from lmdm.models.lmm import LMM
from lmdm.runtime import LayerRunner, Runtime, get_runtime
from lmdm.streaming.common import Condition, Progress, PromptCache
from lmdm.streaming.sequences import BlockGeometry

__all__ = ["LMMEngine", "LMMSampling", "LMMState", "sample_codes"]


@dataclass(frozen=True)
class LMMSampling:
    """How codes are drawn: ``temperature`` 0 is greedy; ``top_k`` 0 keeps every code; ``cfg_scale`` 1 is no CFG."""

    temperature: float = 1.0
    top_k: int = 0
    cfg_scale: float = 1.0


def sample_codes(logits: Tensor, sampling: LMMSampling, generator: Generator) -> Tensor:
    """One code per row of logits ``(B, V)``: greedy, or Gumbel-max over the ``top_k`` largest at ``temperature``.

    Returns:
        ``(B,)`` int64, on the logits' device (no host sync).
    """
    if sampling.temperature == 0:
        return logits.argmax(-1)
    index = None
    if 0 < sampling.top_k < logits.shape[-1]:
        logits, index = logits.topk(sampling.top_k, dim=-1)
    u = rand((logits.shape[0], logits.shape[1]), generator, logits.device).clamp_(min=1e-20)
    choice = (logits.float() / sampling.temperature - (-u.log()).log()).argmax(-1)
    return choice if index is None else index.gather(1, choice[:, None])[:, 0]


@dataclass
class LMMState:
    """One LMM stream: progress, prompts, the temporal ring cache (and the depth cache), the last codes."""

    progress: Progress
    prompts: PromptCache
    cache: TokenRingCache
    depth_k: Tensor | None  # framewise: (Ly_d, R, H, K, Dh) depth keys, reused every frame
    depth_v: Tensor | None
    last: Tensor  # flat: (B,) the last code; framewise: (B, K) the last frame's codes
    codes: Tensor  # (B, K, Bf) the block being generated


class LMMEngine:
    """Generates blocks of ``geometry.block_frames`` frames with a ``flat`` or ``framewise`` :class:`~lmdm.models.lmm.LMM`.

    Args:
        lmm: the model (its ``window_frames`` is the stream's attention window).
        geometry: the block size of each ``step`` (and of a starting context).
        sampling: temperature, top-k and CFG.
        runtime: how the layer stacks run (:mod:`lmdm.runtime`; default ``eager``), as for the LMDM.

    Raises:
        ValueError: a negative temperature or top-k.
    """

    def __init__(self, lmm: LMM, geometry: BlockGeometry, sampling: LMMSampling, runtime: Runtime | None = None) -> None:
        if sampling.temperature < 0 or sampling.top_k < 0:
            raise ValueError(f"LMM sampling needs temperature >= 0 and top_k >= 0, got {sampling}")
        self.lmm, self.geometry, self.sampling = lmm, geometry, sampling
        a = lmm.args
        self.kind, self.levels, self.codes_per_level = a.kind, a.levels, a.codes
        self.channels = a.latent_channels
        first = next(lmm.parameters())
        self.dtype, self.device = first.dtype, first.device
        runtime = runtime if runtime is not None else get_runtime("eager", self.device)
        self.runtime = runtime
        self.run_temporal: LayerRunner = runtime.bind(lmm.temporal)
        W = lmm.window_tokens
        self.freqs = lmm.temporal.freqs(torch.arange(2 * W, device=self.device))  # relative positions 0..2W-1
        if self.kind == "framewise":
            self.run_depth: LayerRunner = runtime.bind(lmm.depth)
            positions = torch.arange(a.levels, device=self.device)
            self.depth_freqs = lmm.depth.freqs(positions)
            self.depth_slots = positions

    # ---- lifecycle ----------------------------------------------------------------------------

    def progress(self, state: LMMState) -> Progress:
        return state.progress

    def start(self, condition: Condition, batch: int, context: Tensor | None = None, generator: torch.Generator | None = None) -> LMMState:
        """A new stream of ``batch`` rows; ``context`` ``(B, C, k·Bf)`` is encoded by the RVQ and prefilled.

        Raises:
            ValueError: a context of another batch, channel count, or not whole blocks.
        """
        lmm, K = self.lmm, self.levels
        rows = batch * (2 if self.sampling.cfg_scale != 1.0 else 1)
        stack = lmm.temporal
        cache = TokenRingCache.allocate(len(stack.layers), rows, stack.heads, stack.head_dim, lmm.window_tokens, self.dtype, self.device)
        depth_k = depth_v = None
        if self.kind == "framewise":
            d = lmm.depth
            shape = (len(d.layers), rows, d.heads, K, d.head_dim)
            depth_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            depth_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        last_shape = (batch,) if self.kind == "flat" else (batch, K)
        state = LMMState(
            progress=Progress(batch=batch, rows=rows, block=0, generator=generator),
            prompts=PromptCache(lmm, batch, rows, self.dtype),
            cache=cache,
            depth_k=depth_k,
            depth_v=depth_v,
            last=torch.zeros(last_shape, dtype=torch.long, device=self.device),
            codes=torch.zeros(batch, K, self.geometry.block_frames, dtype=torch.long, device=self.device),
        )
        if context is not None:
            self._prefill(state, condition, self._check_context(context, batch))
        return state

    def _check_context(self, context: Tensor, batch: int) -> Tensor:
        B, C, T = context.shape
        Bf = self.geometry.block_frames
        if B != batch or C != self.channels or T % Bf or T == 0:
            raise ValueError(f"context must be (batch={batch}, channels={self.channels}, whole blocks of {Bf}), got {tuple(context.shape)}")
        return context

    @torch.no_grad()
    def _prefill(self, state: LMMState, condition: Condition, context: Tensor) -> None:
        """Encode a starting context ``(B, C, T)`` to codes and run them through the temporal stack in one
        teacher-forced pass; the last window of keys/values fills the ring."""
        lmm = self.lmm
        codes = lmm.rvq.encode(context.to(lmm.rvq.codebooks.dtype))  # (B, K, T)
        rows = self._rows(codes, state)
        N = lmm.temporal_inputs(codes[:1]).shape[1]
        c = state.cache
        shape = (c.k.shape[0], c.k.shape[1], c.k.shape[2], N, c.k.shape[4])
        keys, values, raw = (torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(3))
        everything = torch.arange(N, device=self.device)
        lmm.temporal_hidden(rows, self._text(state, condition), keys_values=CacheIO(keys, values, everything, 0, N, raw, everything))
        c.load(raw, values, lmm.temporal.rotate)
        state.last = codes[:, -1, -1] if self.kind == "flat" else codes[:, :, -1]

    # ---- one block ----------------------------------------------------------------------------

    def _rows(self, x: Tensor, state: LMMState) -> Tensor:
        """``(B, ...)`` repeated for every CFG branch: ``(R, ...)``."""
        p = state.progress
        return x if p.rows == p.batch else torch.cat([x] * (p.rows // p.batch))

    def _text(self, state: LMMState, condition: Condition) -> TextKV | None:
        if condition.text is not None and not self.lmm.args.cond_token_dim:
            raise ValueError("this LMM has no text conditioning (cond_token_dim=0) but the condition carries text")
        return state.prompts.get(condition)

    def _sample(self, logits: Tensor, state: LMMState) -> Tensor:
        """Rows' logits ``(R, V)`` → codes ``(B,)`` (CFG combined first)."""
        p = state.progress
        if p.rows != p.batch:
            cond, uncond = logits.chunk(2)
            logits = cfg_combine(cond, uncond, self.sampling.cfg_scale)
        return sample_codes(logits, self.sampling, p.generator)

    @torch.no_grad()
    def step(self, state: LMMState, condition: Condition, exit_step: int | None = None) -> Tensor:
        """Sample the next ``block_frames`` frames of codes and return them decoded by the RVQ, ``(B, C, Bf)``.

        Raises:
            ValueError: ``exit_step`` (an LMM has no denoising steps to train through), or text for a textless model.
        """
        if exit_step is not None:
            raise ValueError("an LMM engine has no denoising steps: exit_step applies to diffusion engines only")
        text_kv = self._text(state, condition)
        for t in range(self.geometry.block_frames):
            if self.kind == "flat":
                self._flat_frame(state, text_kv, t)
            else:
                self._framewise_frame(state, text_kv, t)
        state.progress.block += 1
        return self.lmm.rvq.decode(state.codes).to(self.dtype)

    def _temporal(self, state: LMMState, x: Tensor, text_kv: TextKV | None) -> Tensor:
        """One temporal token ``(B, 1, D)`` through the ring cache → its output rows ``(R, 1, D)``."""
        c = state.cache
        rel = c.relative_position()
        h = self.run_temporal(self._rows(x, state), self.freqs[:, rel : rel + 1], None, text_kv, None, c.step_io())
        c.advance(1, self.lmm.temporal.rotate)
        return h

    def _flat_frame(self, state: LMMState, text_kv: TextKV | None, t: int) -> None:
        lmm, K = self.lmm, self.levels
        for k in range(K):
            x = lmm.bos.expand(state.progress.batch, 1, -1) if state.cache.written == 0 else lmm.embed_token(state.last, (k - 1) % K)
            h = self._temporal(state, x + lmm.level_in.weight[k], text_kv)
            code = self._sample(lmm.head.level(h, k)[:, 0], state)
            state.codes[:, k, t] = code
            state.last = code

    def _framewise_frame(self, state: LMMState, text_kv: TextKV | None, t: int) -> None:
        lmm = self.lmm
        B = state.progress.batch
        x = lmm.bos.expand(B, 1, -1) if state.cache.written == 0 else lmm.embed_frame(state.last)
        z = lmm.depth_from_temporal(self._temporal(state, x, text_kv)) + lmm.depth_position.weight[0]
        assert state.depth_k is not None and state.depth_v is not None
        for k in range(self.levels):
            io = CacheIO(state.depth_k, state.depth_v, self.depth_slots[k : k + 1], 0, k + 1)
            out = self.run_depth(z, self.depth_freqs[:, k : k + 1], None, None, None, io)
            code = self._sample(lmm.head.level(out, k)[:, 0], state)
            state.codes[:, k, t] = code
            if k + 1 < self.levels:
                z = self._rows(lmm.depth_input(code, k), state)
        state.last = state.codes[:, :, t].clone()

    def cache_bytes(self, state: LMMState) -> int:
        """Bytes of the stream's KV caches (temporal ring, and the depth cache)."""
        extra = 0 if state.depth_k is None or state.depth_v is None else 2 * state.depth_k.numel() * state.depth_k.element_size()
        return state.cache.nbytes() + extra
