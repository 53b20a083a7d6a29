"""The LMDM engine: context keys/values cached per block; each denoising step runs only the global
token and the target block (see :mod:`lmdm.streaming.common` for the shared interface).

``encdec`` re-encodes the context bidirectionally once per block. ``block_causal`` encodes each block
once, ever: the block generated last is committed into the FIFO ring by the *next* block's first
denoising step (one merged pass of ``[block j−1 | global | target j]``, so the commit costs no extra
pass of small matmuls, and its last layer computes only block j−1's keys/values); a starting context is
committed block by block in its own passes.

Every pass's attention mask comes from :func:`~lmdm.models.block_mask.attention_mask` over token layouts
of its queries and of the cache region it reads (the band is defined once), and every pass's cache
reads and writes are a :class:`~lmdm.models.kv_cache.CacheIO` of tensors, so a compiled pass is reused
from block to block.

Legend: B batch, R rows (B × branches), C latent channels, Bf block frames, Ctx context blocks,
Kc = Ctx·Bf context frames, Ly layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lmdm.models.block_mask import CLEAN, GLOBAL, NOISY, TokenLayout, attention_mask
from lmdm.models.dit import DiT, TextKV
from lmdm.models.kv_cache import BlockKVCache, CacheIO, CachePool
from lmdm.models.rotary import apply_rotary
from lmdm.runtime import Runtime
from lmdm.streaming.common import (
    Condition,
    ContextWindow,
    EngineCore,
    Progress,
    PromptCache,
    RotaryMode,
    Sampling,
    attention_bias,
    sample_block,
)
from lmdm.streaming.sequences import BlockGeometry, context_inputs, target_inputs

__all__ = ["LMDMEngine", "LMDMState", "StepPlan"]


@dataclass
class StepPlan:
    """One kind of pass of the current block, reused by every denoising step of that kind."""

    freqs: Tensor  # rotary table of the pass's tokens
    mask: Tensor | None  # additive, (queries, attended cache positions); None = every key
    io: CacheIO  # where the pass writes keys/values and what it attends over
    text_kv: TextKV | None
    text_mask: Tensor | None
    outputs_from: int  # tokens before this index give keys/values only


@dataclass
class Pending:
    """``block_causal``: the block generated last, committed by the next block's first (merged) pass."""

    inputs: Tensor  # (R, 2C+1, Bf) context-frame inputs
    key: str  # the prompt it was generated under


@dataclass
class LMDMState:
    """One LMDM stream: progress, logical context, prompts, the block-wise KV cache and the block's plans."""

    progress: Progress
    window: ContextWindow
    prompts: PromptCache
    cache: BlockKVCache
    frames: Tensor  # (R, 2C+1, Bf) target-frame input buffer, [x_t, 0, 0]
    pending: Pending | None = None
    key: str = ""  # the prompt of the block being generated
    text_kv: TextKV | None = None  # its text keys/values, rows [cond; uncond]
    global_cond: Tensor | None = None  # (R, global_cond_dim)
    step_plan: StepPlan | None = None  # ordinary steps: [global | target] over [ring | own]
    merged_plan: StepPlan | None = None  # the block's first step while a block is pending


class LMDMEngine:
    """An LMDM: context K/V cached per block; each denoising step runs the global token + target only.

    Args:
        dit: a DiT with context input channels (``input_concat_dim = io_channels + 1``).
        variant: ``encdec`` (context re-encoded bidirectionally once per block) or ``block_causal``
            (each block encoded once, banded, into a FIFO ring).
        rotary: ``fixed`` window positions (cached keys re-rotated once per block from un-rotated
            storage) or ``growing`` stream positions (keys rotated once on entry). Identical outputs.
        runtime: how the model's layers run (:mod:`lmdm.runtime`; default ``eager``).

    Raises:
        ValueError: an unknown variant or rotary mode, or a model without context inputs.
    """

    def __init__(
        self,
        dit: DiT,
        variant: Literal["encdec", "block_causal"],
        geometry: BlockGeometry,
        sampling: Sampling,
        rotary: RotaryMode = "fixed",
        runtime: Runtime | None = None,
    ) -> None:
        if variant not in ("encdec", "block_causal"):
            raise ValueError(f"LMDM variant must be 'encdec' or 'block_causal', got {variant!r}")
        if rotary not in ("fixed", "growing"):
            raise ValueError(f"rotary mode must be 'fixed' or 'growing', got {rotary!r}")
        self.core = EngineCore(dit, geometry, sampling, runtime)
        self.geometry = geometry
        self.variant, self.rotary = variant, rotary
        first = dit.layers[0].self_attn
        self.heads, self.head_dim = first.heads, dit.args.width // first.heads

    # ---- positions and layouts ----------------------------------------------------------------

    def _window_start(self, block: int) -> int:
        """Stream frame index at which the window of target ``block`` starts (growing mode)."""
        return (block - self.geometry.context_blocks) * self.geometry.block_frames

    def _own_positions(self, block: int) -> Tensor:
        """Rotary positions of [global, target frames] for target ``block``."""
        Bf, Kc, device = self.geometry.block_frames, self.geometry.context_frames, self.core.device
        base = 0 if self.rotary == "fixed" else self._window_start(block)
        return base + torch.cat([torch.zeros(1, device=device), torch.arange(Bf, device=device) + Kc + 1]).long()

    def _slot_positions(self, cache: BlockKVCache, block: int) -> Tensor:
        """Rotary positions ``(Kc,)`` of the ring slots as seen from target ``block``."""
        Bf, device = self.geometry.block_frames, self.core.device
        offset = torch.arange(Bf, device=device) + 1
        base = torch.tensor([max(b, 0) for b in cache.slot_block], device=device) * Bf
        if self.rotary == "fixed":
            base = base - self._window_start(block)
        return (base[:, None] + offset[None, :]).reshape(-1)

    def _layout(self, runs: list[tuple[int, Tensor | int, Tensor | bool, int]]) -> TokenLayout:
        return TokenLayout.runs(runs, self.core.device)

    def _ring_layout(self, cache: BlockKVCache) -> tuple[int, Tensor, Tensor, int]:
        blocks = cache.slot_blocks(self.core.device)
        return (CLEAN, blocks, blocks >= 0, self.geometry.context_frames)

    def _mask(self, queries: TokenLayout, keys: TokenLayout, rows: Tensor | None = None) -> Tensor | None:
        """The pass's additive mask ``(S, K)``; with ``rows`` (``(R, K)`` bool, the keys each row holds) one per
        row, ``(R, 1, S, K)``."""
        allowed = attention_mask(queries, keys, self.variant, self.geometry.context_blocks, same_tokens=False)
        if rows is not None:
            allowed = allowed[None, None] & rows[:, None, None, :]
        return attention_bias(allowed, self.core.dtype)

    def _row_keys(self, cache: BlockKVCache, before: int, after: int) -> Tensor | None:
        """``(R, before + Kc + after)`` bool: the ring positions each row holds (rows of sessions stepped as one
        batch may differ), the keys around the ring held by all; ``None`` where the rows do not differ."""
        if cache.row_slots is None:
            return None
        rows, device = cache.row_slots.shape[0], cache.row_slots.device
        ring = cache.row_slots.repeat_interleave(self.geometry.block_frames, dim=1)
        return torch.cat([ring.new_ones(rows, before), ring, ring.new_ones(rows, after)], dim=1).to(device)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(
        self,
        condition: Condition,
        batch: int,
        context: Tensor | None = None,
        generator: torch.Generator | None = None,
        cache: BlockKVCache | None = None,
    ) -> LMDMState:
        """A new stream (see :class:`~lmdm.streaming.common.Engine`); ``cache``: an empty cache to use (a server's
        pooled row, :meth:`cache_pool`) instead of a new one.

        Raises:
            ValueError: a context that does not fit, or a cache of another shape.
        """
        c, g = self.core, self.geometry
        blocks = c.check_context(context, batch)
        progress = c.progress(batch, generator)
        if cache is None:
            cache = self._empty_cache(progress.rows, c.device)
        else:
            want = self._empty_cache(progress.rows, torch.device("meta"))
            if cache.k.shape != want.k.shape or (cache.k_raw is None) != (want.k_raw is None):
                raise ValueError(
                    f"a cache of keys {tuple(cache.k.shape)} for this engine's {tuple(want.k.shape)} ({self.variant}, {self.rotary} rotary)"
                )
        state = LMDMState(
            progress=progress,
            window=ContextWindow.empty(batch, c.channels, g.block_frames, g.context_blocks, c.dtype, c.device),
            prompts=PromptCache(c.dit, batch, progress.rows, c.dtype),
            cache=cache,
            frames=torch.zeros(progress.rows, 2 * c.channels + 1, g.block_frames, dtype=c.dtype, device=c.device),
        )
        for block in blocks:
            if self.variant == "block_causal":
                self._encode_block(state, context_inputs(c.rows(block, progress)), state.prompts.get(condition), progress.block)
            state.window.push(block, condition.key)
            progress.block += 1
        return state

    def _empty_cache(self, rows: int, device: torch.device) -> BlockKVCache:
        """A zeroed cache for ``rows`` rows: ``aux`` and un-rotated keys for ``block_causal`` (fixed rotary)."""
        c, g = self.core, self.geometry
        return BlockKVCache.allocate(
            len(c.dit.layers), rows, self.heads, self.head_dim, g.context_blocks, g.block_frames,
            keep_raw=self.variant == "block_causal" and self.rotary == "fixed", dtype=c.dtype, device=device,
            aux=self.variant == "block_causal",
        )  # fmt: skip

    def cache_pool(self, sessions: int, batch: int = 1) -> CachePool:
        """Cache rows for ``sessions`` streams of ``batch`` rows each, allocated once (a server's sessions take and
        give back rows; :meth:`start` with ``cache=``)."""
        rows = self.core.progress(batch, None).rows
        return CachePool(sessions, self._empty_cache(rows, torch.device("meta")), self.core.device)

    def progress(self, state: LMDMState) -> Progress:
        return state.progress

    def renumber(self, state: LMDMState, block: int) -> None:
        """Count the stream's blocks so that the next one is ``block`` (between blocks). In ``fixed`` rotary mode
        every position is relative to the window, so the stream continues exactly as before: the ring's slots
        follow the new numbers. Sessions stepped as one batch are renumbered to one count.

        Raises:
            ValueError: ``growing`` rotary (positions are the stream's own), mid-block, or a count so low that
                context blocks would get negative numbers.
        """
        shift = block - state.progress.block
        if not shift:
            return
        if self.rotary != "fixed":
            raise ValueError("only a fixed-rotary stream can be renumbered (growing rotary positions are the stream's own)")
        if state.step_plan is not None or state.merged_plan is not None:
            raise ValueError("renumber a stream between blocks (after end_block, before begin_block)")
        held = [b + shift for b in state.cache.slot_block if b >= 0] + ([block - 1] if state.pending is not None else [])
        if held and min(held) < 0:
            raise ValueError(f"renumber to block {block}: its context blocks would get negative numbers (-1 means an empty slot)")
        if self.variant == "block_causal":
            state.cache.roll(shift)
        state.progress.block = block

    def begin_block(self, state: LMDMState, condition: Condition) -> None:
        """Plan block ``j`` under ``condition``: ``encdec`` encodes the context; ``block_causal`` re-rotates
        the ring (fixed rotary) and, if block ``j − 1`` is pending, plans the merged first pass."""
        c, cache = self.core, state.cache
        keep = {k for k in state.window.keys if k is not None} | {condition.key}
        if state.pending is not None:
            keep.add(state.pending.key)
        state.prompts.keep_only(keep)
        if torch.is_grad_enabled():
            state.prompts.refresh()
        state.key = condition.key
        state.global_cond = c.global_rows(condition, state.progress)
        state.text_kv = state.prompts.get(condition)
        if self.variant == "encdec":
            self._encode_context(state, condition)
        elif self.rotary == "fixed" and cache.k_raw is not None and self.geometry.context_blocks:
            self._rotate_ring(cache, state.progress.block)
        if state.pending is not None:  # the ordinary plan follows the commit (a ring slot changes)
            state.merged_plan, state.step_plan = self._plan_merged(state, condition), None
        else:
            state.merged_plan, state.step_plan = None, self._plan_step(state)

    def _plan_step(self, state: LMDMState) -> StepPlan:
        """An ordinary denoising step: queries ``[global | target]`` over keys ``[ring | own]``."""
        cache, Bf, j = state.cache, self.geometry.block_frames, state.progress.block
        own = self._layout([(GLOBAL, j, True, 1), (NOISY, j, True, Bf)])
        keys = self._layout([self._ring_layout(cache), (GLOBAL, j, True, 1), (NOISY, j, True, Bf)])
        return StepPlan(
            freqs=self.core.dit.freqs(self._own_positions(j)),
            mask=self._mask(own, keys, self._row_keys(cache, 0, 1 + Bf)),
            io=cache.io(write=cache.own, read=slice(cache.ring.start, None)),
            text_kv=state.text_kv,
            text_mask=None,
            outputs_from=1,  # not the global token's outputs
        )

    def _plan_merged(self, state: LMDMState, condition: Condition) -> StepPlan:
        """The first step of block ``j`` also commits block ``j − 1``: queries ``[block j−1 | global | target]``
        over keys ``[aux | ring | own]``; the band decides who sees which ring slot."""
        cache, pending = state.cache, state.pending
        assert pending is not None
        Ctx, Bf, j, device = self.geometry.context_blocks, self.geometry.block_frames, state.progress.block, self.core.device
        queries = self._layout([(CLEAN, j - 1, True, Bf), (GLOBAL, j, True, 1), (NOISY, j, True, Bf)])
        keys = self._layout([(CLEAN, j - 1, True, Bf), self._ring_layout(cache), (GLOBAL, j, True, 1), (NOISY, j, True, Bf)])
        first = (Ctx - 1) * Bf + 1 if self.rotary == "fixed" else (j - 1) * Bf + 1  # block j−1: the newest context slot
        pending_positions = torch.arange(Bf, device=device) + first
        # the committed block cross-attends to its own prompt, the global token and target to the current one
        text_kv, text_mask = state.prompts.grouped([pending.key] * Bf + [condition.key] * (1 + Bf))
        raw_slot = torch.tensor((j - 1) % Ctx, device=device)  # its un-rotated keys go straight to its ring slot
        return StepPlan(
            freqs=self.core.dit.freqs(torch.cat([pending_positions, self._own_positions(j)])),
            mask=self._mask(queries, keys, self._row_keys(cache, Bf, 1 + Bf)),
            io=cache.io(write=[cache.aux, cache.own], read=slice(0, None), raw_slot=raw_slot),
            text_kv=text_kv,
            text_mask=text_mask,
            outputs_from=Bf + 1,  # neither the committed block's outputs nor the global token's
        )

    def denoise_step(self, state: LMDMState, x_t: Tensor, t: Tensor) -> Tensor:
        """The model output ``(B, C, Bf)`` for the target at ``t`` ``(B,)``: only global + target tokens run
        (and, in a block's first step, the pending block's commit)."""
        c = self.core
        if state.step_plan is None and state.merged_plan is None:
            raise RuntimeError("denoise_step before begin_block: call engine.begin_block(state, condition) first")
        rows = c.rows(x_t, state.progress)
        if torch.is_grad_enabled():  # autograd saves the inputs: a fresh tensor, never the reused buffer
            frames = target_inputs(rows)
        else:
            frames = state.frames
            frames[:, : c.channels].copy_(rows)  # [x_t, 0, 0] in a preallocated input buffer
        g = c.dit.global_tokens(c.rows(t, state.progress), state.global_cond)
        plan = state.merged_plan or state.step_plan
        assert plan is not None
        if state.merged_plan is None:
            h = torch.cat([g, c.dit.embed_frames(frames)], dim=1)
        else:  # [block j−1 (clean) | global | target]: the commit rides along with the first step
            assert state.pending is not None
            Bf = self.geometry.block_frames
            emb = c.dit.embed_frames(torch.cat([state.pending.inputs, frames], dim=-1))
            h = torch.cat([emb[:, :Bf], g, emb[:, Bf:]], dim=1)
        h = c.run_layers(h, plan.freqs, plan.mask, plan.text_kv, plan.text_mask, plan.io, plan.outputs_from)
        if state.merged_plan is not None:
            self._finish_commit(state)
        return c.combine(c.dit.unembed_frames(h), state.progress)

    def _finish_commit(self, state: LMDMState) -> None:
        """After the merged pass: the committed block's keys/values move from ``aux`` into its ring slot
        (evicting the oldest block); the following steps use the ordinary plan (re-planned: a slot changed)."""
        cache = state.cache
        slot = (state.progress.block - 1) % self.geometry.context_blocks
        ring = cache.slot_range(slot)
        cache.k[:, :, :, ring] = cache.k[:, :, :, cache.aux]
        cache.v[:, :, :, ring] = cache.v[:, :, :, cache.aux]
        cache.fill_slot(slot, state.progress.block - 1)
        state.pending, state.merged_plan = None, None
        state.step_plan = self._plan_step(state)

    def end_block(self, state: LMDMState, block: Tensor) -> None:
        """``block_causal``: the block becomes pending, encoded by the next block's first denoising step
        (merged pass); ``encdec`` re-encodes the whole context at the next block anyway."""
        if state.step_plan is None and state.merged_plan is None:
            raise RuntimeError("end_block before begin_block")
        if state.pending is not None:  # the block's first step never ran (a block made elsewhere): commit j − 1 alone
            self._encode_block(state, state.pending.inputs, state.prompts.lookup(state.pending.key), state.progress.block - 1)
        if self.variant == "block_causal" and self.geometry.context_blocks:
            state.pending = Pending(context_inputs(self.core.rows(block.detach(), state.progress)), state.key)
        state.window.push(block, state.key)
        state.step_plan = state.merged_plan = None
        state.progress.block += 1

    def step(self, state: LMDMState, condition: Condition, exit_step: int | None = None) -> Tensor:
        """Generate the next block ``(B, C, Bf)`` and commit it as context."""
        return sample_block(self, self.core, state, condition, exit_step)

    # ---- sessions stepped as one batch ----------------------------------------------------------

    def stack(self, states: list[LMDMState]) -> LMDMState:
        """Several sessions as one state, stepped as one batch (:func:`lmdm.streaming.batching.stack`)."""
        from lmdm.streaming.batching import stack

        return stack(self, states)

    def unstack(self, state: LMDMState, batches: list[int], into: list[BlockKVCache] | None = None) -> list[LMDMState]:
        """Split a stacked state into its sessions again, optionally into their own caches
        (:func:`lmdm.streaming.batching.unstack`)."""
        from lmdm.streaming.batching import unstack

        return unstack(self, state, batches, into)

    # ---- context encoding ---------------------------------------------------------------------

    def _rotate_ring(self, cache: BlockKVCache, block: int) -> None:
        """Fixed mode: rotate the ring's un-rotated keys into target ``block``'s window positions
        (once per block, always from un-rotated storage, so nothing accumulates)."""
        assert cache.k_raw is not None
        freqs = self.core.dit.freqs(self._slot_positions(cache, block))
        cache.k[:, :, :, cache.ring] = apply_rotary(cache.k_raw, freqs)  # (Ly, R, H, Kc, Dh)

    def _encode_block(self, state: LMDMState, inputs: Tensor, text_kv: TextKV | None, j: int) -> None:
        """``block_causal``, a block committed in its own pass (a starting context; a pending block whose
        merged pass never ran): run clean block ``j``'s context inputs ``(R, 2C+1, Bf)`` through every layer
        (banded: it sees the ring and itself) and write its keys/values into the ring slot of the oldest block."""
        c, cache = self.core, state.cache
        Ctx, Bf = self.geometry.context_blocks, self.geometry.block_frames
        if Ctx == 0:
            return
        slot = j % Ctx
        if cache.k_raw is not None:
            self._rotate_ring(cache, j)
        mine = slice(cache.own.start + 1, None)  # the target positions of the own region (global slot unused)
        queries = self._layout([(CLEAN, j, True, Bf)])
        keys = self._layout([self._ring_layout(cache), (GLOBAL, j, False, 1), (CLEAN, j, True, Bf)])
        io = cache.io(write=mine, read=slice(cache.ring.start, None), raw_slot=torch.tensor(slot, device=c.device))
        h = c.dit.embed_frames(inputs)
        mask = self._mask(queries, keys, self._row_keys(cache, 0, 1 + Bf))
        c.run_layers(h, c.dit.freqs(self._own_positions(j)[1:]), mask, text_kv, None, io, Bf)  # keys/values only
        rng = cache.slot_range(slot)
        cache.v[:, :, :, rng] = cache.v[:, :, :, mine]
        if cache.k_raw is None:  # growing: keys were rotated at their stream positions on entry
            cache.k[:, :, :, rng] = cache.k[:, :, :, mine]
        cache.fill_slot(slot, j)

    def _encode_context(self, state: LMDMState, condition: Condition) -> None:
        """``encdec``: encode the whole context window bidirectionally (once per block) into the cache."""
        c, cache = self.core, state.cache
        Ctx, Bf, Kc = self.geometry.context_blocks, self.geometry.block_frames, self.geometry.context_frames
        if Ctx == 0:
            return
        j = state.progress.block
        cache.slot_block = [j - Ctx + s if state.window.keys[s] is not None else -1 for s in range(Ctx)]
        layout = self._layout([self._ring_layout(cache)])
        mask = attention_bias(attention_mask(layout, layout, "encdec", Ctx), c.dtype)  # same tokens: an empty slot sees itself
        keys = [k if k is not None else condition.key for k in state.window.keys]  # each slot under its own prompt
        text_kv, text_mask = state.prompts.grouped([k for k in keys for _ in range(Bf)])
        io = cache.io(write=cache.ring, read=cache.ring)
        h = c.dit.embed_frames(context_inputs(c.rows(state.window.latents, state.progress)))
        c.run_layers(h, c.dit.freqs(self._slot_positions(cache, j)), mask, text_kv, text_mask, io, Kc)  # keys/values only
