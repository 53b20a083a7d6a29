"""Every attention mask of the platform, built in one place from one predicate.

A sequence is described token by token (:class:`TokenLayout`): its kind (``GLOBAL`` token,
``CLEAN`` context frame, ``NOISY`` target frame), the stream block it belongs to (a global token
belongs to its target block) and whether it is valid as a key (empty or dropped context slots are
not: the *one* representation of "no context"). A query may attend to a key iff the key is valid,
or it is the query itself (so no row is ever empty), and:

- ``full`` (bidirectional base, outpainting): always;
- ``encdec``: clean → clean always; noisy/global → clean always; noisy/global → noisy/global of the
  same target block;
- ``block_causal``: clean(b) → clean(b') iff ``b − C ≤ b' ≤ b`` (banded, C = ``context_blocks``);
  noisy/global(j) → clean(b') iff ``j − C ≤ b' < j``; noisy/global(j) → noisy/global(j).

So under ``encdec`` and ``block_causal`` no context token ever sees a noisy target or a global
token: context keys/values depend on clean audio (and their block's prompt) only, and can be cached.

Legend: S query tokens, K key tokens, B batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["CLEAN", "GLOBAL", "NOISY", "TokenLayout", "Variant", "additive_mask", "attention_mask", "text_group_mask"]

GLOBAL, CLEAN, NOISY = 0, 1, 2
Variant = Literal["full", "encdec", "block_causal"]


@dataclass(frozen=True)
class TokenLayout:
    """Per-token description of a sequence.

    Attributes:
        kind: ``(S,)`` int64, one of GLOBAL, CLEAN, NOISY.
        block: ``(S,)`` int64 stream block index (a global token: its target's block).
        valid: ``(S,)`` or ``(B, S)`` bool; False for empty/dropped context (masked as keys).
    """

    kind: Tensor
    block: Tensor
    valid: Tensor

    @staticmethod
    def of(kinds: list[int], blocks: list[int], valid: Tensor | None = None, device: torch.device | None = None) -> TokenLayout:
        kind = torch.tensor(kinds, dtype=torch.long, device=device)
        return TokenLayout(
            kind, torch.tensor(blocks, dtype=torch.long, device=device), torch.ones_like(kind, dtype=torch.bool) if valid is None else valid
        )

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def cat(self, other: TokenLayout) -> TokenLayout:
        a, b = self.valid, other.valid
        if a.ndim != b.ndim:
            batch = a.shape[0] if a.ndim == 2 else b.shape[0]
            a = a.expand(batch, -1) if a.ndim == 2 else a[None].expand(batch, -1)
            b = b.expand(batch, -1) if b.ndim == 2 else b[None].expand(batch, -1)
        valid = torch.cat([a, b], dim=-1)
        return TokenLayout(torch.cat([self.kind, other.kind]), torch.cat([self.block, other.block]), valid)


def attention_mask(queries: TokenLayout, keys: TokenLayout, variant: Variant, context_blocks: int, same_tokens: bool = True) -> Tensor:
    """The bool attention mask (True = may attend) of ``queries`` over ``keys``.

    Args:
        queries, keys: token layouts (the same object for a plain self-attention forward).
        variant: ``full``, ``encdec`` or ``block_causal``.
        context_blocks: ``C``, blocks of context a block sees (``block_causal``).
        same_tokens: queries are the first tokens of keys (self-attention); then a query may always
            attend to itself. Cached engines pass False and guarantee it through the layout.

    Returns:
        ``(S, K)``, or ``(B, 1, S, K)`` when validity is per sample.
    """
    qk, qb = queries.kind[:, None], queries.block[:, None]
    kk, kb = keys.kind[None, :], keys.block[None, :]
    q_ctx, k_ctx = qk == CLEAN, kk == CLEAN
    same_target = (qb == kb) & ~q_ctx & ~k_ctx
    if variant == "full":
        allowed = torch.ones(qk.shape[0], kk.shape[1], dtype=torch.bool, device=qk.device)
    elif variant == "encdec":
        allowed = k_ctx | same_target
    elif variant == "block_causal":
        in_band = (kb >= qb - context_blocks) & (kb <= qb)
        clean_to_clean = q_ctx & k_ctx & in_band
        target_to_clean = ~q_ctx & k_ctx & in_band & (kb < qb)
        allowed = clean_to_clean | target_to_clean | same_target
    else:
        raise ValueError(f"unknown attention variant {variant!r}; expected 'full', 'encdec' or 'block_causal'")
    valid = keys.valid
    # per-sample validity gives (B, S, K), made (B, 1, S, K) below
    allowed = allowed[None] & valid[:, None, :] if valid.ndim == 2 else allowed & valid[None, :]
    if same_tokens:
        eye = torch.eye(qk.shape[0], kk.shape[1], dtype=torch.bool, device=qk.device)
        allowed = allowed | (eye if allowed.ndim == 2 else eye[None])
    return allowed[:, None] if allowed.ndim == 3 else allowed


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True = attend) as an additive float mask (0 / −inf), built once and reused by every
    layer and denoising step (a bool mask is converted inside attention at every call)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def text_group_mask(token_group: Tensor, text_len: int, groups: int) -> Tensor:
    """Cross-attention mask for per-block prompts: token i sees only the text of its group.

    Args:
        token_group: ``(S,)`` int64, which prompt (0..groups-1) each token cross-attends to.
        text_len: tokens per prompt ``L``; prompts are concatenated along the text axis.

    Returns:
        ``(S, groups · L)`` bool.
    """
    key_group = torch.arange(groups, device=token_group.device).repeat_interleave(text_len)
    return token_group[:, None] == key_group[None, :]
