"""The engine interface and what every engine shares: conditions, sampling settings, stream state,
text caching per prompt, classifier-free guidance rows and the sampler loop.

``state = engine.start(condition, batch, context=None)`` then ``block = engine.step(state, condition)``
per block. ``step`` runs the sampler over ``denoise_step`` (the public per-denoising-step function)
and commits the finished block as context. Classifier-free guidance runs both branches as one batch
(rows ``[cond; uncond]``), each branch with its own context cache. The engines themselves live in
:mod:`lmdm.streaming.outpainting` and :mod:`lmdm.streaming.lmdm_engine`; :mod:`lmdm.streaming.engines`
gathers them.

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
from lmdm.models.attention import KVHook
from lmdm.models.dit import DiT, TextKV
from lmdm.models.kv_cache import BlockKVCache
from lmdm.streaming.sequences import BlockGeometry

__all__ = ["Condition", "Engine", "RotaryMode", "Sampling", "StreamState", "concat_text"]

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


def concat_text(prompts: list[TextKV]) -> TextKV:
    """Per-layer text K/V of several prompts concatenated along the text axis (select with a group mask)."""
    return [(torch.cat([p[i][0] for p in prompts], dim=2), torch.cat([p[i][1] for p in prompts], dim=2)) for i in range(len(prompts[0]))]


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
