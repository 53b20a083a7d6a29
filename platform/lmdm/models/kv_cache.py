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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["BlockKVCache", "CacheIO", "CachePool", "LayerCache", "TokenRingCache"]


class LayerCache(NamedTuple):
    """One layer's share of a :class:`CacheIO`: its buffers (views) and the pass's positions."""

    k: Tensor  # (R, H, P, Dh) key buffer
    v: Tensor  # (R, H, P, Dh) value buffer
    write: Tensor  # (S,) int64 buffer position of each of the pass's tokens
    read_start: int
    read_stop: int
    raw: Tensor | None  # (R, H, Kc, Dh) un-rotated keys
    raw_write: Tensor | None  # (n,) int64 positions in ``raw`` of the first n tokens' un-rotated keys

    def update(self, k: Tensor, v: Tensor, k_raw: Tensor) -> tuple[Tensor, Tensor]:
        """Write the pass's keys/values ``(R, H, S, Dh)`` into the buffers; return the keys/values the queries
        attend over, ``(R, H, read_stop − read_start, Dh)``.

        With autograd recording (a training rollout through the cache) the attended keys are a fresh tensor
        (the buffer region with this pass's keys put in out of place) and the buffers receive detached
        copies: the buffers never enter the graph, so later writes cannot invalidate a pending backward,
        and context keys/values carry no gradient (clean context is data, DESIGN §5).
        """
        start, stop = self.read_start, self.read_stop
        if self.raw is not None and self.raw_write is not None:
            self.raw.index_copy_(2, self.raw_write, k_raw[:, :, : self.raw_write.shape[0]].detach())
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            rel = self.write - start
            keys = self.k[:, :, start:stop].index_copy(2, rel, k)
            values = self.v[:, :, start:stop].index_copy(2, rel, v)
            self.k.index_copy_(2, self.write, k.detach())
            self.v.index_copy_(2, self.write, v.detach())
            return keys, values
        self.k.index_copy_(2, self.write, k)
        self.v.index_copy_(2, self.write, v)
        return self.k[:, :, start:stop], self.v[:, :, start:stop]


class CacheIO(NamedTuple):
    """What one pass does with a :class:`BlockKVCache`, in every layer, as tensors (no per-block Python
    values: a compiled pass is reused from block to block).

    Each layer writes its tokens' keys/values at ``write`` (and the first ``n`` tokens' un-rotated keys at
    ``raw_write``), then attends over buffer positions ``read_start … read_stop − 1``, which hold the
    written positions; the attention mask's key axis follows that region.
    """

    k: Tensor  # (Ly, R, H, P, Dh)
    v: Tensor  # (Ly, R, H, P, Dh)
    write: Tensor  # (S,) int64
    read_start: int
    read_stop: int
    raw: Tensor | None = None  # (Ly, R, H, Kc, Dh)
    raw_write: Tensor | None = None  # (n,) int64

    def layer(self, i: int) -> LayerCache:
        """Layer ``i``'s views."""
        return LayerCache(
            self.k[i], self.v[i], self.write, self.read_start, self.read_stop, None if self.raw is None else self.raw[i], self.raw_write
        )


@dataclass
class BlockKVCache:
    """Buffers ``k``/``v``: ``(Ly, R, H, A + Kc + 1 + Bf, Dh)``; ``k_raw``: ``(Ly, R, H, Kc, Dh)`` (fixed mode).

    Attributes:
        slot_block: stream block held by each ring slot (-1 = empty), host-side bookkeeping updated
            once per block, never inside a denoising step.
        row_slots: ``(R, Ctx)`` bool, which ring slots hold a block in each row, where rows differ (sessions
            stepped as one batch, some of them still filling their context); ``None``: every row as
            ``slot_block`` says. A slot is in ``slot_block`` when any row holds it.
    """

    k: Tensor
    v: Tensor
    k_raw: Tensor | None
    context_blocks: int
    block_frames: int
    aux_positions: int = 0
    slot_block: list[int] = field(default_factory=list)
    row_slots: Tensor | None = None

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

    @property
    def positions(self) -> int:
        """Buffer positions per layer: ``A + Kc + 1 + Bf``."""
        return int(self.k.shape[3])

    def io(self, write: slice | list[slice], read: slice, raw_slot: Tensor | None = None) -> CacheIO:
        """A pass that writes its tokens at buffer positions ``write`` (one region, or several in token order)
        and attends over ``read``; with ``raw_slot`` (a 0-d int64 tensor) its first ``Bf`` tokens' un-rotated
        keys go to that ring slot of ``k_raw``.

        Raises:
            ValueError: a written region outside the attended one (checked on the host: no device sync).
        """
        device = self.k.device
        start, stop, _ = read.indices(self.positions)
        regions = [r.indices(self.positions) for r in ([write] if isinstance(write, slice) else write)]
        if any(a < b and (a < start or b > stop) for a, b, _ in regions):
            raise ValueError(f"written positions must lie inside the attended region [{start}, {stop})")
        positions = torch.cat([torch.arange(a, b, device=device) for a, b, _ in regions])
        raw_write = None
        if raw_slot is not None and self.k_raw is not None:
            raw_write = raw_slot * self.block_frames + torch.arange(self.block_frames, device=device)
        return CacheIO(self.k, self.v, positions, start, stop, self.k_raw if raw_write is not None else None, raw_write)

    def fill_slot(self, slot: int, block: int) -> None:
        """Count ``block`` as held by ring ``slot`` (in every row)."""
        self.slot_block[slot] = block
        if self.row_slots is not None:
            self.row_slots[:, slot] = True

    def roll(self, shift: int) -> None:
        """Renumber the stream's blocks by ``shift``: block ``b`` (in slot ``b mod Ctx``) becomes block ``b + shift``
        and moves to slot ``(b + shift) mod Ctx``, keys, un-rotated keys and values (between blocks). Positions
        are relative to the window in ``fixed`` rotary mode, so a stream continues exactly as before."""
        Ctx, Bf = self.context_blocks, self.block_frames
        if not Ctx or not shift % Ctx:
            self.slot_block = [b + shift if b >= 0 else -1 for b in self.slot_block]
            return
        ring = self.ring

        def rolled(region: Tensor) -> Tensor:  # (..., Kc, Dh) with the slots rolled by ``shift``
            *lead, _, Dh = region.shape
            return region.reshape(*lead, Ctx, Bf, Dh).roll(shift, len(lead)).reshape(region.shape)

        for buffer in (self.k, self.v):
            buffer[:, :, :, ring] = rolled(buffer[:, :, :, ring])
        if self.k_raw is not None:
            self.k_raw.copy_(rolled(self.k_raw))
        old = list(self.slot_block)
        self.slot_block = [-1] * Ctx
        for s, b in enumerate(old):
            self.slot_block[(s + shift) % Ctx] = b + shift if b >= 0 else -1
        if self.row_slots is not None:
            self.row_slots = self.row_slots.roll(shift, 1)

    def slot_blocks(self, device: torch.device) -> Tensor:
        """``(Kc,)`` int64: the stream block each context position holds (-1: empty)."""
        return torch.tensor(self.slot_block, dtype=torch.long, device=device).repeat_interleave(self.block_frames)

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        total = self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
        if self.k_raw is not None:
            total += self.k_raw.numel() * self.k_raw.element_size()
        return total


class CachePool:
    """The block-wise KV caches of a server's sessions, allocated once: ``sessions`` rows shaped like
    ``template`` (one session's cache, e.g. on the meta device), each session's a contiguous view.

    A session :meth:`take` s a row when it starts and :meth:`give` s it back when it leaves; rows are reused,
    nothing grows with the sessions that came and went.
    """

    def __init__(self, sessions: int, template: BlockKVCache, device: torch.device) -> None:
        if sessions < 1:
            raise ValueError(f"a cache pool needs at least one session row, got {sessions}")
        self.template = template

        def rows(t: Tensor) -> Tensor:
            return torch.zeros(sessions, *t.shape, dtype=t.dtype, device=device)

        self.k, self.v = rows(template.k), rows(template.v)
        self.k_raw = None if template.k_raw is None else rows(template.k_raw)
        self._free = list(range(sessions - 1, -1, -1))  # pop() takes the lowest row first

    @property
    def capacity(self) -> int:
        return int(self.k.shape[0])

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    def take(self) -> tuple[int, BlockKVCache]:
        """A free row, zeroed, as an empty cache (views into the pool).

        Raises:
            RuntimeError: every row is taken.
        """
        if not self._free:
            raise RuntimeError(f"all {self.capacity} cache rows are in use")
        row = self._free.pop()
        self.k[row].zero_()
        self.v[row].zero_()
        if self.k_raw is not None:
            self.k_raw[row].zero_()
        t = self.template
        return row, BlockKVCache(
            k=self.k[row],
            v=self.v[row],
            k_raw=None if self.k_raw is None else self.k_raw[row],
            context_blocks=t.context_blocks,
            block_frames=t.block_frames,
            aux_positions=t.aux_positions,
            slot_block=[-1] * t.context_blocks,
        )

    def give(self, row: int) -> None:
        """Free ``row`` (its session left).

        Raises:
            ValueError: a row that is not taken.
        """
        if not 0 <= row < self.capacity or row in self._free:
            raise ValueError(f"cache row {row} is not in use")
        self._free.append(row)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_raw) if t is not None)


@dataclass
class TokenRingCache:
    """The LMM baseline's sliding-window KV cache: ``window`` slots per layer, token ``p`` in slot ``p mod window``.

    Buffers ``k``, ``v``, ``k_raw``: ``(Ly, R, H, window, Dh)``, preallocated. A decode step writes one token and
    attends over the slots written so far (all of them once the ring is full: no mask, since the ring holds
    exactly the window). Rotary positions stay bounded over an endless stream: keys are rotated at
    ``position − base``, and when the next position would reach ``2 · window`` past ``base`` the base moves on by
    ``window`` and every key is re-rotated from its un-rotated copy (``k_raw``; never a rotation of a rotated
    key, so no error accumulates), once per ``window`` tokens.

    Attributes:
        written: tokens written so far (the stream position of the next token).
        base: the position rotary angles are counted from.
    """

    k: Tensor
    v: Tensor
    k_raw: Tensor
    window: int
    slots: Tensor  # (window,) int64: arange, sliced for one slot's write index (a view, no allocation)
    written: int = 0
    base: int = 0

    @staticmethod
    def allocate(depth: int, rows: int, heads: int, head_dim: int, window: int, dtype: torch.dtype, device: torch.device) -> TokenRingCache:
        shape = (depth, rows, heads, window, head_dim)
        return TokenRingCache(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            k_raw=torch.zeros(shape, dtype=dtype, device=device),
            window=window,
            slots=torch.arange(window, device=device),
        )

    def step_io(self) -> CacheIO:
        """The next token's pass: write its slot, attend over every slot written (the window once full)."""
        slot = self.written % self.window
        write = self.slots[slot : slot + 1]
        return CacheIO(self.k, self.v, write, 0, min(self.written + 1, self.window), self.k_raw, write)

    def relative_position(self) -> int:
        """The rotary position of the next token (its stream position minus ``base``)."""
        return self.written - self.base

    def advance(self, tokens: int, rotate: Callable[[Tensor, Tensor], Tensor]) -> None:
        """Count ``tokens`` written; past ``2 · window`` from ``base``, move the base and re-rotate every key.

        Args:
            rotate: ``rotate(k_raw, positions)`` → keys rotated at ``positions`` ``(window,)`` (the model's rotary).
        """
        self.written += tokens
        if self.written - self.base >= 2 * self.window:
            self.rebase(self.written - self.window, rotate)

    def slot_positions(self) -> Tensor:
        """``(window,)`` stream position each slot holds (the latest token written there; negative: empty)."""
        p = self.written - 1
        return p - torch.remainder(p - self.slots, self.window)

    def rebase(self, base: int, rotate: Callable[[Tensor, Tensor], Tensor]) -> None:
        """Count rotary positions from ``base`` on: every key re-rotated from ``k_raw`` (once per window)."""
        self.base = base
        self.k.copy_(rotate(self.k_raw, self.slot_positions() - base))

    def load(self, keys_raw: Tensor, values: Tensor, rotate: Callable[[Tensor, Tensor], Tensor]) -> None:
        """Fill the ring with a prefix of ``n`` tokens, of which the last ``min(n, window)`` are kept: un-rotated keys
        and values ``(Ly, R, H, n, Dh)`` (a teacher-forced pass over a starting context)."""
        n = keys_raw.shape[3]
        keep = min(n, self.window)
        positions = torch.arange(n - keep, n, device=self.k.device)
        slots = torch.remainder(positions, self.window)
        self.k_raw.index_copy_(3, slots, keys_raw[:, :, :, n - keep :])
        self.v.index_copy_(3, slots, values[:, :, :, n - keep :])
        self.written = n
        self.rebase(max(0, n - self.window), rotate)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_raw))
