"""Transformer components with Stable Audio Open's layout and parameter names.

Names match stable-audio-tools' ``ContinuousTransformer`` so its state dicts load by prefix strip:
``pre_norm.{gamma,beta}``, ``self_attn.to_qkv`` (fused, no bias), ``self_attn.to_out``,
``cross_attend_norm``, ``cross_attn.{to_q,to_kv,to_out}``, ``ff_norm``, ``ff.ff.0.proj`` (GLU) and
``ff.ff.2``. LayerNorms have a learned ``gamma`` and a zero ``beta`` *buffer* (stored in the state
dict, as theirs is).

Self-attention is split into :meth:`SelfAttention.project` (q, k, v; rotary applied) and
:meth:`SelfAttention.attend`. A block takes an optional :class:`~lmdm.models.kv_cache.LayerCache`: a
streaming engine uses it to write the pass's keys/values into a preallocated cache and attend over
cached context keys; without one the queries attend to their own keys (the reference path).

The maths is written once, in ordinary ops ``torch.compile`` traces with ``fullgraph=True``; device-specific
speed-ups (:mod:`lmdm.runtime`) plug in from outside and are tested equal to it.

Legend: B batch, S query tokens, K key tokens, D width, H heads, Hkv key/value heads, Dh head dim,
L text tokens, Dc text width.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from lmdm.models.kv_cache import LayerCache
from lmdm.models.rotary import apply_rotary

__all__ = [
    "CrossAttention",
    "FeedForward",
    "LayerNorm",
    "Projected",
    "SelfAttention",
    "TransformerBlock",
    "glu",
    "merge_heads",
    "query_rows",
]


def merge_heads(x: Tensor) -> Tensor:
    """``(B, H, S, Dh) → (B, S, H·Dh)``."""
    B, H, S, Dh = x.shape
    return x.transpose(1, 2).reshape(B, S, H * Dh)


class Projected(NamedTuple):
    """Self-attention projections of a set of tokens, each ``(B, H, S, Dh)``."""

    q: Tensor  # rotated
    k: Tensor  # rotated
    k_raw: Tensor  # un-rotated (what a cache stores when it re-rotates later)
    v: Tensor


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    return torch.compile(flex_attention, dynamic=False)


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask) -> Tensor:
    """FlexAttention over a block mask; on CUDA through ``torch.compile`` (its documented use: uncompiled it
    runs a reference path that materialises every score), unless the caller is already being compiled."""
    if q.is_cuda and not torch.compiler.is_compiling():
        return _compiled_flex()(q, k, v, block_mask=block_mask)
    out: Tensor = flex_attention(q, k, v, block_mask=block_mask)
    return out


def glu(projected: Tensor) -> Tensor:
    """``value · silu(gate)`` of a GLU projection whose last axis is ``[value; gate]``: ``(..., 2H) → (..., H)``."""
    value, gate = projected.chunk(2, dim=-1)
    return value * F.silu(gate)


class LayerNorm(nn.Module):
    """LayerNorm with learned scale ``gamma`` and a zero ``beta`` buffer (eps 1e-5)."""

    beta: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], weight=self.gamma, bias=self.beta)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and partial rotary."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"width {dim} must be a multiple of head_dim {head_dim}")
        self.heads = dim // head_dim
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def project(self, x: Tensor, freqs: Tensor) -> Projected:
        """q, k, v of ``x`` ``(B, S, D)``; q and k rotated together by the rotary table ``freqs``."""
        B, S, _ = x.shape
        qkv = self.to_qkv(x).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, S, Dh)
        q, k = apply_rotary(qkv[:2], freqs).unbind(0)
        return Projected(q, k, qkv[1], qkv[2])

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BlockMask | None, residual: Tensor | None = None) -> Tensor:
        """Scaled dot-product attention and the output projection.

        Args:
            q: ``(B, H, S, Dh)``; k, v: ``(B, H, K, Dh)``.
            mask: bool (True = may attend) or additive float, broadcastable to ``(B, H, S, K)``; or a
                FlexAttention block mask of shape ``(B or 1, 1, S, K)``
                (:func:`~lmdm.models.block_mask.flex_block_mask`), run by ``flex_attention``; ``None`` = all.
            residual: ``(B, S, D)`` added to the output.

        Returns:
            ``(B, S, D)``.
        """
        if isinstance(mask, BlockMask):
            attended = _flex_attention(q, k, v, mask)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out: Tensor = self.to_out(merge_heads(attended))
        return out if residual is None else residual + out


class CrossAttention(nn.Module):
    """Cross-attention to text tokens with grouped key/value heads (``Hkv = Dc // Dh``)."""

    def __init__(self, dim: int, context_dim: int, head_dim: int) -> None:
        super().__init__()
        if context_dim % head_dim or dim % head_dim:
            raise ValueError(f"width {dim} and text width {context_dim} must be multiples of head_dim {head_dim}")
        self.heads, self.kv_heads = dim // head_dim, context_dim // head_dim
        if self.heads % self.kv_heads:
            raise ValueError(f"query heads ({self.heads}) must be a multiple of key/value heads ({self.kv_heads})")
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * context_dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of text tokens ``(B, L, Dc)`` → each ``(B, Hkv, L, Dh)`` (cache these per prompt)."""
        B, L, _ = context.shape
        k, v = self.to_kv(context).view(B, L, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        """Attend ``x`` ``(B, S, D)`` to text keys/values; ``mask`` (bool, True = attend) ``(S, K)`` or ``(B, 1, S, K)``;
        ``residual`` ``(B, S, D)`` is added to the output."""
        B, S, _ = x.shape
        q = self.to_q(x).view(B, S, self.heads, -1).transpose(1, 2)
        out: Tensor = self.to_out(
            merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.heads != self.kv_heads))
        )
        return out if residual is None else residual + out


class _GLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return glu(self.proj(x))


class FeedForward(nn.Module):
    """GLU feed-forward (SiLU gate, 4× inner width); indices mirror Stable Audio's ``ff.ff.{0,2}``."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.ff = nn.Sequential(_GLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim), nn.Identity())

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``(B, S, D) → (B, S, D)``, plus ``residual`` if given."""
        out: Tensor = self.ff[2](self.ff[0](x))  # direct calls: the Identity slots only keep Stable Audio's indices
        return out if residual is None else residual + out


@overload
def query_rows(mask: Tensor | None, start: int) -> Tensor | None: ...
@overload
def query_rows(mask: Tensor | BlockMask | None, start: int) -> Tensor | BlockMask | None: ...
def query_rows(mask: Tensor | BlockMask | None, start: int) -> Tensor | BlockMask | None:
    """The rows of ``mask`` (``(..., S, K)``, or broadcast over queries: ``(K,)``, ``(..., 1, K)``) for the
    queries from ``start`` on.

    Raises:
        ValueError: ``mask`` is a FlexAttention block mask and ``start > 0`` (block masks are built for
            whole passes; pass a dense mask to a pass with ``outputs_from``).
    """
    if isinstance(mask, BlockMask):
        if start:
            raise ValueError(
                f"a FlexAttention BlockMask cannot be sliced to the queries from {start} on (outputs_from > 0); "
                "use a dense mask (lmdm.models.block_mask.attention_mask) for such passes"
            )
        return mask
    if mask is None or mask.ndim < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., start:, :]


def keys_values(p: Projected, cache: LayerCache | None) -> tuple[Tensor, Tensor]:
    """The keys/values the queries attend over: their own, or the cache's region after writing theirs."""
    return (p.k, p.v) if cache is None else cache.update(p.k, p.v, p.k_raw)


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to text, GLU feed-forward (no adaLN)."""

    def __init__(self, dim: int, head_dim: int, context_dim: int | None) -> None:
        super().__init__()
        self.pre_norm = LayerNorm(dim)
        self.self_attn = SelfAttention(dim, head_dim)
        self.cross_attend = context_dim is not None
        if context_dim is not None:
            self.cross_attend_norm = LayerNorm(dim)
            self.cross_attn = CrossAttention(dim, context_dim, head_dim)
        self.ff_norm = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def keys_values(self, x: Tensor, freqs: Tensor, cache: LayerCache | None = None) -> tuple[Tensor, Tensor]:
        """The block's keys/values of ``x`` ``(B, S, D)`` only, written to ``cache`` as :meth:`forward` does
        (a last layer whose outputs nobody reads)."""
        return keys_values(self.self_attn.project(self.pre_norm(x), freqs), cache)

    def forward(
        self,
        x: Tensor,
        freqs: Tensor,
        mask: Tensor | BlockMask | None,
        text_kv: tuple[Tensor, Tensor] | None,
        text_mask: Tensor | None = None,
        cache: LayerCache | None = None,
        outputs_from: int = 0,
    ) -> Tensor:
        """One block.

        Args:
            x: ``(B, S, D)`` tokens.
            freqs: rotary table of the tokens (:class:`~lmdm.models.rotary.RotaryEmbedding`).
            mask: self-attention mask over the keys attended (the tokens' own, or the region ``cache`` reads;
                True = attend), dense or a FlexAttention block mask (see :meth:`SelfAttention.attend`; only
                with ``outputs_from = 0``).
            text_kv: this layer's text keys/values, each ``(B, Hkv, L, Dh)``; ``None`` skips cross-attention.
            text_mask: which text keys each token may see, ``(S, L)`` (for per-block prompts).
            cache: this layer's share of the pass's cache plan: where its keys/values go and which cached
                keys/values the queries attend over (default: their own).
            outputs_from: tokens before this index only give keys/values (to the cache); their outputs
                are not computed (a last layer whose early tokens' outputs nobody reads).

        Returns:
            ``(B, S − outputs_from, D)``.
        """
        p = self.self_attn.project(self.pre_norm(x), freqs)
        k, v = keys_values(p, cache)
        q = p.q
        if outputs_from:
            x, q = x[:, outputs_from:], q[:, :, outputs_from:]
            mask, text_mask = query_rows(mask, outputs_from), query_rows(text_mask, outputs_from)
        x = self.self_attn.attend(q, k, v, mask, residual=x)
        if self.cross_attend and text_kv is not None:
            x = self.cross_attn(self.cross_attend_norm(x), text_kv[0], text_kv[1], text_mask, residual=x)
        return self.ff(self.ff_norm(x), residual=x)
