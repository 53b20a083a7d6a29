"""Sessions stepped as one batch: serving batches the denoising steps of concurrent sessions.

:func:`stack` turns several LMDM sessions' states into one state whose rows are every session's rows
(``[cond of every session; uncond of every session]`` with CFG), stepped with the engine's ordinary
public calls under :func:`stack_conditions` of the sessions' conditions; :func:`unstack` splits it
again. Each session keeps its own noise generator (:class:`~lmdm.diffusion.noise.RowGenerators`), so its
blocks equal those it would get alone (tested).

Legend: B batch, R rows (B × branches).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmdm.diffusion.noise import RowGenerators
from lmdm.models.kv_cache import BlockKVCache
from lmdm.streaming.common import KEY_SEP, Condition, ContextWindow, Progress, PromptCache
from lmdm.streaming.lmdm_engine import LMDMState, Pending

if TYPE_CHECKING:
    from lmdm.streaming.lmdm_engine import LMDMEngine

__all__ = ["cat_rows", "split_rows", "stack", "stack_conditions", "stack_generators", "unstack"]


def stack_conditions(conditions: list[Condition]) -> Condition:
    """The condition of sessions stepped as one batch: texts and timing concatenated along the batch, keys
    joined (every session must have text, or none).

    Raises:
        ValueError: some sessions with text and some without (or timing), or a key holding the separator.
    """
    if any(KEY_SEP in c.key for c in conditions):
        raise ValueError("a prompt key may not contain the unit separator character (\\x1f)")
    texts = [c.text for c in conditions]
    if any(t is None for t in texts) and not all(t is None for t in texts):
        raise ValueError("sessions stepped as one batch must all have a prompt or all have none")
    globals_ = [c.global_cond for c in conditions]
    if any(g is None for g in globals_) and not all(g is None for g in globals_):
        raise ValueError("sessions stepped as one batch must all have timing conditioning or all have none")
    return Condition(
        text=None if texts[0] is None else torch.cat(texts),  # type: ignore[arg-type]
        key=KEY_SEP.join(c.key for c in conditions),
        global_cond=None if globals_[0] is None else torch.cat(globals_),  # type: ignore[arg-type]
    )


def cat_rows(parts: list[Tensor], branches: int, dim: int = 0) -> Tensor:
    """Concatenate per-session row tensors whose rows are ``[cond; uncond]`` branches into one with rows
    ``[cond of every session; uncond of every session]`` (the layout CFG expects)."""
    return torch.cat([chunk for b in range(branches) for chunk in (p.chunk(branches, dim)[b] for p in parts)], dim=dim)


def split_rows(whole: Tensor, batches: list[int], branches: int, dim: int = 0) -> list[Tensor]:
    """The inverse of :func:`cat_rows`: per-session tensors (each ``[cond; uncond]``) of ``batches`` rows."""
    per_branch = [torch.split(b, batches, dim) for b in whole.chunk(branches, dim)]
    return [torch.cat([per_branch[b][i] for b in range(branches)], dim=dim) for i in range(len(batches))]


def stack_generators(progresses: list[Progress]) -> RowGenerators:
    generators: list[torch.Generator | None] = []
    rows: list[int] = []
    for p in progresses:
        if isinstance(p.generator, RowGenerators):
            generators += p.generator.generators
            rows += p.generator.rows
        else:
            generators.append(p.generator)
            rows.append(p.batch)
    return RowGenerators(tuple(generators), tuple(rows))


def stack(engine: LMDMEngine, states: list[LMDMState]) -> LMDMState:
    """Several sessions as one state, stepped as one batch (serving batches concurrent sessions).

    Each session keeps its own noise generator, so the blocks equal those it would get alone. Step the
    result with :func:`~lmdm.streaming.common.stack_conditions` of the sessions' conditions; split it
    again with :func:`unstack`. The sessions must be in lockstep: between blocks, at the same block with
    the same context slots filled and a pending block alike, with the same CFG branches; they may
    differ in prompts, contexts, noise and batch size. (The caches are copied once here, not per step.)

    Raises:
        ValueError: sessions that are not in lockstep, or prompts of different token counts.
    """
    if not states:
        raise ValueError("stack needs at least one state")
    first = states[0]
    for s in states:
        if s.step_plan is not None or s.merged_plan is not None:
            raise ValueError("stack sessions between blocks (after end_block, before begin_block)")
        same = (
            s.progress.block == first.progress.block
            and s.cache.slot_block == first.cache.slot_block
            and [k is None for k in s.window.keys] == [k is None for k in first.window.keys]
            and (s.pending is None) == (first.pending is None)
            and s.progress.branches == first.progress.branches
        )
        if not same:
            raise ValueError(
                "sessions stepped as one batch must be in lockstep: the same block index, filled context slots, "
                "pending block and CFG branches"
            )
    branches = first.progress.branches
    batch = sum(s.progress.batch for s in states)
    prompts = PromptCache(engine.core.dit, batch, batch * branches, engine.core.dtype)

    def joined(keys: list[str]) -> str:
        """The stacked prompt of one key per session: K/V rows and texts concatenated (no text: zeros)."""
        key = KEY_SEP.join(keys)
        if key in prompts.texts:
            return key
        per = [s.prompts.lookup(k) for k, s in zip(keys, states, strict=True)]
        texts = [s.prompts.texts[k] for k, s in zip(keys, states, strict=True)]
        like = next((p for p in per if p is not None), None)
        like_text = next((t for t in texts if t is not None), None)
        if like is None or like_text is None:
            prompts.texts[key] = None
            return key
        if len({p[0][0].shape[2] for p in per if p is not None}) > 1:
            raise ValueError("the sessions' prompts have different token counts; encode them to one length")
        per_kv = [p if p is not None else [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in like] for p in per]
        prompts.entries[key] = [
            (cat_rows([p[i][0] for p in per_kv], branches), cat_rows([p[i][1] for p in per_kv], branches)) for i in range(len(like))
        ]
        sizes = [s.progress.batch for s in states]
        prompts.texts[key] = torch.cat(
            [t if t is not None else like_text.new_zeros(n, *like_text.shape[1:]) for t, n in zip(texts, sizes, strict=True)]
        )
        return key

    window_keys = [None if k is None else joined([s.window.keys[i] or "" for s in states]) for i, k in enumerate(first.window.keys)]
    pending = None
    if first.pending is not None:
        keys = [s.pending.key for s in states if s.pending is not None]
        pending = Pending(cat_rows([s.pending.inputs for s in states if s.pending is not None], branches), joined(keys))
    cache = first.cache
    stacked = BlockKVCache(
        k=cat_rows([s.cache.k for s in states], branches, dim=1),
        v=cat_rows([s.cache.v for s in states], branches, dim=1),
        k_raw=None if cache.k_raw is None else cat_rows([s.cache.k_raw for s in states if s.cache.k_raw is not None], branches, dim=1),
        context_blocks=cache.context_blocks,
        block_frames=cache.block_frames,
        aux_positions=cache.aux_positions,
        slot_block=list(cache.slot_block),
    )
    return LMDMState(
        progress=Progress(batch, batch * branches, first.progress.block, stack_generators([s.progress for s in states])),
        window=ContextWindow(torch.cat([s.window.latents for s in states]), window_keys),
        prompts=prompts,
        cache=stacked,
        frames=torch.zeros(batch * branches, *first.frames.shape[1:], dtype=first.frames.dtype, device=first.frames.device),
        pending=pending,
    )


def unstack(engine: LMDMEngine, state: LMDMState, batches: list[int]) -> list[LMDMState]:
    """Split a :func:`stack` ed state into sessions of ``batches`` rows (between blocks), each with its own
    generator again.

    Raises:
        ValueError: mid-block, batches that do not add up, or a state not made by :meth:`stack`.
    """
    if state.step_plan is not None or state.merged_plan is not None:
        raise ValueError("unstack sessions between blocks (after end_block, before begin_block)")
    generators = state.progress.generator
    if not isinstance(generators, RowGenerators) or list(generators.rows) != batches:
        raise ValueError(f"unstack takes the batches the state was stacked from, got {batches}")
    branches, n = state.progress.branches, len(batches)

    def split_key(key: str | None) -> list[str | None]:
        return [None] * n if key is None else list(key.split(KEY_SEP))

    ks, vs = split_rows(state.cache.k, batches, branches, 1), split_rows(state.cache.v, batches, branches, 1)
    raws = split_rows(state.cache.k_raw, batches, branches, 1) if state.cache.k_raw is not None else [None] * n
    latents = torch.split(state.window.latents, batches)
    pendings = split_rows(state.pending.inputs, batches, branches) if state.pending is not None else [None] * n
    pending_keys = split_key(state.pending.key if state.pending is not None else None)
    window_keys = [split_key(k) for k in state.window.keys]
    # Each stacked prompt split once into its sessions' parts: per key, per session, (texts, per-layer K/V).
    prompt_parts: dict[str, list[tuple[Tensor | None, list[tuple[Tensor, Tensor]] | None]]] = {}
    for key, text in state.prompts.texts.items():
        entry = state.prompts.entries.get(key)
        if text is None or entry is None:
            prompt_parts[key] = [(None, None)] * n
            continue
        layers = [(split_rows(k, batches, branches), split_rows(v, batches, branches)) for k, v in entry]
        texts = torch.split(text, batches)
        prompt_parts[key] = [(texts[i], [(k[i], v[i]) for k, v in layers]) for i in range(n)]
    out = []
    for i, b in enumerate(batches):
        prompts = PromptCache(engine.core.dit, b, b * branches, engine.core.dtype)
        for key, parts in prompt_parts.items():
            own = key.split(KEY_SEP)[i]
            prompts.texts[own], kv = parts[i]
            if kv is not None:
                prompts.entries[own] = kv
        cache = BlockKVCache(
            ks[i],
            vs[i],
            raws[i],
            state.cache.context_blocks,
            state.cache.block_frames,
            state.cache.aux_positions,
            list(state.cache.slot_block),
        )
        pending_inputs, pending_key = pendings[i], pending_keys[i]
        out.append(
            LMDMState(
                progress=Progress(b, b * branches, state.progress.block, generators.generators[i]),
                window=ContextWindow(latents[i], [k[i] for k in window_keys]),
                prompts=prompts,
                cache=cache,
                frames=torch.zeros(b * branches, *state.frames.shape[1:], dtype=state.frames.dtype, device=state.frames.device),
                pending=None if pending_inputs is None or pending_key is None else Pending(pending_inputs, pending_key),
            )
        )
    return out
