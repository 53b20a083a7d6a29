"""The outpainting baseline: the whole window (context + target) is denoised at every step under the
``full`` mask, so the context is re-encoded ``steps`` times per block: cost ∝ ``steps × f(context + block)``.

Legend: B batch, R rows, C latent channels, Bf block frames, Ctx context blocks, Kc context frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmdm.models.block_mask import CLEAN, GLOBAL, NOISY, TokenLayout, attention_mask
from lmdm.models.dit import DiT, TextKV
from lmdm.runtime import Runtime
from lmdm.streaming.common import (
    Condition,
    ContextWindow,
    EngineCore,
    Progress,
    PromptCache,
    Sampling,
    attention_bias,
    sample_block,
)
from lmdm.streaming.sequences import BlockGeometry, context_inputs

__all__ = ["OutpaintingEngine", "OutpaintingState", "WindowPlan"]


@dataclass
class WindowPlan:
    """One block's window pass, reused by every denoising step."""

    key: str  # the prompt the block is generated under
    freqs: Tensor  # rotary table of [global, context, target]
    mask: Tensor | None  # (S, S) additive; None = every key
    text_kv: TextKV | None
    text_mask: Tensor | None  # (S, P·L): per-slot prompts
    global_cond: Tensor | None  # (R, global_cond_dim)
    frames_ctx: Tensor  # (R, 2C+1, Kc) context-frame inputs


@dataclass
class OutpaintingState:
    """One outpainting stream."""

    progress: Progress
    window: ContextWindow
    prompts: PromptCache
    plan: WindowPlan | None = None  # set by begin_block, cleared by end_block


class OutpaintingEngine:
    """The baseline: the whole window (context + target) is denoised at every step (``full`` mask).

    Args:
        dit: a DiT with context input channels (``input_concat_dim = io_channels + 1``).
        runtime: how its layers run (:mod:`lmdm.runtime`; default ``eager``).
    """

    def __init__(self, dit: DiT, geometry: BlockGeometry, sampling: Sampling, runtime: Runtime | None = None) -> None:
        self.core = EngineCore(dit, geometry, sampling, runtime)
        self.geometry = geometry

    def start(
        self, condition: Condition, batch: int, context: Tensor | None = None, generator: torch.Generator | None = None
    ) -> OutpaintingState:
        c, g = self.core, self.geometry
        blocks = c.check_context(context, batch)
        progress = c.progress(batch, generator)
        state = OutpaintingState(
            progress,
            ContextWindow.empty(batch, c.channels, g.block_frames, g.context_blocks, c.dtype, c.device),
            PromptCache(c.dit, batch, progress.rows, c.dtype),
        )
        for block in blocks:
            state.window.push(block, condition.key)
            progress.block += 1
        return state

    def progress(self, state: OutpaintingState) -> Progress:
        return state.progress

    def begin_block(self, state: OutpaintingState, condition: Condition) -> None:
        c, Bf, Ctx = self.core, self.geometry.block_frames, self.geometry.context_blocks
        state.prompts.keep_only({k for k in state.window.keys if k is not None} | {condition.key})
        if torch.is_grad_enabled():
            state.prompts.refresh()
        j = state.progress.block
        slots = torch.arange(Ctx, device=c.device).repeat_interleave(Bf)
        layout = TokenLayout.runs(
            [(GLOBAL, j, True, 1), (CLEAN, slots + j - Ctx, state.window.valid().repeat_interleave(Bf), Ctx * Bf), (NOISY, j, True, Bf)],
            c.device,
        )
        text_kv, text_mask = self._window_text(state, condition)
        state.plan = WindowPlan(
            key=condition.key,
            freqs=c.dit.freqs(torch.arange(Ctx * Bf + Bf + 1, device=c.device)),
            mask=attention_bias(attention_mask(layout, layout, "full", Ctx), c.dtype),
            text_kv=text_kv,
            text_mask=text_mask,
            global_cond=c.global_rows(condition, state.progress),
            frames_ctx=context_inputs(c.rows(state.window.latents, state.progress)),
        )

    def _window_text(self, state: OutpaintingState, condition: Condition) -> tuple[TextKV | None, Tensor | None]:
        """Text K/V for [global, context slots, target]: one prompt, or per-slot prompts with a group mask."""
        state.prompts.get(condition)
        keys = [k if k is not None else condition.key for k in state.window.keys]
        Bf = self.geometry.block_frames
        return state.prompts.grouped([condition.key, *(k for k in keys for _ in range(Bf)), *[condition.key] * Bf])

    def denoise_step(self, state: OutpaintingState, x_t: Tensor, t: Tensor) -> Tensor:
        """The model output ``(B, C, Bf)`` for the target at ``t`` ``(B,)``, re-encoding the whole window."""
        c, plan = self.core, state.plan
        if plan is None:
            raise RuntimeError("denoise_step before begin_block: call engine.begin_block(state, condition) first")
        frames_ctx = plan.frames_ctx
        x_rows = c.rows(x_t, state.progress)
        target = torch.cat([x_rows, x_rows.new_zeros(x_rows.shape[0], c.channels + 1, x_rows.shape[-1])], dim=1)
        g = c.dit.global_tokens(c.rows(t, state.progress), plan.global_cond)
        h = torch.cat([g, c.dit.embed_frames(torch.cat([frames_ctx, target], dim=-1))], dim=1)
        # The last layer computes the target's outputs only: the global and context tokens' outputs feed no
        # later layer (as the LMDM passes skip theirs).
        h = c.run_layers(h, plan.freqs, plan.mask, plan.text_kv, plan.text_mask, None, 1 + self.geometry.context_frames)
        return c.combine(c.dit.unembed_frames(h), state.progress)

    def end_block(self, state: OutpaintingState, block: Tensor) -> None:
        if state.plan is None:
            raise RuntimeError("end_block before begin_block")
        state.window.push(block, state.plan.key)
        state.plan = None
        state.progress.block += 1

    def step(self, state: OutpaintingState, condition: Condition, exit_step: int | None = None) -> Tensor:
        """Generate the next block ``(B, C, Bf)`` and commit it as context."""
        return sample_block(self, self.core, state, condition, exit_step)
