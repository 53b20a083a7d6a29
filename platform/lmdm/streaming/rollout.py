"""The one block rollout: used by inference, eval, serving, benchmarks and ARC-Forcing alike.

Legend: B batch, C latent channels, Bf block frames, n blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lmdm.streaming.engines import Condition, Engine, StreamState

__all__ = ["ConditionSchedule", "condition_at", "rollout"]

# A fixed condition, or the condition for each block index (a prompt that changes mid-stream).
ConditionSchedule = Condition | Callable[[int], Condition]


def condition_at(schedule: ConditionSchedule, block: int) -> Condition:
    """The condition a schedule gives block ``block``."""
    return schedule if isinstance(schedule, Condition) else schedule(block)


def rollout(
    engine: Engine,
    n_blocks: int,
    condition: ConditionSchedule,
    batch: int = 1,
    context: Tensor | None = None,
    generator: torch.Generator | None = None,
    state: StreamState | None = None,
    on_block: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Generate ``n_blocks`` blocks with ``engine``.

    Args:
        condition: a :class:`Condition`, or a function of the block index (counted from this call).
        context: ``(B, C, k·Bf)`` real starting context (continuations, eval, ARC-Forcing); ``None`` = silence.
        state: continue an existing stream instead of starting one (``batch``/``context`` are then ignored).
        on_block: called as ``on_block(i, block)`` after each block (progress bars, streaming out).

    Returns:
        ``(B, C, n_blocks · Bf)`` latents.

    Raises:
        ValueError: ``n_blocks < 1``.
    """
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    if state is None:
        state = engine.start(condition_at(condition, 0), batch, context=context, generator=generator)
    out: Tensor | None = None
    for i in range(n_blocks):
        block = engine.step(state, condition_at(condition, i))
        if out is None:  # preallocated once the block shape is known
            B, C, Bf = block.shape
            out = block.new_empty(B, C, n_blocks * Bf)
        out[..., i * block.shape[-1] : (i + 1) * block.shape[-1]] = block
        if on_block is not None:
            on_block(i, block)
    assert out is not None
    return out
