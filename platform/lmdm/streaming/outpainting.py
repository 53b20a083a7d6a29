"""The outpainting baseline: the whole window (context + target) is denoised at every step under the
``full`` mask, so the context is re-encoded ``steps`` times per block: cost ∝ ``steps × f(context + block)``.

Legend: R rows, C latent channels, Bf block frames, Kc context frames.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmdm.models.block_mask import additive_mask, text_group_mask
from lmdm.models.dit import TextKV
from lmdm.streaming.base import Condition, StreamState, _Base, concat_text
from lmdm.streaming.sequences import context_inputs

__all__ = ["OutpaintingEngine"]


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
        text_kv = concat_text(per)
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
        # The last layer computes the target's outputs only: the global and context tokens' outputs feed no
        # later layer (as the LMDM passes skip theirs).
        h = self.dit.run_layers(h, state.freqs, state.mask, state.text_kv, state.text_mask, outputs_from=1 + self.geometry.context_frames)
        return self._combine(self.dit.unembed_frames(h), state)

    def _commit(self, state: StreamState, block: Tensor, condition: Condition) -> None:
        self._push_context(state, block, condition.key)
