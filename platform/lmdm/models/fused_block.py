"""A transformer block's inference forward as straight-line packed-linear calls (no module dispatch).

:meth:`TransformerBlock.forward <lmdm.models.attention.TransformerBlock.forward>` walks nine
``nn.Module`` calls per layer (norms, attentions, linears), each with its own attribute lookups and
packed-path checks. At the 49-token passes of an LMDM denoising step that Python work is close to a
tenth of the layer's time (measured on the 2-core dev machine, ``DiT.run_layers`` of the width-512,
depth-8 bench model, medians of 20 interleaved passes: 49 tokens over 241 keys 30.5 → 28.1 ms; 241
tokens 110.7 → 107.3 ms). :func:`fused_block_forward` runs the *same operations in the same order* on
weights gathered once (:class:`FusedStack`), so its outputs are bit-identical to the module path; where the
qkv linear runs on our kernel, the queries' and keys' rotary is one C call
(:func:`~lmdm.models.cpu_gemm.rotary_qk`, the same bits as :func:`~lmdm.models.rotary.apply_rotary`'s
seven tensor ops).
:meth:`DiT.run_layers <lmdm.models.dit.DiT.run_layers>` uses it for float32 CPU inference of a model
whose linears are packed (:func:`~lmdm.models.packed.pack_linears`), and the module path everywhere
else (autograd, other dtypes or devices, unpacked models).

Legend: B batch, S tokens, D width, H heads, Dh head dim, L text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_lib

from lmdm.models import cpu_gemm
from lmdm.models.attention import (
    _GLU,
    CrossAttention,
    FeedForward,
    KVHook,
    LayerNorm,
    Projected,
    SelfAttention,
    TransformerBlock,
    _merge_heads,
    query_rows,
)
from lmdm.models.packed import GluPack, LinearPack, PackedLinear, tensor_version
from lmdm.models.rotary import apply_rotary

__all__ = ["BlockPacks", "FusedStack", "fused_block_forward"]


@dataclass(frozen=True)
class _CrossPacks:
    """Cross-attention weights: its LayerNorm, packed ``to_q`` / ``to_out``, query and key/value heads."""

    norm: tuple[Tensor, Tensor]
    to_q: LinearPack
    to_out: LinearPack
    heads: int
    kv_heads: int


@dataclass(frozen=True)
class BlockPacks:
    """A block's weights for :func:`fused_block_forward`: LayerNorm (gamma, beta) pairs, each ``(D,)``, and
    packed linears (qkv ``D → 3D``, attention out ``D → D``, GLU ``D → 2·4D → 4D``, feed-forward out ``4D → D``)."""

    heads: int
    pre_norm: tuple[Tensor, Tensor]
    qkv: LinearPack
    attn_out: LinearPack
    cross: _CrossPacks | None
    ff_norm: tuple[Tensor, Tensor]
    glu: GluPack
    ff_out: LinearPack


class FusedStack:
    """The :class:`BlockPacks` of a stack of blocks, gathered once and re-gathered when a module, parameter
    or buffer they were read from has been replaced (``load_state_dict(assign=True)``,
    :func:`~lmdm.models.packed.pack_linears`, a new layer list) or changed in place through autograd's
    version counter (an optimizer step, ``load_state_dict``), which costs a few µs per pass to check.

    The fused path stands aside (:meth:`packs` returns ``None``, so the module path runs) where it would
    not compute what the modules compute: a layer or sub-module of another class (a subclass with its
    own ``forward``), a forward hook on any of them (or a global one), an unpacked linear.

    Not seen (as for autograd): writes through ``param.data`` and in-place writes to inference tensors.
    After those, call :meth:`clear` (and ``PackedLinear`` re-packs only on a version change: re-assign the
    parameter instead).

    Args:
        owner: the module holding the blocks' ``ModuleList``.
        name: its attribute name on ``owner``.
    """

    def __init__(self, owner: nn.Module, name: str = "layers") -> None:
        self.owner, self.name = owner, name
        self.clear()

    def clear(self) -> None:
        """Forget the gathered packs (the next pass gathers them again)."""
        self._reads: list[tuple[dict[str, Any], str, object]] = []  # (dict, key, what it held)
        self._tensors: list[Tensor] = []
        self._modules_read: list[nn.Module] = []
        self._list: nn.Module | None = None
        self._count = -1
        self._versions: tuple[int, ...] | None = None
        self._packs: list[BlockPacks] | None = None

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles carry the owner, not the packs
        return {"owner": self.owner, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.owner, self.name = state["owner"], state["name"]
        self.clear()

    def packs(self, h: Tensor) -> list[BlockPacks] | None:
        """Every block's packs, or ``None`` where the fused path does not apply.

        Args:
            h: the tokens ``(B, S, D)`` about to run: the fused path needs them float32, contiguous, on CPU,
                with autograd off.

        Returns:
            One :class:`BlockPacks` per block, in order; ``None``: run the module path.
        """
        if torch.is_grad_enabled() or h.dtype is not torch.float32 or not h.is_cpu or not h.is_contiguous():
            return None
        if not self._current():
            self._gather()
        if self._packs is None or _hooked(self._modules_read):
            return None
        return self._packs

    def _current(self) -> bool:
        if self._versions is None or any(d.get(k) is not held for d, k, held in self._reads):
            return False
        if self._list is None or len(self._list._modules) != self._count:
            return False
        return tuple(tensor_version(t) for t in self._tensors) == self._versions

    def _read(self, parent: nn.Module, name: str, kinds: tuple[type, ...] = ()) -> Any:
        """``parent.name``, recorded so that a replacement is noticed; ``None`` if absent or not exactly of
        one of ``kinds`` (a subclass may compute something else)."""
        for store in (parent._modules, parent._parameters, parent._buffers):
            if name in store:
                held = store[name]
                self._reads.append((store, name, held))
                if isinstance(held, Tensor):
                    self._tensors.append(held)
                if isinstance(held, nn.Module):
                    self._modules_read.append(held)
                return held if not kinds or type(held) in kinds else None
        self._reads.append((parent._parameters, name, None))  # absent: noticed if it is assigned later
        return None

    def _gather(self) -> None:
        self.clear()
        self._list = self._read(self.owner, self.name, (nn.ModuleList,))
        if self._list is None:
            self._versions = ()
            return
        self._count = len(self._list._modules)
        packs = [self._block(self._read(self._list, str(i), (TransformerBlock,))) for i in range(self._count)]
        self._packs = None if any(p is None for p in packs) else packs  # type: ignore[assignment]
        self._versions = tuple(tensor_version(t) for t in self._tensors)

    def _norm(self, layer: nn.Module, name: str) -> tuple[Tensor, Tensor] | None:
        norm = self._read(layer, name, (LayerNorm,))
        return None if norm is None else (self._read(norm, "gamma"), self._read(norm, "beta"))

    def _packed_linear(self, parent: nn.Module | None, name: str) -> PackedLinear | None:
        """``parent.name`` if it is a float32 CPU :class:`PackedLinear` (its weight and bias recorded)."""
        linear = None if parent is None else self._read(parent, name, (PackedLinear,))
        if linear is None or linear.weight.dtype is not torch.float32 or not linear.weight.is_cpu:
            return None
        self._read(linear, "weight")
        self._read(linear, "bias")
        return linear

    def _linear(self, parent: nn.Module | None, name: str) -> LinearPack | None:
        linear = self._packed_linear(parent, name)
        return None if linear is None else linear.pack()

    def _block(self, layer: TransformerBlock | None) -> BlockPacks | None:
        if layer is None:
            return None
        attn = self._read(layer, "self_attn", (SelfAttention,))
        ff = self._read(layer, "ff", (FeedForward,))
        seq = None if ff is None else self._read(ff, "ff", (nn.Sequential,))
        glu_module = None if seq is None else self._read(seq, "0", (_GLU,))
        glu = self._packed_linear(glu_module, "proj")
        qkv, attn_out, ff_out = self._linear(attn, "to_qkv"), self._linear(attn, "to_out"), self._linear(seq, "2")
        pre_norm, ff_norm = self._norm(layer, "pre_norm"), self._norm(layer, "ff_norm")
        cross = None
        if layer.cross_attend:
            ca = self._read(layer, "cross_attn", (CrossAttention,))
            to_q, to_out, norm = self._linear(ca, "to_q"), self._linear(ca, "to_out"), self._norm(layer, "cross_attend_norm")
            if ca is None or to_q is None or to_out is None or norm is None:
                return None
            cross = _CrossPacks(norm, to_q, to_out, ca.heads, ca.kv_heads)
        if attn is None or glu is None or qkv is None or attn_out is None or ff_out is None or pre_norm is None or ff_norm is None:
            return None
        return BlockPacks(
            heads=attn.heads,
            pre_norm=pre_norm,
            qkv=qkv,
            attn_out=attn_out,
            cross=cross,
            ff_norm=ff_norm,
            glu=glu.glu_pack(),
            ff_out=ff_out,
        )


def _hooked(modules: list[nn.Module]) -> bool:
    """Whether a forward (pre-)hook is registered on any of ``modules`` or globally (the fused path would skip it)."""
    if module_lib._global_forward_hooks or module_lib._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def fused_block_forward(
    w: BlockPacks,
    x: Tensor,
    freqs: Tensor,
    mask: Tensor | None,
    text_kv: tuple[Tensor, Tensor] | None,
    text_mask: Tensor | None = None,
    kv_hook: KVHook | None = None,
    outputs_from: int = 0,
) -> Tensor:
    """:meth:`TransformerBlock.forward <lmdm.models.attention.TransformerBlock.forward>`, same bits, for
    float32 CPU inference with packed weights.

    Args:
        w: the block's packs (:meth:`FusedStack.packs`).
        x, freqs, mask, text_kv, text_mask, kv_hook, outputs_from: as for ``TransformerBlock.forward``;
            ``x`` ``(B, S, D)`` contiguous.

    Returns:
        ``(B, S − outputs_from, D)``.
    """
    B, S, D = x.shape
    flat = w.qkv(F.layer_norm(x, (D,), *w.pre_norm))
    qkv = flat.view(B, S, 3, w.heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, S, Dh)
    if w.qkv.panels and freqs.ndim == 3:  # our kernel: the rotary in one call, same bits as apply_rotary
        q, k = cpu_gemm.rotary_qk(flat, w.heads, freqs).unbind(0)
    else:
        q, k = apply_rotary(qkv[:2], freqs).unbind(0)
    keys, values = kv_hook(Projected(q, k, qkv[1], qkv[2])) if kv_hook is not None else (k, qkv[2])
    if outputs_from:
        x, q = x[:, outputs_from:].contiguous(), q[:, :, outputs_from:]
        mask, text_mask = query_rows(mask, outputs_from), query_rows(text_mask, outputs_from)
    out = _merge_heads(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))
    x = w.attn_out.add(out, x)
    if w.cross is not None and text_kv is not None:
        c, Sq = w.cross, x.shape[1]
        qc = c.to_q(F.layer_norm(x, (D,), *c.norm))
        qc = qc.view(B, Sq, c.heads, -1).transpose(1, 2)  # (B, H, S, Dh)
        out = _merge_heads(F.scaled_dot_product_attention(qc, *text_kv, attn_mask=text_mask, enable_gqa=c.heads != c.kv_heads))
        x = c.to_out.add(out, x)
    hidden = w.glu(F.layer_norm(x, (D,), *w.ff_norm))
    return w.ff_out.add(hidden, x)
