"""The ``packed`` runtime: oneDNN packed weights and a straight-line block forward, for CPU inference.

:meth:`DiT.run_layers <lmdm.models.dit.DiT.run_layers>` walks nine ``nn.Module`` calls per layer, and each
``F.linear`` re-packs its weight. :class:`PackedLayers` replaces that loop from outside the model: it
packs every block's linears once (:mod:`lmdm.runtime.onednn`), folds the residual adds and the GLU into
the linears' output loops, and runs each block as straight-line calls (:func:`packed_block_forward`,
the module path's maths in the same order). The model's parameters stay what they are (state-dict keys,
checkpoints and training are untouched).

It runs only where it computes what the model computes, float32 CPU tensors with autograd off, and hands
the pass to the model's own ``run_layers`` everywhere else: gradients, other dtypes or devices, a block of
another class or with a forward hook. Packs are copies: they are gathered again whenever a weight of the
stack was replaced or changed in place (autograd's version counter: an optimizer or EMA step,
``load_state_dict``; checked at every pass, a few µs). Writes through ``param.data`` or into inference
tensors keep no version: call :meth:`PackedLayers.clear` after those.

Legend: B batch, S tokens, D width, H heads, Dh head dim, L text tokens.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask
from torch.nn.modules import module as module_lib

from lmdm.models.attention import (
    _GLU,
    CrossAttention,
    FeedForward,
    LayerNorm,
    Projected,
    SelfAttention,
    TransformerBlock,
    keys_values,
    merge_heads,
    query_rows,
)
from lmdm.models.dit import TextKV, run_blocks
from lmdm.models.kv_cache import CacheIO, LayerCache
from lmdm.models.lmm import LayerStack
from lmdm.models.rotary import apply_rotary
from lmdm.runtime.onednn import GluPack, LinearPack
from lmdm.runtime.versions import WeightWatch

__all__ = ["BlockPacks", "PackedLayers", "packed_block_forward", "packed_layers"]

# The module classes a block may hold for the packed forward to compute what it computes (exact types:
# a subclass may override forward).
_KNOWN = {TransformerBlock, LayerNorm, SelfAttention, CrossAttention, FeedForward, _GLU, nn.Linear, nn.Sequential, nn.Identity}


@dataclass(frozen=True)
class _CrossPacks:
    norm: tuple[Tensor, Tensor]  # LayerNorm (gamma, beta), each (D,)
    to_q: LinearPack
    to_out: LinearPack
    heads: int
    kv_heads: int


@dataclass(frozen=True)
class BlockPacks:
    """A block's weights for :func:`packed_block_forward`: LayerNorm (gamma, beta) pairs, each ``(D,)``, and
    packed linears (qkv ``D → 3D``, attention out ``D → D``, GLU ``D → 2·4D → 4D``, feed-forward out ``4D → D``)."""

    heads: int
    pre_norm: tuple[Tensor, Tensor]
    qkv: LinearPack
    attn_out: LinearPack
    cross: _CrossPacks | None
    ff_norm: tuple[Tensor, Tensor]
    glu: GluPack
    ff_out: LinearPack

    def __call__(
        self,
        x: Tensor,
        freqs: Tensor,
        mask: Tensor | BlockMask | None,
        text_kv: tuple[Tensor, Tensor] | None,
        text_mask: Tensor | None,
        cache: LayerCache | None,
        outputs_from: int,
    ) -> Tensor:
        assert not isinstance(mask, BlockMask)  # PackedLayers hands block masks to the model's own path
        return packed_block_forward(self, x, freqs, mask, text_kv, text_mask, cache, outputs_from)

    def project(self, x: Tensor, freqs: Tensor) -> Projected:
        """q, k (rotated), un-rotated k and v of ``x`` ``(B, S, D)``, each ``(B, H, S, Dh)``."""
        B, S, D = x.shape
        qkv = self.qkv(F.layer_norm(x, (D,), *self.pre_norm)).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(qkv[:2], freqs).unbind(0)
        return Projected(q, k, qkv[1], qkv[2])

    def keys_values(self, x: Tensor, freqs: Tensor, cache: LayerCache | None = None) -> tuple[Tensor, Tensor]:
        """A last layer run for its keys/values only (``outputs_from = S``)."""
        return keys_values(self.project(x, freqs), cache)

    @staticmethod
    def of(layer: TransformerBlock) -> BlockPacks:
        attn, ff = layer.self_attn, layer.ff.ff
        cross = None
        if layer.cross_attend:
            ca = layer.cross_attn
            cross = _CrossPacks(_norm(layer.cross_attend_norm), _pack(ca.to_q), _pack(ca.to_out), ca.heads, ca.kv_heads)
        return BlockPacks(
            heads=attn.heads,
            pre_norm=_norm(layer.pre_norm),
            qkv=_pack(attn.to_qkv),
            attn_out=_pack(attn.to_out),
            cross=cross,
            ff_norm=_norm(layer.ff_norm),
            glu=_glu(ff[0]),
            ff_out=_pack(ff[2]),
        )


def _pack(linear: nn.Module) -> LinearPack:
    assert isinstance(linear, nn.Linear)
    return LinearPack.of(linear.weight, linear.bias)


def _glu(module: nn.Module) -> GluPack:
    assert isinstance(module, _GLU)
    return GluPack.of(module.proj.weight, module.proj.bias)


def _norm(norm: LayerNorm) -> tuple[Tensor, Tensor]:
    return norm.gamma.detach(), norm.beta.detach()


def packed_block_forward(
    w: BlockPacks,
    x: Tensor,
    freqs: Tensor,
    mask: Tensor | None,
    text_kv: tuple[Tensor, Tensor] | None,
    text_mask: Tensor | None = None,
    cache: LayerCache | None = None,
    outputs_from: int = 0,
) -> Tensor:
    """:meth:`TransformerBlock.forward <lmdm.models.attention.TransformerBlock.forward>` on packed weights.

    Args:
        w: the block's packs.
        x, freqs, mask, text_kv, text_mask, cache, outputs_from: as for ``TransformerBlock.forward``;
            ``x`` ``(B, S, D)`` float32, contiguous.

    Returns:
        ``(B, S − outputs_from, D)``.
    """
    B, _, D = x.shape
    p = w.project(x, freqs)
    q, (keys, values) = p.q, keys_values(p, cache)
    if outputs_from:  # contiguous: oneDNN's fused add takes a residual of the output's layout
        x, q = x[:, outputs_from:].contiguous(), q[:, :, outputs_from:]
        mask, text_mask = query_rows(mask, outputs_from), query_rows(text_mask, outputs_from)
    x = w.attn_out.add(merge_heads(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)), x)
    if w.cross is not None and text_kv is not None:
        c, Sq = w.cross, x.shape[1]
        qc = c.to_q(F.layer_norm(x, (D,), *c.norm)).view(B, Sq, c.heads, -1).transpose(1, 2)  # (B, H, S, Dh)
        out = F.scaled_dot_product_attention(qc, *text_kv, attn_mask=text_mask, enable_gqa=c.heads != c.kv_heads)
        x = c.to_out.add(merge_heads(out), x)
    return w.ff_out.add(w.glu(F.layer_norm(x, (D,), *w.ff_norm)), x)


class PackedLayers:
    """``run_layers`` of one :class:`~lmdm.models.dit.DiT` on packed weights (the signature of
    :meth:`DiT.run_layers <lmdm.models.dit.DiT.run_layers>`); see the module docstring for when it applies."""

    def __init__(self, dit: LayerStack) -> None:
        self._dit = weakref.ref(dit)
        self.clear()

    def clear(self) -> None:
        """Forget the packs (the next pass gathers them again)."""
        self._packs: list[BlockPacks] | None = None
        self._weights = WeightWatch()

    @property
    def dit(self) -> LayerStack:
        dit = self._dit()
        if dit is None:
            raise RuntimeError("the model these packed layers were bound to no longer exists")
        return dit

    def _applies(self, h: Tensor) -> bool:
        return not torch.is_grad_enabled() and h.dtype is torch.float32 and h.is_cpu and h.is_contiguous()

    def packs(self) -> list[BlockPacks] | None:
        """Every block's packs, gathered again if a weight changed; ``None`` where the packed forward would
        not compute what the modules compute (another module class, a forward hook, a non-float32 or
        non-CPU weight)."""
        # nn.Module's private hook registries (no public way to ask); where they are gone, assume hooks
        if getattr(module_lib, "_global_forward_hooks", True) or getattr(module_lib, "_global_forward_pre_hooks", True):
            return None
        tensors: list[Tensor] = []
        stack: nn.Module = self.dit.layers  # type: ignore[assignment]
        for m in stack.modules():
            if m is not stack and (type(m) not in _KNOWN or getattr(m, "_forward_hooks", True) or getattr(m, "_forward_pre_hooks", True)):
                return None
            tensors.extend(t for t in m._parameters.values() if t is not None)
            tensors.extend(t for t in m._buffers.values() if t is not None)
        if any(t.dtype is not torch.float32 or not t.is_cpu for t in tensors):
            return None
        if self._weights.changed(tensors) or self._packs is None:
            self._packs = [BlockPacks.of(layer) for layer in self.dit.layers]
        return self._packs

    def __call__(
        self,
        h: Tensor,
        freqs: Tensor,
        mask: Tensor | BlockMask | None,
        text_kv: TextKV | None,
        text_mask: Tensor | None = None,
        cache: CacheIO | None = None,
        outputs_from: int = 0,
    ) -> Tensor:
        packs = self.packs() if self._applies(h) else None
        if packs is None or isinstance(mask, BlockMask):
            return self.dit.run_layers(h, freqs, mask, text_kv, text_mask, cache, outputs_from)
        return run_blocks(packs, h, freqs, mask, text_kv, text_mask, cache, outputs_from)


_BOUND: weakref.WeakKeyDictionary[LayerStack, PackedLayers] = weakref.WeakKeyDictionary()


def packed_layers(dit: LayerStack) -> PackedLayers:
    """The packed layers of ``dit`` (one per model: every engine on it shares the packs)."""
    bound = _BOUND.get(dit)
    if bound is None:
        bound = _BOUND[dit] = PackedLayers(dit)
    return bound
