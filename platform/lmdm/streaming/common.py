"""What every streaming engine shares: the engine interface, conditions, sampling settings, and the
parts an engine's state is composed of (progress, the logical context window, the per-prompt text cache).

The interface (:class:`Engine`)::

    state = engine.start(condition, batch, context=None, generator=None)
    engine.begin_block(state, condition)      # per block: plan masks, rotary, cache reads (keeps the condition)
    out = engine.denoise_step(state, x_t, t)  # per denoising step: the model output for the target
    engine.end_block(state, block)            # commit the finished block as context
    block = engine.step(state, condition)     # the three above, with the sampler in the middle

:func:`sample_block` is ``step`` for every engine: a sampler (pure function) over ``denoise_step``.
Classifier-free guidance runs both branches as one batch (rows ``[cond; uncond]``), each branch with its
own context cache. The engines live in :mod:`lmdm.streaming.outpainting`,
:mod:`lmdm.streaming.lmdm_engine` and (the LMM baseline: ``start``, ``step``, ``progress`` only, no
denoising steps) :mod:`lmdm.streaming.lmm_engine`, each with its own state type.

Legend: B batch, R rows (B × branches), C latent channels, Bf block frames, Ctx context blocks,
Kc = Ctx·Bf context frames, L text tokens, Dc text width.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import torch
from torch import Tensor

from lmdm.diffusion.noise import Generator, randn
from lmdm.diffusion.objectives import Objective, get_objective
from lmdm.diffusion.samplers import cfg_combine, sample
from lmdm.diffusion.schedule import timesteps
from lmdm.models.block_mask import additive_mask, text_group_mask
from lmdm.models.dit import DiT, TextKV
from lmdm.runtime import LayerRunner, Runtime, get_runtime
from lmdm.streaming.sequences import BlockGeometry

__all__ = [
    "KEY_SEP",
    "Condition",
    "ContextWindow",
    "DiffusionEngine",
    "Engine",
    "EngineCore",
    "Progress",
    "PromptCache",
    "RotaryMode",
    "Sampling",
    "attention_bias",
    "concat_text",
    "sample_block",
]

RotaryMode = Literal["fixed", "growing"]
KEY_SEP = "\x1f"  # joins the prompt keys of sessions stepped as one batch
StateT = TypeVar("StateT")


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


class Engine(Protocol[StateT]):
    """The interface every generation method implements (outpainting, the LMDM variants and the LMM baseline):
    what rollout, streams, eval and the benches drive."""

    def start(self, condition: Condition, batch: int, context: Tensor | None = None, generator: torch.Generator | None = None) -> StateT:
        """A new stream of ``batch`` rows; ``context`` ``(B, C, k·Bf)`` is real starting context (``None``: silence)."""
        ...

    def step(self, state: StateT, condition: Condition, exit_step: int | None = None) -> Tensor:
        """Generate and commit the next block ``(B, C, Bf)``."""
        ...

    def progress(self, state: StateT) -> Progress:
        """The stream's progress (batch, block index, noise generator)."""
        ...


class DiffusionEngine(Engine[StateT], Protocol[StateT]):
    """A diffusion engine's per-denoising-step interface (outpainting and the LMDM variants): ``step`` is
    :func:`sample_block` over these, and a scheduler may interleave and batch the steps of many sessions."""

    def begin_block(self, state: StateT, condition: Condition) -> None:
        """Plan the next block under ``condition`` (once per block, not per step)."""
        ...

    def denoise_step(self, state: StateT, x_t: Tensor, t: Tensor) -> Tensor:
        """The model output ``(B, C, Bf)`` for the noisy target ``x_t`` at times ``t`` ``(B,)``."""
        ...

    def end_block(self, state: StateT, block: Tensor) -> None:
        """Commit the finished block ``(B, C, Bf)`` as context."""
        ...


@dataclass
class Progress:
    """Where a stream is: rows, the next block's index, its noise source."""

    batch: int
    rows: int  # batch × CFG branches
    block: int  # index of the next block to generate
    generator: Generator  # one, or one per session of a stacked state

    @property
    def branches(self) -> int:
        """CFG branches (rows per batch row)."""
        return self.rows // self.batch


@dataclass
class ContextWindow:
    """The logical context: the last ``Ctx`` clean blocks, oldest first, and the prompt each was generated under.

    Attributes:
        latents: ``(B, C, Kc)`` clean context latents (zeros in empty slots).
        keys: per slot, the prompt key its block was committed under (``None``: empty slot).
    """

    latents: Tensor
    keys: list[str | None]

    @staticmethod
    def empty(batch: int, channels: int, block_frames: int, context_blocks: int, dtype: torch.dtype, device: torch.device) -> ContextWindow:
        return ContextWindow(
            torch.zeros(batch, channels, block_frames * context_blocks, dtype=dtype, device=device), [None] * context_blocks
        )

    def push(self, block: Tensor, key: str) -> None:
        """Shift the window by one block ``(B, C, Bf)`` (per block, not per step); the oldest leaves."""
        if not self.keys:
            return
        Bf = block.shape[-1]
        self.latents = torch.cat([self.latents[..., Bf:], block.detach()], dim=-1)
        self.keys = [*self.keys[1:], key]

    def valid(self) -> Tensor:
        """``(Ctx,)`` bool: which slots hold a block."""
        return torch.tensor([k is not None for k in self.keys], dtype=torch.bool, device=self.latents.device)


class TextModel(Protocol):
    """What :class:`PromptCache` needs of a model: per-layer text keys/values (a DiT or an LMM)."""

    def text_kv(self, text: Tensor) -> TextKV: ...


class PromptCache:
    """Per-layer text keys/values per prompt key, with CFG rows ``[cond; uncond]`` (cache per prompt).

    A prompt key may stand for "no text" (a condition without text). Where blocks with and without text
    meet in one pass (a prompt given mid-stream, or taken away), the textless ones cross-attend to zero
    keys/values, which is exactly no cross-attention (its projections have no bias: zero values give a
    zero output). Under autograd the keys/values are recomputed at every block (:meth:`refresh`), so no
    block's backward reaches through another block's graph.
    """

    def __init__(self, dit: TextModel, batch: int, rows: int, dtype: torch.dtype) -> None:
        self.dit, self.batch, self.rows, self.dtype = dit, batch, rows, dtype
        self.entries: dict[str, TextKV] = {}
        self.texts: dict[str, Tensor | None] = {}  # (B, L, Dc) each key was made from; None = no text

    def _compute(self, text: Tensor) -> TextKV:
        text = text.to(self.dtype)
        if text.shape[0] != self.batch:
            raise ValueError(f"condition text has batch {text.shape[0]}, the stream {self.batch}")
        if self.rows != self.batch:
            text = torch.cat([text, torch.zeros_like(text)])
        return self.dit.text_kv(text)

    def get(self, condition: Condition) -> TextKV | None:
        """The text K/V of ``condition``'s prompt (computed once per key); ``None`` for no text."""
        if condition.key not in self.texts:
            self.texts[condition.key] = condition.text
        if condition.text is None:
            return None
        cached = self.entries.get(condition.key)
        if cached is None:
            cached = self.entries[condition.key] = self._compute(condition.text)
        return cached

    def lookup(self, key: str) -> TextKV | None:
        """The K/V cached for ``key`` (``None``: a prompt without text).

        Raises:
            KeyError: a key never seen, or forgotten while a context block still refers to it.
        """
        if key not in self.texts:
            raise KeyError(f"prompt {key!r} is not cached: a context block refers to a prompt that was never given or was dropped")
        return self.entries.get(key)

    def kv_for(self, keys: list[str]) -> list[TextKV] | None:
        """Each key's K/V, textless keys as zeros of the others' shape; ``None`` if no key has text."""
        found = [self.lookup(k) for k in keys]
        like = next((f for f in found if f is not None), None)
        if like is None:
            return None
        zeros = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in like]
        return [f if f is not None else zeros for f in found]

    def grouped(self, token_keys: list[str]) -> tuple[TextKV | None, Tensor | None]:
        """Text K/V for tokens that each cross-attend to their own prompt (``token_keys``, one per token): one
        prompt's K/V, or several concatenated along the text axis with an ``(S, P·L)`` mask selecting each
        token's; ``(None, None)`` where no prompt has text."""
        prompts = [*dict.fromkeys(token_keys)]
        if len(prompts) == 1:
            return self.lookup(prompts[0]), None
        per = self.kv_for(prompts)
        if per is None:
            return None, None
        group = torch.tensor([prompts.index(k) for k in token_keys], device=per[0][0][0].device)
        return concat_text(per), text_group_mask(group, per[0][0][0].shape[2], len(prompts))

    def refresh(self) -> None:
        """Recompute every cached K/V (under autograd: a fresh graph for this block)."""
        for key, text in self.texts.items():
            if text is not None:
                self.entries[key] = self._compute(text)

    def keep_only(self, keys: set[str]) -> None:
        """Forget every prompt not in ``keys`` (prompts of blocks that left the context)."""
        for key in [k for k in self.texts if k not in keys]:
            self.texts.pop(key, None)
            self.entries.pop(key, None)


def concat_text(prompts: list[TextKV]) -> TextKV:
    """Per-layer text K/V of several prompts concatenated along the text axis (select with a group mask)."""
    return [(torch.cat([p[i][0] for p in prompts], dim=2), torch.cat([p[i][1] for p in prompts], dim=2)) for i in range(len(prompts[0]))]


def attention_bias(allowed: Tensor, dtype: torch.dtype) -> Tensor | None:
    """The mask a pass hands attention: ``None`` where every query may see every key (so SDPA can take its
    fused kernels, FlashAttention on CUDA), else an additive float mask built once per block."""
    if bool(allowed.all()):
        return None
    return additive_mask(allowed, dtype)


class EngineCore:
    """The parts every engine holds (composed, not inherited): the model and how its layers run, geometry,
    sampling, objective, timesteps, and CFG row handling."""

    def __init__(self, dit: DiT, geometry: BlockGeometry, sampling: Sampling, runtime: Runtime | None = None) -> None:
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
        self.runtime = runtime if runtime is not None else get_runtime("eager", self.device)
        self.run_layers: LayerRunner = self.runtime.bind(dit)
        self.ts = timesteps(sampling.steps, self.objective, sampling.schedule, device=self.device, dtype=self.dtype)

    def progress(self, batch: int, generator: Generator) -> Progress:
        branches = 2 if self.sampling.cfg_scale != 1.0 else 1  # not from the text: a prompt may come mid-stream
        return Progress(batch=batch, rows=batch * branches, block=0, generator=generator)

    def check_context(self, context: Tensor | None, batch: int) -> list[Tensor]:
        """A starting context ``(B, C, k·Bf)`` as its blocks, each ``(B, C, Bf)``.

        Raises:
            ValueError: a context of another batch, channel count, or not whole blocks.
        """
        if context is None:
            return []
        B, C, T = context.shape
        Bf = self.geometry.block_frames
        if B != batch or C != self.channels or T % Bf:
            raise ValueError(f"context must be (batch={batch}, channels={self.channels}, whole blocks of {Bf}), got {tuple(context.shape)}")
        return [context[..., b * Bf : (b + 1) * Bf].to(self.dtype) for b in range(T // Bf)]

    def rows(self, x: Tensor, progress: Progress) -> Tensor:
        """``(B, ...)`` repeated for every CFG branch: ``(R, ...)``."""
        return x if progress.rows == progress.batch else torch.cat([x] * (progress.rows // progress.batch))

    def combine(self, out: Tensor, progress: Progress) -> Tensor:
        """CFG: ``(R, ...)`` outputs ``[cond; uncond]`` → ``(B, ...)``."""
        if progress.rows == progress.batch:
            return out
        cond, uncond = out.chunk(2)
        return cfg_combine(cond, uncond, self.sampling.cfg_scale)

    def global_rows(self, condition: Condition, progress: Progress) -> Tensor | None:
        return None if condition.global_cond is None else self.rows(condition.global_cond.to(self.dtype), progress)


def sample_block(engine: Any, core: EngineCore, state: Any, condition: Condition, exit_step: int | None = None) -> Tensor:
    """``engine.step``: begin the block, run the sampler over ``engine.denoise_step``, end the block.

    Args:
        exit_step: a training rollout through the cache (ARC-Forcing, DESIGN §5): denoising steps
            ``0 … exit_step − 1`` run under ``torch.no_grad``, step ``exit_step`` (0-based) records gradients,
            and its clean-data prediction is the block (the sampler stops there). At the last step this
            equals the sampler's own output (every sampler's step to ``t = 0`` returns its prediction), so a
            rollout with every exit at the last step and gradients off is the inference rollout.
            ``None``: the whole sampler in the caller's grad mode.

    Returns:
        The block ``(B, C, Bf)``; committed as context (detached) by ``end_block``.

    Raises:
        ValueError: ``exit_step`` outside ``[0, steps)``.
        RuntimeError: ``exit_step`` under ``torch.inference_mode`` (its tensors cannot be saved for backward).
    """
    steps = core.ts.shape[0] - 1
    if exit_step is not None:
        if not 0 <= exit_step < steps:
            raise ValueError(f"exit_step must be in [0, {steps}) for {steps} denoising steps, got {exit_step}")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("a rollout with an exit step trains through the cache: run it outside torch.inference_mode")
    engine.begin_block(state, condition)
    progress: Progress = engine.progress(state)
    noise = randn((progress.batch, core.channels, core.geometry.block_frames), progress.generator, core.device, core.dtype)
    _, sigma = core.objective.alpha_sigma(core.ts[:1])
    calls, exit_x0 = [0], []

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        i, calls[0] = calls[0], calls[0] + 1
        context = torch.no_grad() if exit_step is not None and i < exit_step else contextlib.nullcontext()
        with context:
            out: Tensor = engine.denoise_step(state, x, t)
        return out

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        x0: Tensor = core.objective.x0_from_output(x, model_fn(x, t), t)
        if calls[0] - 1 == exit_step:
            exit_x0.append(x0)
        return x0

    ts = core.ts if exit_step is None else core.ts[: exit_step + 2]  # the sampler runs through the exit step only
    block = sample(core.sampling.sampler, denoise, noise * sigma.to(core.dtype), ts, core.objective, generator=progress.generator)
    if exit_step is not None:
        block = exit_x0[0]
    engine.end_block(state, block)
    return block
