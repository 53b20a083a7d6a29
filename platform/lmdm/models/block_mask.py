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

The predicate is written once (:func:`allowed`); :func:`attention_mask` evaluates it into a dense bool
mask, :func:`flex_block_mask` into a FlexAttention block mask (its ``mask_mod``), which
:meth:`~lmdm.models.attention.SelfAttention.attend` runs with ``flex_attention`` instead of SDPA.

Legend: S query tokens, K key tokens, B batch.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    _FLEX_IMPORTED = True
except ImportError:  # pragma: no cover - torch is pinned to a version that has it
    _FLEX_IMPORTED = False

__all__ = [
    "CLEAN",
    "GLOBAL",
    "NOISY",
    "TokenLayout",
    "Variant",
    "additive_mask",
    "allowed",
    "attention_mask",
    "flex_available",
    "flex_block_mask",
    "sliding_window_mask",
    "text_group_mask",
]

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

    @staticmethod
    def runs(runs: list[tuple[int, Tensor | int, Tensor | bool, int]], device: torch.device | None = None) -> TokenLayout:
        """A layout from runs of ``(kind, block, valid, length)``; ``block`` and ``valid`` are one value for the
        run or a ``(length,)`` tensor."""
        kind, block, valid = [], [], []
        for k, b, v, n in runs:
            kind.append(torch.full((n,), k, dtype=torch.long, device=device))
            block.append(b if isinstance(b, Tensor) else torch.full((n,), b, dtype=torch.long, device=device))
            valid.append(v if isinstance(v, Tensor) else torch.full((n,), v, dtype=torch.bool, device=device))
        return TokenLayout(torch.cat(kind), torch.cat(block), torch.cat(valid))

    def __len__(self) -> int:
        return int(self.kind.shape[0])


def allowed(
    q_kind: Tensor,
    q_block: Tensor,
    k_kind: Tensor,
    k_block: Tensor,
    k_valid: Tensor,
    same_token: Tensor | None,
    variant: Variant,
    context_blocks: int,
) -> Tensor:
    """The attention predicate (True = the query may attend to the key), elementwise over broadcast tensors.

    The one definition of every mask: :func:`attention_mask` evaluates it over ``(S, 1)`` queries ×
    ``(1, K)`` keys, :func:`flex_block_mask`'s ``mask_mod`` over scalar indices.

    Args:
        q_kind, q_block: query kinds and blocks (int64), broadcastable with the key tensors.
        k_kind, k_block: key kinds and blocks (int64).
        k_valid: bool, whether the key is valid (empty/dropped context is not).
        same_token: bool, whether the key is the query itself (always allowed), or ``None`` (never).
        variant: ``full``, ``encdec`` or ``block_causal``.
        context_blocks: ``C``, blocks of context a block sees (``block_causal``).

    Returns:
        bool, the broadcast shape of the inputs.

    Raises:
        ValueError: an unknown ``variant``.
    """
    q_ctx, k_ctx = q_kind == CLEAN, k_kind == CLEAN
    same_target = (q_block == k_block) & ~q_ctx & ~k_ctx
    if variant == "full":
        rule = torch.ones_like(same_target)
    elif variant == "encdec":
        rule = k_ctx | same_target
    elif variant == "block_causal":
        in_band = (k_block >= q_block - context_blocks) & (k_block <= q_block)
        clean_to_clean = q_ctx & k_ctx & in_band
        target_to_clean = ~q_ctx & k_ctx & in_band & (k_block < q_block)
        rule = clean_to_clean | target_to_clean | same_target
    else:
        raise ValueError(f"unknown attention variant {variant!r}; expected 'full', 'encdec' or 'block_causal'")
    rule = rule & k_valid
    return rule if same_token is None else rule | same_token


def attention_mask(queries: TokenLayout, keys: TokenLayout, variant: Variant, context_blocks: int, same_tokens: bool = True) -> Tensor:
    """The bool attention mask (True = may attend) of ``queries`` over ``keys`` (the predicate :func:`allowed`).

    Args:
        queries, keys: token layouts (the same object for a plain self-attention forward).
        variant: ``full``, ``encdec`` or ``block_causal``.
        context_blocks: ``C``, blocks of context a block sees (``block_causal``).
        same_tokens: queries are the first tokens of keys (self-attention); then a query may always
            attend to itself. Cached engines pass False and guarantee it through the layout.

    Returns:
        ``(S, K)``, or ``(B, 1, S, K)`` when validity is per sample.

    Raises:
        ValueError: an unknown ``variant``.
    """
    S, K = len(queries), len(keys)
    valid = keys.valid
    # per-sample validity broadcasts the (S, K) rule to (B, S, K), made (B, 1, S, K) below
    k_valid = valid[:, None, :] if valid.ndim == 2 else valid[None, :]
    eye = torch.eye(S, K, dtype=torch.bool, device=queries.kind.device) if same_tokens else None
    mask = allowed(
        queries.kind[:, None], queries.block[:, None], keys.kind[None, :], keys.block[None, :], k_valid, eye, variant, context_blocks
    )
    return mask[:, None] if mask.ndim == 3 else mask


def flex_block_mask(
    queries: TokenLayout, keys: TokenLayout, variant: Variant, context_blocks: int, same_tokens: bool = True, block_size: int = 128
) -> BlockMask:
    """:func:`attention_mask` as a FlexAttention :class:`~torch.nn.attention.flex_attention.BlockMask`.

    Its ``mask_mod`` evaluates the same predicate (:func:`allowed`) on the layouts' entries at each
    ``(b, h, q_idx, kv_idx)``; blocks of keys no query of a block may see are skipped by the kernel.

    Args:
        queries, keys, variant, context_blocks, same_tokens: as for :func:`attention_mask`.
        block_size: tokens per FlexAttention block (query and key axes; 128 is the kernels' default).

    Returns:
        A block mask of shape ``(B, 1, S, K)`` (``B`` = 1, broadcast, unless validity is per sample),
        on the layouts' device, for :func:`~torch.nn.attention.flex_attention.flex_attention`.

    Raises:
        ValueError: an unknown ``variant``.
    """
    if variant not in ("full", "encdec", "block_causal"):
        raise ValueError(f"unknown attention variant {variant!r}; expected 'full', 'encdec' or 'block_causal'")
    q_kind, q_block, k_kind, k_block, valid = queries.kind, queries.block, keys.kind, keys.block, keys.valid
    per_sample = valid.ndim == 2

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        k_valid = valid[b, kv_idx] if per_sample else valid[kv_idx]
        same = q_idx == kv_idx if same_tokens else None
        return allowed(q_kind[q_idx], q_block[q_idx], k_kind[kv_idx], k_block[kv_idx], k_valid, same, variant, context_blocks)

    batch = int(valid.shape[0]) if per_sample else None
    return create_block_mask(mask_mod, batch, None, len(queries), len(keys), device=q_kind.device, BLOCK_SIZE=block_size)


@functools.cache
def _flex_runs(device_type: str, dtype: torch.dtype, grad: bool) -> bool:
    try:
        q = torch.zeros(1, 1, 4, 8, device=device_type, dtype=dtype, requires_grad=grad)
        mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 4, 4, device=device_type)
        with warnings.catch_warnings():  # eager flex_attention warns that it is unfused
            warnings.simplefilter("ignore")
            out = flex_attention(q, q, q, block_mask=mask)
            if grad:
                torch.autograd.grad(out.sum(), q)
    except Exception:  # any failure means: not usable here
        return False
    return True


def flex_available(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, grad: bool = False) -> bool:
    """Whether FlexAttention is importable and runs on ``device`` in ``dtype`` (a tiny probe, once per case).

    Args:
        device: the device of the attention tensors.
        dtype: their floating dtype.
        grad: the pass needs gradients (torch 2.13 has no FlexAttention backward on CPU).

    Returns:
        False where the import failed or the probe raised.
    """
    return _FLEX_IMPORTED and _flex_runs(torch.device(device).type, dtype, grad)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True = attend) as an additive float mask (0 / −inf), built once and reused by every
    layer and denoising step (a bool mask is converted inside attention at every call)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def sliding_window_mask(queries: Tensor, keys: Tensor, window: int) -> Tensor:
    """The LMM baseline's mask: a query at stream position ``q`` sees the keys at ``q − window < k ≤ q``
    (causal, the last ``window`` tokens including itself).

    Args:
        queries: ``(S,)`` stream positions of the queries; keys: ``(K,)`` of the keys (negative: an empty slot).

    Returns:
        ``(S, K)`` bool (True = attend).
    """
    q, k = queries[:, None], keys[None, :]
    return (k <= q) & (k > q - window) & (k >= 0)


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
