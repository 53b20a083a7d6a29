"""Sessions stepped as one batch: serving batches the denoising steps of concurrent sessions.

:func:`stack` turns several LMDM sessions' states into one state whose rows are every session's rows
(``[cond of every session; uncond of every session]`` with CFG), stepped with the engine's ordinary
public calls under :func:`stack_conditions` of the sessions' conditions; :func:`unstack` splits it
again. Each session keeps its own noise generator (:class:`~lmdm.diffusion.noise.RowGenerators`), so its
blocks equal those it would get alone (tested).

Legend: B batch, R rows (B × branches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmdm.diffusion.noise import RowGenerators
from lmdm.models.kv_cache import BlockKVCache
from lmdm.streaming.common import KEY_SEP, Condition, ContextWindow, Progress, PromptCache
from lmdm.streaming.lmdm_engine import LMDMState, Pending

if TYPE_CHECKING:
    from lmdm.streaming.lmdm_engine import LMDMEngine

__all__ = ["cat_rows", "split_rows", "stack", "stack_conditions", "stack_generators", "step_together", "unstack"]


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


def _slots_held(state: LMDMState) -> Tensor:
    """``(R, Ctx)`` bool: the ring slots each row of ``state`` holds."""
    cache = state.cache
    if cache.row_slots is not None:
        return cache.row_slots
    held = torch.tensor([b >= 0 for b in cache.slot_block], dtype=torch.bool, device=cache.k.device)
    return held[None].expand(state.progress.rows, -1)


def stack(engine: LMDMEngine, states: list[LMDMState]) -> LMDMState:
    """Several sessions as one state, stepped as one batch (serving batches concurrent sessions).

    Each session keeps its own noise generator, so the blocks equal those it would get alone. Step the
    result with :func:`~lmdm.streaming.common.stack_conditions` of the sessions' conditions; split it
    again with :func:`unstack`. The sessions must be between blocks, all with a pending block or none (the
    block's first step is the merged commit pass or not), with the same CFG branches; they may differ in
    prompts, contexts, noise and batch size. ``block_causal`` sessions may also be at different blocks and
    hold different context slots (one still filling its context beside others that are full): each is
    renumbered to the latest session's block (:meth:`~lmdm.streaming.lmdm_engine.LMDMEngine.renumber`,
    fixed rotary: in place, the stream unchanged), and the rows' attention masks drop the slots a row does
    not hold. (The caches are copied once here, not per step.)

    Raises:
        ValueError: sessions that cannot share a step (mid-block, pending blocks unlike, other CFG branches;
            ``encdec`` or growing rotary at different blocks or context fills), or prompts of different
            token counts.
    """
    if not states:
        raise ValueError("stack needs at least one state")
    first = states[0]
    per_row = engine.variant == "block_causal" and engine.rotary == "fixed"
    for s in states:
        if s.step_plan is not None or s.merged_plan is not None:
            raise ValueError("stack sessions between blocks (after end_block, before begin_block)")
        if (s.pending is None) != (first.pending is None) or s.progress.branches != first.progress.branches:
            raise ValueError(
                "sessions stepped as one batch must share the step phase: all with a pending block or none "
                "(the block's first step commits it), and the same CFG branches"
            )
        if not per_row and (
            s.progress.block != first.progress.block or [k is None for k in s.window.keys] != [k is None for k in first.window.keys]
        ):
            raise ValueError(
                f"{engine.variant} sessions ({engine.rotary} rotary) stepped as one batch must be in lockstep: "
                "the same block index and filled context slots"
            )
    if per_row:
        count = max(s.progress.block for s in states)  # forward only: a held block never renumbered below 0
        for s in states:
            engine.renumber(s, count)
        for s in states:
            clash = any(a >= 0 and b >= 0 and a != b for a, b in zip(s.cache.slot_block, first.cache.slot_block, strict=True))
            if clash:  # cannot happen after renumbering (slot = block mod Ctx), kept as a guard
                raise ValueError("sessions stepped as one batch hold different blocks in one context slot")
    branches = first.progress.branches
    batch = sum(s.progress.batch for s in states)
    prompts = PromptCache(engine.core.dit, batch, batch * branches, engine.core.dtype)

    def joined(keys: Sequence[str | None]) -> str:
        """The stacked prompt of one key per session (``None``: the session has no block there): K/V rows and
        texts concatenated (no text: zeros)."""
        key = KEY_SEP.join(k or "" for k in keys)
        if key in prompts.texts:
            return key
        per = [None if k is None else s.prompts.lookup(k) for k, s in zip(keys, states, strict=True)]
        texts = [None if k is None else s.prompts.texts[k] for k, s in zip(keys, states, strict=True)]
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

    window_keys = [
        None if all(s.window.keys[i] is None for s in states) else joined([s.window.keys[i] for s in states])
        for i in range(len(first.window.keys))
    ]
    pending = None
    if first.pending is not None:
        keys = [s.pending.key for s in states if s.pending is not None]
        pending = Pending(cat_rows([s.pending.inputs for s in states if s.pending is not None], branches), joined(keys))
    cache = first.cache
    slot_block = [max(s.cache.slot_block[i] for s in states) for i in range(cache.context_blocks)]  # a slot any row holds
    held = cat_rows([_slots_held(s) for s in states], branches)
    union = torch.tensor([b >= 0 for b in slot_block], dtype=torch.bool, device=held.device)
    stacked = BlockKVCache(
        k=cat_rows([s.cache.k for s in states], branches, dim=1),
        v=cat_rows([s.cache.v for s in states], branches, dim=1),
        k_raw=None if cache.k_raw is None else cat_rows([s.cache.k_raw for s in states if s.cache.k_raw is not None], branches, dim=1),
        context_blocks=cache.context_blocks,
        block_frames=cache.block_frames,
        aux_positions=cache.aux_positions,
        slot_block=slot_block,
        row_slots=None if bool((held == union).all()) else held.clone(),
    )
    return LMDMState(
        progress=Progress(batch, batch * branches, first.progress.block, stack_generators([s.progress for s in states])),
        window=ContextWindow(torch.cat([s.window.latents for s in states]), window_keys),
        prompts=prompts,
        cache=stacked,
        frames=torch.zeros(batch * branches, *first.frames.shape[1:], dtype=first.frames.dtype, device=first.frames.device),
        pending=pending,
    )


def unstack(engine: LMDMEngine, state: LMDMState, batches: list[int], into: list[BlockKVCache] | None = None) -> list[LMDMState]:
    """Split a :func:`stack` ed state into sessions of ``batches`` rows (between blocks), each with its own
    generator again; with ``into`` (the sessions' own caches, e.g. pooled rows) the caches are copied back
    into those, not into new tensors.

    Raises:
        ValueError: mid-block, batches that do not add up, a state not made by :meth:`stack`, or ``into``
            caches of other shapes.
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
    raws: list[Tensor | None] = [None] * n
    if state.cache.k_raw is not None:
        raws = list(split_rows(state.cache.k_raw, batches, branches, 1))
    helds = split_rows(state.cache.row_slots, batches, branches) if state.cache.row_slots is not None else [None] * n
    if into is not None:
        if len(into) != n or any(c.k.shape != k.shape for c, k in zip(into, ks, strict=True)):
            raise ValueError("unstack into caches of the sessions' own shapes, one per session")
        for c, k, v, raw in zip(into, ks, vs, raws, strict=True):
            c.k.copy_(k)
            c.v.copy_(v)
            if c.k_raw is not None and raw is not None:
                c.k_raw.copy_(raw)
        ks, vs, raws = [c.k for c in into], [c.v for c in into], [c.k_raw for c in into]
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
        held = helds[i]
        slot_block = list(state.cache.slot_block)
        if held is not None:  # the slots this session holds (its rows agree: a session fills a slot in every row)
            slot_block = [b if bool(held[0, s]) else -1 for s, b in enumerate(slot_block)]
        cache = BlockKVCache(
            ks[i],
            vs[i],
            raws[i],
            state.cache.context_blocks,
            state.cache.block_frames,
            state.cache.aux_positions,
            slot_block,
        )
        keys = [k[i] for k in window_keys]
        if held is not None:  # the logical window's empty slots (oldest first) are the ring slots it does not hold
            empty = cache.context_blocks - sum(b >= 0 for b in slot_block)
            keys = [None if s < empty else k for s, k in enumerate(keys)]
        pending_inputs, pending_key = pendings[i], pending_keys[i]
        out.append(
            LMDMState(
                progress=Progress(b, b * branches, state.progress.block, generators.generators[i]),
                window=ContextWindow(latents[i], keys),
                prompts=prompts,
                cache=cache,
                frames=torch.zeros(b * branches, *state.frames.shape[1:], dtype=state.frames.dtype, device=state.frames.device),
                pending=None if pending_inputs is None or pending_key is None else Pending(pending_inputs, pending_key),
            )
        )
    return out


def step_together(engine: LMDMEngine, states: list[LMDMState], conditions: list[Condition]) -> list[Tensor]:
    """The next block of each of several sessions, stepped as one batch (:func:`stack`, one
    :meth:`~lmdm.streaming.lmdm_engine.LMDMEngine.step`, :func:`unstack` into the sessions' own caches); each
    state advances in place as its own ``engine.step`` would advance it.

    Returns:
        Each session's block ``(B_i, C, Bf)``.

    Raises:
        ValueError: sessions that cannot share a step (see :func:`stack`).
    """
    if len(states) == 1:
        return [engine.step(states[0], conditions[0])]
    batches = [s.progress.batch for s in states]
    together = stack(engine, states)
    block = engine.step(together, stack_conditions(conditions))
    for state, alone in zip(states, unstack(engine, together, batches, into=[s.cache for s in states]), strict=True):
        for name in ("progress", "window", "prompts", "cache", "frames", "pending", "key", "text_kv", "global_cond"):
            setattr(state, name, getattr(alone, name))
        state.step_plan = state.merged_plan = None
    return list(torch.split(block, batches))
