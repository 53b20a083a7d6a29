"""The LMDM engine: context keys/values cached per block; each denoising step runs only the global
token and the target block (see :mod:`lmdm.streaming.engines` for the shared interface).

``encdec`` re-encodes the context bidirectionally once per block. ``block_causal`` encodes each block
once, ever: the block generated last is committed into the FIFO ring by the *next* block's first
denoising step (one merged pass of ``[block j−1 | global | target j]``, so the commit costs no extra
pass of small matmuls, and its last layer computes only block j−1's keys/values); a starting context is committed block by block in its own passes.

Legend: B batch, R rows (B × branches), C latent channels, Bf block frames, Ctx context blocks,
Kc = Ctx·Bf context frames, Ly layers.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lmdm.models.attention import KVHook, Projected
from lmdm.models.block_mask import additive_mask, text_group_mask
from lmdm.models.dit import DiT
from lmdm.models.kv_cache import BlockKVCache
from lmdm.models.rotary import apply_rotary
from lmdm.streaming.base import Condition, RotaryMode, Sampling, StreamState, _Base, concat_text
from lmdm.streaming.sequences import BlockGeometry, context_inputs

__all__ = ["LMDMEngine"]


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
        keys = torch.cat([valid, valid.new_ones(1 + self.geometry.block_frames)])
        # one row per query, materialised: SDPA over the cache view is slower with a broadcast (1, K) mask
        state.mask = additive_mask(keys[None, :].expand(1 + self.geometry.block_frames, -1), self.dtype)
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
            state.text_kv = concat_text([state.text_kv, pending_text])
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
            h = self.dit.run_layers(h, state.freqs, state.mask, state.text_kv, None, state.hooks, outputs_from=1)  # not the global token's
            return self._combine(self.dit.unembed_frames(h), state)
        # Merged pass: [block j−1 (clean) | global | target] — the commit rides along with the first step.
        assert state.pending is not None
        Bf = self.geometry.block_frames
        emb = self.dit.embed_frames(torch.cat([state.pending, frames], dim=-1))
        h = torch.cat([emb[:, :Bf], g, emb[:, Bf:]], dim=1)
        h = self.dit.run_layers(h, state.freqs, state.mask, state.text_kv, state.text_mask, state.hooks, outputs_from=Bf + 1)
        out = self.dit.unembed_frames(h)
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
        hooks = [hook_for(i) for i in range(len(self.dit.layers))]
        self.dit.run_layers(h, self.dit.freqs(positions), mask, text_kv, None, hooks, outputs_from=Bf)  # keys/values only
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
            text_kv = concat_text(per)
            group = torch.tensor([prompts.index(k) for k in keys for _ in range(Bf)], device=self.device)
            text_mask = text_group_mask(group, per[0][0][0].shape[2], len(prompts))

        def hook_for(layer: int) -> KVHook:
            def hook(p: Projected) -> tuple[Tensor, Tensor]:
                cache.k[layer][:, :, cache.ring].copy_(p.k)
                cache.v[layer][:, :, cache.ring].copy_(p.v)
                return p.k, p.v

            return hook

        h = self.dit.embed_frames(context_inputs(self._rows(state.context, state)))
        hooks = [hook_for(i) for i in range(len(self.dit.layers))]
        self.dit.run_layers(
            h, self.dit.freqs(self._slot_positions(cache, j)), mask, text_kv, text_mask, hooks, outputs_from=Kc
        )  # keys/values only
