"""A transformer block's inference forward as straight-line oneDNN calls (no module dispatch).

:meth:`TransformerBlock.forward <lmdm.models.attention.TransformerBlock.forward>` walks nine
``nn.Module`` calls per layer (norms, attentions, linears), each with its own attribute lookups and
packed-path checks. At the 49-token passes of an LMDM denoising step that Python work is close to a
tenth of the layer's time (measured on the 2-core dev machine, ``DiT.run_layers`` of the width-512,
depth-8 bench model, medians of 20 interleaved passes: 49 tokens over 241 keys 30.5 → 28.1 ms; 241
tokens 110.7 → 107.3 ms). :func:`fused_block_forward` runs the *same operations in the same order* on
weights gathered once (:class:`FusedStack`), so its outputs are bit-identical to the module path.
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

from lmdm.models.attention import KVHook, Projected, TransformerBlock, _merge_heads
from lmdm.models.packed import PackedLinear, tensor_version
from lmdm.models.rotary import apply_rotary

__all__ = ["BlockPacks", "FusedStack", "fused_block_forward"]


@dataclass(frozen=True)
class _Packed:
    """One packed linear: the oneDNN weight and the (unpacked) bias."""

    weight: Tensor
    bias: Tensor | None


@dataclass(frozen=True)
class _CrossPacks:
    """Cross-attention weights: its LayerNorm, packed ``to_q`` / ``to_out``, query and key/value heads."""

    norm: tuple[Tensor, Tensor]
    to_q: _Packed
    to_out: _Packed
    heads: int
    kv_heads: int


@dataclass(frozen=True)
class BlockPacks:
    """A block's weights for :func:`fused_block_forward` (LayerNorm scale/shift pairs and packed linears)."""

    heads: int
    pre_norm: tuple[Tensor, Tensor]
    qkv: _Packed
    attn_out: _Packed
    cross: _CrossPacks | None
    ff_norm: tuple[Tensor, Tensor]
    value: _Packed  # GLU value half
    gate: _Packed  # GLU gate half (swish post-op)
    ff_out: _Packed


class FusedStack:
    """The :class:`BlockPacks` of a stack of blocks, gathered once and re-gathered only when a module,
    parameter or buffer they were read from has been replaced or changed in place (an optimizer step,
    ``load_state_dict``, :func:`~lmdm.models.packed.pack_linears`), which costs a few µs per pass to check.

    Args:
        layers: the blocks (a ``ModuleList``), read through their module/parameter/buffer dicts.
    """

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self._reads: list[tuple[dict[str, Any], str, object]] = []  # (dict, key, what it held)
        self._tensors: list[Tensor] = []
        self._versions: tuple[int, ...] | None = None
        self._packs: list[BlockPacks] | None = None

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles carry the layers, not the packs
        return {"layers": self.layers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["layers"])  # type: ignore[misc]

    def packs(self, h: Tensor) -> list[BlockPacks] | None:
        """Every block's packs for tokens ``h``, or ``None`` where the fused path does not apply (autograd
        on, tokens not float32 on CPU, or a linear layer not packed)."""
        if torch.is_grad_enabled() or h.dtype is not torch.float32 or not h.is_cpu:
            return None
        if not self._current():
            self._gather()
        return self._packs

    def _current(self) -> bool:
        if self._versions is None or any(d.get(k) is not held for d, k, held in self._reads):
            return False
        return tuple(tensor_version(t) for t in self._tensors) == self._versions

    def _read(self, parent: nn.Module, name: str) -> Any:
        for store in (parent._modules, parent._parameters, parent._buffers):
            if name in store:
                held = store[name]
                self._reads.append((store, name, held))
                if isinstance(held, Tensor):
                    self._tensors.append(held)
                return held
        raise AttributeError(f"{type(parent).__name__} has no {name!r}")

    def _gather(self) -> None:
        self._reads, self._tensors = [], []
        blocks = [self._read(self.layers, str(i)) for i in range(len(self.layers))]
        packs = [self._block(layer) for layer in blocks]
        self._packs = None if any(p is None for p in packs) else packs  # type: ignore[assignment]
        self._versions = tuple(tensor_version(t) for t in self._tensors)

    def _norm(self, layer: nn.Module, name: str) -> tuple[Tensor, Tensor]:
        norm = self._read(layer, name)
        return self._read(norm, "gamma"), self._read(norm, "beta")

    def _linear(self, parent: nn.Module, name: str) -> PackedLinear | None:
        linear = self._read(parent, name)
        if not isinstance(linear, PackedLinear) or linear.weight.dtype is not torch.float32 or not linear.weight.is_cpu:
            return None
        self._read(linear, "weight")
        if linear.bias is not None:
            self._read(linear, "bias")
        return linear

    def _block(self, layer: TransformerBlock) -> BlockPacks | None:
        attn, ff = self._read(layer, "self_attn"), self._read(self._read(layer, "ff"), "ff")
        qkv, attn_out = self._linear(attn, "to_qkv"), self._linear(attn, "to_out")
        glu, ff_out = self._linear(self._read(ff, "0"), "proj"), self._linear(ff, "2")
        cross = None
        if layer.cross_attend:
            ca = self._read(layer, "cross_attn")
            to_q, to_out = self._linear(ca, "to_q"), self._linear(ca, "to_out")
            if to_q is None or to_out is None:
                return None
            cross = _CrossPacks(self._norm(layer, "cross_attend_norm"), _packed(to_q), _packed(to_out), ca.heads, ca.kv_heads)
        if qkv is None or attn_out is None or glu is None or ff_out is None:
            return None
        value_w, gate_w, value_b, gate_b = glu._halves_packed()
        return BlockPacks(
            heads=attn.heads,
            pre_norm=self._norm(layer, "pre_norm"),
            qkv=_packed(qkv),
            attn_out=_packed(attn_out),
            cross=cross,
            ff_norm=self._norm(layer, "ff_norm"),
            value=_Packed(value_w, value_b),
            gate=_Packed(gate_w, gate_b),
            ff_out=_packed(ff_out),
        )


def _packed(linear: PackedLinear) -> _Packed:
    return _Packed(linear._weight_packed(), linear.bias)


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
    """:meth:`TransformerBlock.forward <lmdm.models.attention.TransformerBlock.forward>` (same arguments,
    same bits) for float32 CPU inference with packed weights ``w``: ``(B, S, D) → (B, S − outputs_from, D)``."""
    _linear, _linear_binary = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._linear_pointwise.binary
    B, S, D = x.shape
    qkv = _linear(F.layer_norm(x, (D,), *w.pre_norm), w.qkv.weight, w.qkv.bias, "none", [], "")
    qkv = qkv.view(B, S, 3, w.heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, S, Dh)
    q, k = apply_rotary(qkv[:2], freqs).unbind(0)
    keys, values = kv_hook(Projected(q, k, qkv[1], qkv[2])) if kv_hook is not None else (k, qkv[2])
    if outputs_from:
        x, q = x[:, outputs_from:].contiguous(), q[:, :, outputs_from:]
        mask = mask[..., outputs_from:, :] if mask is not None else None
        text_mask = text_mask[..., outputs_from:, :] if text_mask is not None else None
    out = _merge_heads(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))
    x = _linear_binary(out, x, w.attn_out.weight, w.attn_out.bias, "add")
    if w.cross is not None and text_kv is not None:
        c, Sq = w.cross, x.shape[1]
        qc = _linear(F.layer_norm(x, (D,), *c.norm), c.to_q.weight, c.to_q.bias, "none", [], "")
        qc = qc.view(B, Sq, c.heads, -1).transpose(1, 2)  # (B, H, S, Dh)
        out = _merge_heads(F.scaled_dot_product_attention(qc, *text_kv, attn_mask=text_mask, enable_gqa=c.heads != c.kv_heads))
        x = _linear_binary(out, x, c.to_out.weight, c.to_out.bias, "add")
    y = F.layer_norm(x, (D,), *w.ff_norm)
    gate = _linear(y, w.gate.weight, w.gate.bias, "swish", [], "")
    hidden = _linear_binary(y, gate, w.value.weight, w.value.bias, "mul")
    out_: Tensor = _linear_binary(hidden, x, w.ff_out.weight, w.ff_out.bias, "add")
    return out_
