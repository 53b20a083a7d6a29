"""Streaming engines: one interface, three methods (outpainting, LMDM ``encdec``, LMDM ``block_causal``).

``state = engine.start(condition, batch, context=None)`` then ``block = engine.step(state, condition)``
per block. ``step`` runs the sampler over :meth:`denoise_step` (the public per-denoising-step
function) and commits the finished block as context. Classifier-free guidance runs both branches as
one batch (rows ``[cond; uncond]``), each branch with its own context cache.

- :class:`OutpaintingEngine`: the bidirectional base denoises the whole window (context + target)
  at every step under the ``full`` mask: cost per block ∝ ``steps × f(context + block)``.
- :class:`LMDMEngine`: context keys/values live in a :class:`~lmdm.models.kv_cache.BlockKVCache`;
  each denoising step runs only the global token and the target block. ``encdec`` re-encodes the
  context once per block; ``block_causal`` encodes each block once, ever, in its own pass after it
  is generated (under the prompt active for it), into a FIFO ring.

Legend: B batch, R rows (B × branches), C latent channels, Bf block frames, Ctx context blocks,
Kc = Ctx·Bf context frames, L text tokens, Dc text width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

from lmdm.diffusion.objectives import Objective, get_objective
from lmdm.diffusion.samplers import cfg_combine, sample, x0_denoiser
from lmdm.diffusion.schedule import timesteps
from lmdm.models.attention import KVHook, Projected
from lmdm.models.block_mask import additive_mask, text_group_mask
from lmdm.models.dit import DiT, TextKV
from lmdm.models.kv_cache import BlockKVCache
from lmdm.models.rotary import apply_rotary
from lmdm.streaming.sequences import BlockGeometry, context_inputs

__all__ = ["Condition", "Engine", "LMDMEngine", "OutpaintingEngine", "Sampling", "StreamState"]

RotaryMode = Literal["fixed", "growing"]


@dataclass(frozen=True)
class Condition:
    """What a block is generated under.

    Attributes:
        text: ``(B, L, Dc)`` text-encoder tokens, or ``None`` (unconditional).
        key: identifies the prompt; text K/V are cached per key (a new key is a new prompt).
        global_cond: ``(B, global_cond_dim)`` timing conditioning, held fixed for a stream.
    """

    text: Tensor | None = None
    key: str = ""
    global_cond: Tensor | None = None


@dataclass(frozen=True)
class Sampling:
    """How each block is denoised."""

    steps: int = 8
    sampler: str = "euler"
    cfg_scale: float = 1.0
    objective: str = "rectified_flow"
    schedule: str = "linear"


@dataclass
class StreamState:
    """Everything a stream carries between blocks (one per session)."""

    batch: int
    rows: int  # batch × CFG branches
    block: int  # index of the next block to generate
    generator: torch.Generator | None
    context: Tensor  # (B, C, Kc) clean context latents, oldest first (logical order)
    slot_key: list[str | None]  # prompt key each context block was committed under (logical order)
    cache: BlockKVCache | None = None
    text: dict[str, TextKV] = field(default_factory=dict)  # per prompt key, rows [cond; uncond]
    # Per-block plan (built once per block, reused by every denoising step).
    text_kv: TextKV | None = None
    freqs: Tensor | None = None
    mask: Tensor | None = None
    hooks: list[KVHook] | None = None
    global_cond: Tensor | None = None
    text_mask: Tensor | None = None  # outpainting: per-token prompt groups of the window
    frames_ctx: Tensor | None = None  # outpainting: (R, 2C+1, Kc) context-frame inputs of the window
    frames: Tensor | None = None  # LMDM: (R, 2C+1, Bf) target-frame input buffer, [x_t, 0, 0]
    pending: Tensor | None = None  # block_causal: (R, 2C+1, Bf) inputs of the last block, committed by the next first step
    pending_key: str = ""  # the prompt that block was generated under
    merged: bool = False  # the next denoise_step is the merged (commit + first step) pass
    step_text_kv: TextKV | None = None  # text K/V of the current prompt (the merged pass may add the committing block's)


class Engine(Protocol):
    """The interface every generation method implements (outpainting, LMDM variants, LMM)."""

    def start(
        self, condition: Condition, batch: int, context: Tensor | None = None, generator: torch.Generator | None = None
    ) -> StreamState: ...

    def step(self, state: StreamState, condition: Condition) -> Tensor: ...


class _Base:
    """Shared parts: text caching, CFG rows, the sampler loop, context bookkeeping."""

    def __init__(self, dit: DiT, geometry: BlockGeometry, sampling: Sampling) -> None:
        if dit.args.input_concat_dim != dit.args.io_channels + 1:
            raise ValueError(
                f"streaming needs a DiT with input_concat_dim = io_channels + 1 = {dit.args.io_channels + 1} "
                f"(clean context + context mask), got {dit.args.input_concat_dim}"
            )
        self.dit = dit
        self.geometry = geometry
        self.sampling = sampling
        self.objective: Objective = get_objective(sampling.objective)
        self.channels = dit.args.io_channels
        first = next(dit.parameters())
        self.dtype, self.device = first.dtype, first.device
        self.ts = timesteps(sampling.steps, self.objective, sampling.schedule, device=self.device, dtype=self.dtype)

    def _branches(self, condition: Condition) -> int:
        return 2 if self.sampling.cfg_scale != 1.0 and condition.text is not None else 1

    def _new_state(self, condition: Condition, batch: int, context: Tensor | None, generator: torch.Generator | None) -> StreamState:
        Kc, Bf, Ctx = self.geometry.context_frames, self.geometry.block_frames, self.geometry.context_blocks
        state = StreamState(
            batch=batch,
            rows=batch * self._branches(condition),
            block=0,
            generator=generator,
            context=torch.zeros(batch, self.channels, Kc, dtype=self.dtype, device=self.device),
            slot_key=[None] * Ctx,
        )
        if context is not None:
            B, C, T = context.shape
            if B != batch or C != self.channels or T % Bf:
                raise ValueError(
                    f"context must be (batch={batch}, channels={self.channels}, whole blocks of {Bf}), got {tuple(context.shape)}"
                )
        return state

    def _text_rows(self, state: StreamState, condition: Condition) -> TextKV | None:
        """Per-layer text K/V with rows ``[cond; uncond]``, cached per prompt key."""
        if condition.text is None:
            return None
        cached = state.text.get(condition.key)
        if cached is None:
            text = condition.text.to(self.dtype)
            if state.rows != state.batch:
                text = torch.cat([text, torch.zeros_like(text)])
            cached = self.dit.text_kv(text)
            state.text[condition.key] = cached
        return cached

    def _drop_unused_text(self, state: StreamState, current: str) -> None:
        keep = {k for k in state.slot_key if k is not None} | {current}
        for key in [k for k in state.text if k not in keep]:
            del state.text[key]

    def _rows(self, x: Tensor, state: StreamState) -> Tensor:
        return x if state.rows == state.batch else torch.cat([x] * (state.rows // state.batch))

    def _combine(self, out: Tensor, state: StreamState) -> Tensor:
        if state.rows == state.batch:
            return out
        cond, uncond = out.chunk(2)
        return cfg_combine(cond, uncond, self.sampling.cfg_scale)

    def _global(self, condition: Condition, state: StreamState) -> Tensor | None:
        return None if condition.global_cond is None else self._rows(condition.global_cond.to(self.dtype), state)

    def _push_context(self, state: StreamState, block: Tensor, key: str) -> None:
        """Shift the logical context window by one block (per block, not per step)."""
        Bf = self.geometry.block_frames
        if self.geometry.context_blocks == 0:
            return
        state.context = torch.cat([state.context[..., Bf:], block], dim=-1)
        state.slot_key = [*state.slot_key[1:], key]

    def denoise_step(self, state: StreamState, x_t: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _prepare(self, state: StreamState, condition: Condition) -> None:
        raise NotImplementedError

    def _commit(self, state: StreamState, block: Tensor, condition: Condition) -> None:
        raise NotImplementedError

    def step(self, state: StreamState, condition: Condition) -> Tensor:
        """Generate the next block ``(B, C, Bf)`` and commit it as context."""
        self._prepare(state, condition)
        noise = torch.randn(
            state.batch, self.channels, self.geometry.block_frames, generator=state.generator, dtype=self.dtype, device=self.device
        )
        _, sigma = self.objective.alpha_sigma(self.ts[:1])
        model_fn: Callable[[Tensor, Tensor], Tensor] = lambda x, t: self.denoise_step(state, x, t)  # noqa: E731
        block = sample(
            self.sampling.sampler,
            x0_denoiser(model_fn, self.objective),
            noise * sigma.to(self.dtype),
            self.ts,
            self.objective,
            generator=state.generator,
        )
        self._commit(state, block, condition)
        state.block += 1
        return block


class OutpaintingEngine(_Base):
    """The baseline: the whole window (context + target) is denoised at every step (``full`` mask)."""

    def start(
        self, condition: Condition, batch: int, context: Tensor | None = None, generator: torch.Generator | None = None
    ) -> StreamState:
        state = self._new_state(condition, batch, context, generator)
        if context is not None:
            for b in range(context.shape[-1] // self.geometry.block_frames):
                block = context[..., b * self.geometry.block_frames : (b + 1) * self.geometry.block_frames].to(self.dtype)
                self._push_context(state, block, condition.key)
                state.block += 1
        return state

    def _prepare(self, state: StreamState, condition: Condition) -> None:
        Bf, Kc = self.geometry.block_frames, self.geometry.context_frames
        self._drop_unused_text(state, condition.key)
        valid = torch.tensor([k is not None for k in state.slot_key], dtype=torch.bool, device=self.device).repeat_interleave(Bf)
        keys = torch.cat([valid.new_ones(1), valid, valid.new_ones(Bf)])  # [global, context, target]
        state.mask = additive_mask(keys[None, :] | torch.eye(keys.shape[0], dtype=torch.bool, device=self.device), self.dtype)
        state.freqs = self.dit.freqs(torch.arange(Kc + Bf + 1, device=self.device))
        state.global_cond = self._global(condition, state)
        state.text_kv, state.text_mask = self._window_text(state, condition)
        state.frames_ctx = context_inputs(self._rows(state.context, state))

    def _window_text(self, state: StreamState, condition: Condition) -> tuple[TextKV | None, Tensor | None]:
        """Text K/V for [global, context slots, target]: one prompt, or per-slot prompts with a group mask."""
        current = self._text_rows(state, condition)
        if current is None:
            return None, None
        keys = [k if k is not None else condition.key for k in state.slot_key]
        if all(k == condition.key for k in keys):
            return current, None
        prompts = [*dict.fromkeys([condition.key, *keys])]
        per = [state.text[k] for k in prompts]
        text_kv = [
            (torch.cat([p[i][0] for p in per], dim=2), torch.cat([p[i][1] for p in per], dim=2)) for i in range(len(self.dit.layers))
        ]
        Bf = self.geometry.block_frames
        group = torch.tensor([0] + [prompts.index(k) for k in keys for _ in range(Bf)] + [0] * Bf, device=self.device)
        return text_kv, text_group_mask(group, current[0][0].shape[2], len(prompts))

    def denoise_step(self, state: StreamState, x_t: Tensor, t: Tensor) -> Tensor:
        """The model output ``(B, C, Bf)`` for the target at ``t`` ``(B,)``, re-encoding the whole window."""
        frames_ctx = state.frames_ctx
        assert frames_ctx is not None and state.freqs is not None
        x_rows = self._rows(x_t, state)
        target = torch.cat([x_rows, torch.zeros_like(frames_ctx[:, : self.channels + 1, : x_t.shape[-1]])], dim=1)
        frames = torch.cat([frames_ctx, target], dim=-1)
        G = self.dit.global_tokens(self._rows(t, state), state.global_cond)
        h = torch.cat([G, self.dit.embed_frames(frames)], dim=1)
        h = self.dit.run_layers(h, state.freqs, state.mask, state.text_kv, state.text_mask)
        out = self.dit.unembed_frames(h[:, 1 + self.geometry.context_frames :])
        return self._combine(out, state)

    def _commit(self, state: StreamState, block: Tensor, condition: Condition) -> None:
        self._push_context(state, block, condition.key)


class LMDMEngine(_Base):
    """An LMDM: context K/V cached per block; each denoising step runs the global token + target only.

    Args:
        variant: ``encdec`` (context re-encoded bidirectionally once per block) or ``block_causal``
            (each block encoded once, banded, into a FIFO ring).
        rotary: ``fixed`` window positions (cached keys re-rotated once per block from un-rotated
            storage) or ``growing`` stream positions (keys rotated once on entry). Identical outputs.
    """

    def __init__(
        self,
        dit: DiT,
        variant: Literal["encdec", "block_causal"],
        geometry: BlockGeometry,
        sampling: Sampling,
        rotary: RotaryMode = "fixed",
    ) -> None:
        super().__init__(dit, geometry, sampling)
        if variant not in ("encdec", "block_causal"):
            raise ValueError(f"LMDM variant must be 'encdec' or 'block_causal', got {variant!r}")
        if rotary not in ("fixed", "growing"):
            raise ValueError(f"rotary mode must be 'fixed' or 'growing', got {rotary!r}")
        self.variant, self.rotary = variant, rotary
        first = dit.layers[0].self_attn
        self.heads, self.head_dim = first.heads, dit.args.width // first.heads

    # ---- positions --------------------------------------------------------------------------

    def _window_start(self, block: int) -> int:
        """Stream frame index at which the window of target ``block`` starts (growing mode)."""
        return (block - self.geometry.context_blocks) * self.geometry.block_frames

    def _own_positions(self, block: int) -> Tensor:
        """Rotary positions of [global, target frames] for target ``block``."""
        Bf, Kc = self.geometry.block_frames, self.geometry.context_frames
        base = 0 if self.rotary == "fixed" else self._window_start(block)
        return base + torch.cat([torch.zeros(1, device=self.device), torch.arange(Bf, device=self.device) + Kc + 1]).long()

    def _slot_positions(self, cache: BlockKVCache, block: int) -> Tensor:
        """Rotary positions ``(Kc,)`` of the ring slots as seen from target ``block``."""
        Bf = self.geometry.block_frames
        offset = torch.arange(Bf, device=self.device) + 1
        base = torch.tensor([max(b, 0) for b in cache.slot_block], device=self.device) * Bf
        if self.rotary == "fixed":
            base = base - self._window_start(block)
        return (base[:, None] + offset[None, :]).reshape(-1)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(
        self, condition: Condition, batch: int, context: Tensor | None = None, generator: torch.Generator | None = None
    ) -> StreamState:
        state = self._new_state(condition, batch, context, generator)
        Ctx, Bf = self.geometry.context_blocks, self.geometry.block_frames
        state.cache = BlockKVCache.allocate(
            len(self.dit.layers), state.rows, self.heads, self.head_dim, Ctx, Bf,
            keep_raw=self.variant == "block_causal" and self.rotary == "fixed", dtype=self.dtype, device=self.device,
            aux=self.variant == "block_causal",
        )  # fmt: skip
        state.hooks = [self._step_hook(state, i) for i in range(len(self.dit.layers))]
        state.frames = torch.zeros(state.rows, 2 * self.channels + 1, Bf, dtype=self.dtype, device=self.device)
        if context is not None:
            for b in range(context.shape[-1] // Bf):
                block = context[..., b * Bf : (b + 1) * Bf].to(self.dtype)
                if self.variant == "block_causal":
                    self._encode_block(state, block, condition)
                self._push_context(state, block, condition.key)
                state.block += 1
        return state

    def _rotate_ring(self, cache: BlockKVCache, block: int) -> None:
        """Fixed mode: rotate the ring's un-rotated keys into target ``block``'s window positions
        (once per block, always from un-rotated storage, so nothing accumulates)."""
        assert cache.k_raw is not None
        freqs = self.dit.freqs(self._slot_positions(cache, block))
        cache.k[:, :, :, cache.ring] = apply_rotary(cache.k_raw, freqs)  # (Ly, R, H, Kc, Dh)

    def _step_hook(self, state: StreamState, layer: int) -> KVHook:
        def hook(p: Projected) -> tuple[Tensor, Tensor]:
            cache = state.cache
            assert cache is not None
            own = cache.own
            cache.k[layer][:, :, own].copy_(p.k)
            cache.v[layer][:, :, own].copy_(p.v)
            return cache.view(layer)

        return hook

    def _prepare(self, state: StreamState, condition: Condition) -> None:
        cache = state.cache
        assert cache is not None
        self._drop_unused_text(state, condition.key)
        state.text_kv = state.step_text_kv = self._text_rows(state, condition)
        state.global_cond = self._global(condition, state)
        if self.variant == "encdec":
            self._encode_context(state, condition)
        elif self.rotary == "fixed" and cache.k_raw is not None and self.geometry.context_blocks:
            self._rotate_ring(cache, state.block)
        state.merged = state.pending is not None
        if state.merged:
            self._plan_merged(state, condition)
        else:
            self._plan_step(state)

    def _plan_step(self, state: StreamState) -> None:
        """Mask, rotary table and hooks of an ordinary denoising step (keys: ``[ring | own]``)."""
        cache = state.cache
        assert cache is not None
        valid = cache.slot_valid(self.device)
        state.mask = additive_mask(torch.cat([valid, valid.new_ones(1 + self.geometry.block_frames)])[None, :], self.dtype)
        state.freqs = self.dit.freqs(self._own_positions(state.block))
        state.hooks = [self._step_hook(state, i) for i in range(len(self.dit.layers))]

    def _plan_merged(self, state: StreamState, condition: Condition) -> None:
        """The first step of block ``j`` also commits block ``j − 1``: queries ``[block j−1 | global | target]``
        over keys ``[aux | ring | own]``. Block ``j−1`` sees the ring (blocks ``j−1−Ctx … j−2``) and itself;
        the target sees the ring except block ``j−1−Ctx`` (out of its band), block ``j−1`` and its own tokens."""
        cache = state.cache
        assert cache is not None and state.pending is not None
        Ctx, Bf = self.geometry.context_blocks, self.geometry.block_frames
        j = state.block
        valid = cache.slot_valid(self.device)
        band = valid.clone()
        band[cache.raw_range((j - 1) % Ctx)] = False  # the slot of block j − 1 − Ctx, about to be evicted
        ones, zeros = valid.new_ones(Bf), valid.new_zeros(1 + Bf)
        committing = torch.cat([ones, valid, zeros])[None, :].expand(Bf, -1)
        target = torch.cat([ones, band, valid.new_ones(1 + Bf)])[None, :].expand(1 + Bf, -1)
        state.mask = additive_mask(torch.cat([committing, target]), self.dtype)
        own = self._own_positions(j)
        first = (Ctx - 1) * Bf + 1 if self.rotary == "fixed" else (j - 1) * Bf + 1  # block j−1: the newest context slot
        pending_positions = torch.arange(Bf, device=self.device) + first
        state.freqs = self.dit.freqs(torch.cat([pending_positions, own]))
        state.text_mask = None
        if state.text_kv is not None and state.pending_key != condition.key:
            pending_text = state.text.get(state.pending_key)
            assert pending_text is not None, f"prompt {state.pending_key!r} of the committing block is no longer cached"
            state.text_kv = [
                (torch.cat([a[0], b[0]], dim=2), torch.cat([a[1], b[1]], dim=2)) for a, b in zip(state.text_kv, pending_text, strict=True)
            ]
            L = pending_text[0][0].shape[2]
            group = torch.cat([torch.ones(Bf, dtype=torch.long), torch.zeros(1 + Bf, dtype=torch.long)]).to(self.device)
            state.text_mask = text_group_mask(group, L, 2)
        state.hooks = [self._merged_hook(state, i) for i in range(len(self.dit.layers))]

    def _merged_hook(self, state: StreamState, layer: int) -> KVHook:
        def hook(p: Projected) -> tuple[Tensor, Tensor]:
            cache = state.cache
            assert cache is not None
            Bf = self.geometry.block_frames
            k, v = cache.k[layer], cache.v[layer]
            k[:, :, cache.aux].copy_(p.k[:, :, :Bf])
            v[:, :, cache.aux].copy_(p.v[:, :, :Bf])
            k[:, :, cache.own].copy_(p.k[:, :, Bf:])
            v[:, :, cache.own].copy_(p.v[:, :, Bf:])
            if cache.k_raw is not None:  # its un-rotated keys go straight to its ring slot (not read in this pass)
                cache.k_raw[layer][:, :, cache.raw_range((state.block - 1) % self.geometry.context_blocks)].copy_(p.k_raw[:, :, :Bf])
            return k, v

        return hook

    def _finish_commit(self, state: StreamState) -> None:
        """After the merged pass: the committed block's keys/values move from ``aux`` into its ring slot
        (evicting the oldest block), and the following steps use the ordinary plan."""
        cache = state.cache
        assert cache is not None
        slot = (state.block - 1) % self.geometry.context_blocks
        ring = cache.slot_range(slot)
        cache.k[:, :, :, ring] = cache.k[:, :, :, cache.aux]
        cache.v[:, :, :, ring] = cache.v[:, :, :, cache.aux]
        cache.slot_block[slot] = state.block - 1
        state.pending, state.merged = None, False
        state.text_kv, state.text_mask = state.step_text_kv, None
        self._plan_step(state)

    def denoise_step(self, state: StreamState, x_t: Tensor, t: Tensor) -> Tensor:
        """The model output ``(B, C, Bf)`` for the target at ``t`` ``(B,)``: only global + target tokens run."""
        frames = state.frames
        assert frames is not None and state.freqs is not None
        for branch in range(state.rows // state.batch):  # [x_t, 0, 0] in a preallocated input buffer
            frames[branch * state.batch : (branch + 1) * state.batch, : self.channels].copy_(x_t)
        g = self.dit.global_tokens(self._rows(t, state), state.global_cond)
        if not state.merged:
            h = torch.cat([g, self.dit.embed_frames(frames)], dim=1)
            h = self.dit.run_layers(h, state.freqs, state.mask, state.text_kv, None, state.hooks)
            return self._combine(self.dit.unembed_frames(h[:, 1:]), state)
        # Merged pass: [block j−1 (clean) | global | target] — the commit rides along with the first step.
        assert state.pending is not None
        Bf = self.geometry.block_frames
        emb = self.dit.embed_frames(torch.cat([state.pending, frames], dim=-1))
        h = torch.cat([emb[:, :Bf], g, emb[:, Bf:]], dim=1)
        h = self.dit.run_layers(h, state.freqs, state.mask, state.text_kv, state.text_mask, state.hooks)
        out = self.dit.unembed_frames(h[:, Bf + 1 :])
        self._finish_commit(state)
        return self._combine(out, state)

    def _commit(self, state: StreamState, block: Tensor, condition: Condition) -> None:
        """``block_causal``: the block is encoded by the next block's first denoising step (merged pass);
        ``encdec`` re-encodes the whole context at the next block anyway."""
        if self.variant == "block_causal" and self.geometry.context_blocks:
            state.pending, state.pending_key = context_inputs(self._rows(block, state)), condition.key
        self._push_context(state, block, condition.key)

    # ---- context encoding ---------------------------------------------------------------------

    def _encode_block(self, state: StreamState, block: Tensor, condition: Condition) -> None:
        """``block_causal``: run the clean block through every layer (banded: it sees the ring and itself)
        and write its keys/values into the ring slot of the oldest block."""
        cache = state.cache
        assert cache is not None
        Ctx, Bf = self.geometry.context_blocks, self.geometry.block_frames
        if Ctx == 0:
            return
        j = state.block
        slot = j % Ctx
        positions = self._own_positions(j)[1:]
        own = cache.own
        mine = slice(own.start + 1, None)  # the target positions of the own region (global slot unused)
        valid = cache.slot_valid(self.device)  # blocks j − Ctx … j − 1: all inside block j's band
        mask = torch.cat([valid, valid.new_zeros(1), valid.new_ones(Bf)])[None, :]
        raw = cache.k_raw

        def hook_for(layer: int) -> KVHook:
            def hook(p: Projected) -> tuple[Tensor, Tensor]:
                k, v = cache.k[layer], cache.v[layer]
                k[:, :, mine].copy_(p.k)
                v[:, :, mine].copy_(p.v)
                if raw is not None:
                    raw[layer][:, :, cache.raw_range(slot)].copy_(p.k_raw)
                return cache.view(layer)

            return hook

        if self.rotary == "fixed" and raw is not None and state.freqs is None:  # a starting context: no block prepared yet
            self._rotate_ring(cache, j)
        text_kv = self._text_rows(state, condition)
        h = self.dit.embed_frames(context_inputs(self._rows(block, state)))
        self.dit.run_layers(h, self.dit.freqs(positions), mask, text_kv, None, [hook_for(i) for i in range(len(self.dit.layers))])
        rng = cache.slot_range(slot)
        cache.v[:, :, :, rng] = cache.v[:, :, :, mine]
        if raw is None:  # growing: keys were rotated at their stream positions on entry
            cache.k[:, :, :, rng] = cache.k[:, :, :, mine]
        cache.slot_block[slot] = j

    def _encode_context(self, state: StreamState, condition: Condition) -> None:
        """``encdec``: encode the whole context window bidirectionally (once per block) into the cache."""
        cache = state.cache
        assert cache is not None
        Ctx, Bf, Kc = self.geometry.context_blocks, self.geometry.block_frames, self.geometry.context_frames
        if Ctx == 0:
            return
        j = state.block
        cache.slot_block = [j - Ctx + s if state.slot_key[s] is not None else -1 for s in range(Ctx)]
        valid = cache.slot_valid(self.device)
        mask = valid[None, :] | torch.eye(Kc, dtype=torch.bool, device=self.device)
        keys = [k if k is not None else condition.key for k in state.slot_key]
        text_kv, text_mask = self._text_rows(state, condition), None
        if text_kv is not None and any(k != condition.key for k in keys):
            prompts = [*dict.fromkeys(keys)]
            for k in prompts:
                assert k in state.text, f"prompt {k!r} of a context block is no longer cached"
            per = [state.text[k] for k in prompts]
            text_kv = [
                (torch.cat([p[i][0] for p in per], dim=2), torch.cat([p[i][1] for p in per], dim=2)) for i in range(len(self.dit.layers))
            ]
            group = torch.tensor([prompts.index(k) for k in keys for _ in range(Bf)], device=self.device)
            text_mask = text_group_mask(group, per[0][0][0].shape[2], len(prompts))

        def hook_for(layer: int) -> KVHook:
            def hook(p: Projected) -> tuple[Tensor, Tensor]:
                cache.k[layer][:, :, cache.ring].copy_(p.k)
                cache.v[layer][:, :, cache.ring].copy_(p.v)
                return p.k, p.v

            return hook

        h = self.dit.embed_frames(context_inputs(self._rows(state.context, state)))
        self.dit.run_layers(
            h, self.dit.freqs(self._slot_positions(cache, j)), mask, text_kv, text_mask, [hook_for(i) for i in range(len(self.dit.layers))]
        )
