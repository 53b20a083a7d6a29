"""The one block rollout: used by inference, eval, serving, benchmarks and ARC-Forcing alike.

Legend: B batch, C latent channels, Bf block frames, n blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    engine: Engine[Any], state: Any, n_blocks: int, condition: ConditionSchedule, first: int = 0, grad_step: int | None = None
) -> Iterator[Tensor]:
    """Generate ``n_blocks`` blocks of a started stream, one at a time.

    Args:
        engine, state: the engine and a state from ``engine.start``.
        condition: a :class:`Condition`, or a function of the block index.
        first: the schedule index of the first block (a stream that continues counts on).
        grad_step: the one denoising step per block that records gradients (see
            :func:`~lmdm.streaming.common.sample_block`); ``None``: the caller's grad mode throughout.

    Yields:
        Each block ``(B, C, Bf)``, already committed as context.
    """
    for i in range(first, first + n_blocks):
        yield engine.step(state, condition_at(condition, i), grad_step=grad_step)


def rollout(
    engine: Engine[Any],
    n_blocks: int,
    condition: ConditionSchedule,
    batch: int = 1,
    context: Tensor | None = None,
    generator: torch.Generator | None = None,
    state: Any | None = None,
    on_block: Callable[[int, Tensor], None] | None = None,
    grad_step: int | None = None,
) -> Tensor:
    """Generate ``n_blocks`` blocks with ``engine``.

    Args:
        condition: a :class:`Condition`, or a function of the block index (counted from this call).
        context: ``(B, C, k·Bf)`` real starting context (continuations, eval, ARC-Forcing); ``None`` = silence.
        state: continue an existing stream instead of starting one (``batch``/``context`` are then ignored).
        on_block: called as ``on_block(i, block)`` after each block (progress bars, streaming out).
        grad_step: see :func:`rollout_blocks`.

    Returns:
        ``(B, C, n_blocks · Bf)`` latents.

    Raises:
        ValueError: ``n_blocks < 1``.
    """
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    if state is None:
        state = engine.start(condition_at(condition, 0), batch, context=context, generator=generator)
    blocks = []
    for i, block in enumerate(rollout_blocks(engine, state, n_blocks, condition, grad_step=grad_step)):
        blocks.append(block)
        if on_block is not None:
            on_block(i, block)
    return torch.cat(blocks, dim=-1)
