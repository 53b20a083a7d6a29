"""The block-wise KV cache of a streaming LMDM: preallocated, sized from the geometry and the model.

Per layer the cache holds one key and one value buffer of ``Kc + 1 + Bf`` positions: the first
``Kc = context_blocks · block_frames`` hold the context blocks' keys/values (in *physical ring*
order: block ``b`` lives in ring slot ``b mod context_blocks``, so evicting the oldest block moves
no data), the last ``1 + Bf`` receive the global token's and the target block's own keys/values at
every denoising step (written in place, no concatenation). Queries attend over the whole buffer
under a mask that drops empty slots.

Rotary: in ``fixed`` mode the cache also keeps the context keys *un-rotated* (``k_raw``) and the
attention view is re-rotated from them once per block into window positions — never a rotation of
an already rotated key, so no error accumulates over a long stream. In ``growing`` mode keys are
rotated once, at their stream positions, when they enter.

Legend: Ly layers, R rows (batch × CFG branches), H heads, Kc context positions, Bf block frames,
Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["BlockKVCache"]


@dataclass
class BlockKVCache:
    """Buffers ``k``/``v``: ``(Ly, R, H, Kc + 1 + Bf, Dh)``; ``k_raw``: ``(Ly, R, H, Kc, Dh)`` (fixed mode).

    Attributes:
        slot_block: stream block held by each ring slot (-1 = empty), host-side bookkeeping updated
            once per block, never inside a denoising step.
    """

    k: Tensor
    v: Tensor
    k_raw: Tensor | None
    context_blocks: int
    block_frames: int
    slot_block: list[int] = field(default_factory=list)

    @staticmethod
    def allocate(
        depth: int,
        rows: int,
        heads: int,
        head_dim: int,
        context_blocks: int,
        block_frames: int,
        keep_raw: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> BlockKVCache:
        """Zeroed buffers for ``rows`` streams (batch × CFG branches)."""
        Kc = context_blocks * block_frames
        shape = (depth, rows, heads, Kc + 1 + block_frames, head_dim)
        k_raw = torch.zeros(depth, rows, heads, Kc, head_dim, dtype=dtype, device=device) if keep_raw else None
        return BlockKVCache(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            k_raw=k_raw,
            context_blocks=context_blocks,
            block_frames=block_frames,
            slot_block=[-1] * context_blocks,
        )

    @property
    def context_positions(self) -> int:
        return self.context_blocks * self.block_frames

    def slot_range(self, slot: int) -> slice:
        """Buffer positions of ring slot ``slot``."""
        return slice(slot * self.block_frames, (slot + 1) * self.block_frames)

    @property
    def own(self) -> slice:
        """Buffer positions of the global token and target frames written at every step."""
        return slice(self.context_positions, None)

    def slot_valid(self, device: torch.device) -> Tensor:
        """``(Kc,)`` bool: which context positions hold a block."""
        valid = torch.tensor([b >= 0 for b in self.slot_block], dtype=torch.bool, device=device)
        return valid.repeat_interleave(self.block_frames)

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        total = self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
        if self.k_raw is not None:
            total += self.k_raw.numel() * self.k_raw.element_size()
        return total
