"""The one block rollout: used by inference, eval, serving, benchmarks and ARC-Forcing alike.

Legend: B batch, C latent channels, Bf block frames, n blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lmdm.streaming.common import Condition, Engine

__all__ = ["ConditionSchedule", "condition_at", "rollout", "rollout_blocks"]

# A fixed condition, or the condition for each block index (a prompt that changes mid-stream).
ConditionSchedule = Condition | Callable[[int], Condition]


def condition_at(schedule: ConditionSchedule, block: int) -> Condition:
    """The condition a schedule gives block ``block``."""
    return schedule if isinstance(schedule, Condition) else schedule(block)


def rollout_blocks(
    engine: Engine[Any],
    state: Any,
    n_blocks: int,
    condition: ConditionSchedule,
    first: int = 0,
    exit_steps: Sequence[int] | None = None,
) -> Iterator[Tensor]:
    """Generate ``n_blocks`` blocks of a started stream, one at a time.

    Args:
        engine, state: the engine and a state from ``engine.start``.
        condition: a :class:`Condition`, or a function of the block index.
        first: the schedule index of the first block (a stream that continues counts on).
        exit_steps: per block, the denoising step that records gradients and whose clean prediction is the
            block (a training rollout, :func:`~lmdm.streaming.common.sample_block`); ``None``: every block
            runs the whole sampler in the caller's grad mode.

    Yields:
        Each block ``(B, C, Bf)``, already committed as context.
    """
    if exit_steps is not None and len(exit_steps) != n_blocks:
        raise ValueError(f"exit_steps holds {len(exit_steps)} steps for {n_blocks} blocks: give one per block")
    for n, i in enumerate(range(first, first + n_blocks)):
        exit_step = exit_steps[n] if exit_steps is not None else None
        yield engine.step(state, condition_at(condition, i), exit_step=exit_step)


def rollout(
    engine: Engine[Any],
    n_blocks: int,
    condition: ConditionSchedule,
    batch: int = 1,
    context: Tensor | None = None,
    generator: torch.Generator | None = None,
    state: Any | None = None,
    on_block: Callable[[int, Tensor], None] | None = None,
    exit_steps: Sequence[int] | None = None,
) -> Tensor:
    """Generate ``n_blocks`` blocks with ``engine``.

    Args:
        condition: a :class:`Condition`, or a function of the block index (counted from this call).
        context: ``(B, C, k·Bf)`` real starting context (continuations, eval, ARC-Forcing); ``None`` = silence.
        state: continue an existing stream instead of starting one (``batch``/``context`` are then ignored).
        on_block: called as ``on_block(i, block)`` after each block (progress bars, streaming out).
        exit_steps: see :func:`rollout_blocks` (ARC-Forcing's rollout; the blocks then carry gradients).

    Returns:
        ``(B, C, n_blocks · Bf)`` latents.

    Raises:
        ValueError: ``n_blocks < 1``, or ``exit_steps`` not one per block.
    """
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    if state is None:
        state = engine.start(condition_at(condition, 0), batch, context=context, generator=generator)
    blocks = []
    for i, block in enumerate(rollout_blocks(engine, state, n_blocks, condition, exit_steps=exit_steps)):
        blocks.append(block)
        if on_block is not None:
            on_block(i, block)
    return torch.cat(blocks, dim=-1)
