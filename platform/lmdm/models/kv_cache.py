"""The block-wise KV cache of a streaming LMDM: preallocated, sized from the geometry and the model.

Per layer the cache holds one key and one value buffer of ``A + Kc + 1 + Bf`` positions:

- ``aux`` (``A = Bf`` for ``block_causal``, else 0): the keys/values of the block being committed,
  written by the merged pass (the last block's commit fused with the next block's first denoising
  step) before they move into the ring;
- ``ring`` (``Kc = context_blocks · block_frames``): the context blocks' keys/values in *physical ring*
  order: block ``b`` lives in slot ``b mod context_blocks``, so evicting the oldest block moves no data;
- ``own`` (``1 + Bf``): the global token's and the target block's keys/values, written in place at
  every denoising step (no concatenation).

Ordinary denoising steps attend over the view ``[ring | own]`` under a mask that drops empty slots.

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
    """Buffers ``k``/``v``: ``(Ly, R, H, A + Kc + 1 + Bf, Dh)``; ``k_raw``: ``(Ly, R, H, Kc, Dh)`` (fixed mode).

    Attributes:
        slot_block: stream block held by each ring slot (-1 = empty), host-side bookkeeping updated
            once per block, never inside a denoising step.
    """

    k: Tensor
    v: Tensor
    k_raw: Tensor | None
    context_blocks: int
    block_frames: int
    aux_positions: int = 0
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
        aux: bool = False,
    ) -> BlockKVCache:
        """Zeroed buffers for ``rows`` streams (batch × CFG branches); ``aux`` adds the commit region."""
        Kc = context_blocks * block_frames
        A = block_frames if aux else 0
        shape = (depth, rows, heads, A + Kc + 1 + block_frames, head_dim)
        k_raw = torch.zeros(depth, rows, heads, Kc, head_dim, dtype=dtype, device=device) if keep_raw else None
        return BlockKVCache(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            k_raw=k_raw,
            context_blocks=context_blocks,
            block_frames=block_frames,
            aux_positions=A,
            slot_block=[-1] * context_blocks,
        )

    @property
    def context_positions(self) -> int:
        return self.context_blocks * self.block_frames

    def slot_range(self, slot: int) -> slice:
        """Buffer positions of ring slot ``slot``."""
        start = self.aux_positions + slot * self.block_frames
        return slice(start, start + self.block_frames)

    def raw_range(self, slot: int) -> slice:
        """Positions of ring slot ``slot`` in ``k_raw`` (and in :meth:`slot_valid`), which have no aux region."""
        return slice(slot * self.block_frames, (slot + 1) * self.block_frames)

    @property
    def aux(self) -> slice:
        """Buffer positions of the block being committed (merged pass)."""
        return slice(0, self.aux_positions)

    @property
    def ring(self) -> slice:
        """Buffer positions of the context ring."""
        return slice(self.aux_positions, self.aux_positions + self.context_positions)

    @property
    def own(self) -> slice:
        """Buffer positions of the global token and target frames written at every step."""
        return slice(self.aux_positions + self.context_positions, None)

    def view(self, layer: int) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s ``[ring | own]`` keys and values, ``(R, H, Kc + 1 + Bf, Dh)`` views."""
        return self.k[layer][:, :, self.aux_positions :], self.v[layer][:, :, self.aux_positions :]

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
