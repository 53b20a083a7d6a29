"""Prepacked linear layers for CPU inference (oneDNN).

``F.linear`` on CPU runs a BLAS ``sgemm`` that re-packs the weight on every call; at the 49-token
matmuls of an LMDM denoising step that re-packing and the BLAS's small-``M`` tiling run well below
the FLOP rate of the 241-token matmuls of outpainting. oneDNN's linear with a weight reordered once
into its blocked layout runs both near the same rate (measured on the 2-core dev machine, 512→1536:
212 vs 227 GFLOP/s, against 145 vs 187 for ``F.linear``). :func:`pack_linears` swaps a model's
``nn.Linear`` layers for :class:`PackedLinear`, which keeps the same parameters (state-dict keys and
checkpoints are unchanged) and uses the packed copy only where it is exact to float32 rounding:
float32 CPU inputs with gradients off. With gradients on it is a plain ``F.linear``, and a weight
changed in place (an optimizer step, ``load_state_dict``) is re-packed on the next call.

Two oneDNN post-ops fold the elementwise work that follows a linear into its output loop, which at
49 rows is mostly per-op overhead (measured at 512→4096, 49 rows: the GLU 1282 → 1051 µs; 241 rows:
5338 → 5183 µs): :meth:`PackedLinear.forward_add` (``linear(x) + residual``, the transformer's
residual adds) and :meth:`PackedLinear.forward_glu` (``value · silu(gate)`` from one projection whose
output rows are ``[value; gate]``, as two half-width linears with ``swish`` and ``mul`` post-ops).
:func:`linear_add` and :func:`linear_glu` dispatch to them for any linear layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["GluHalves", "PackedLinear", "linear_add", "linear_glu", "pack_linears", "packing_available", "tensor_version"]

ROWS_HINT = 64  # oneDNN picks its weight blocking for about this many input rows (49, 64 or 256: same speed here)


def packing_available() -> bool:
    """Whether this torch build has oneDNN's packed linear (x86 CPU builds do)."""
    onednn = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    return onednn and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@dataclass(frozen=True)
class GluHalves:
    """A GLU projection's weight as two oneDNN packs (output rows ``[value; gate]``) and its bias halves."""

    value: Tensor
    gate: Tensor
    value_bias: Tensor | None
    gate_bias: Tensor | None


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose CPU float32 inference path uses a oneDNN-packed copy of its weight.

    Args:
        linear: the layer to wrap; its ``weight`` and ``bias`` parameters are shared, not copied.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed: Tensor | None = None
        self._halves: GluHalves | None = None
        self._packed_version: tuple[int, int] | None = None  # the weight and bias versions both packs belong to
        self._packed_for: tuple[Tensor, Tensor | None] | None = None  # ... and the tensors themselves

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles carry the parameters, not the packs (oneDNN's opaque tensors have no storage to
        copy); a copy packs again on its first call."""
        state = dict(self.__dict__)
        state.update(_packed=None, _halves=None, _packed_for=None, _packed_version=None)
        return state

    def _fast(self, x: Tensor, other: Tensor | None = None) -> bool:
        """Whether the packed path is exact here: float32 CPU tensors, no gradients needed (runs per call: kept cheap)."""
        weight = self.weight
        if weight.dtype is not torch.float32 or x.dtype is not torch.float32 or not x.is_cpu:
            return False
        if other is not None and (other.dtype is not torch.float32 or not other.is_cpu):
            return False
        needs_grad = weight.requires_grad or x.requires_grad or (other is not None and other.requires_grad)
        return not (needs_grad and torch.is_grad_enabled())

    def _drop_stale_packs(self) -> None:
        """Forget both packs after the weight or bias changed in place (inference tensors keep no version:
        packed once)."""
        weight, bias = self.weight, self.bias
        version = (tensor_version(weight), tensor_version(bias))
        if (
            self._packed_for is None
            or self._packed_for[0] is not weight
            or self._packed_for[1] is not bias
            or self._packed_version != version
        ):
            self._packed_for, self._packed_version = (weight, bias), version  # new tensors (load with assign=True) re-pack too
            self._packed, self._halves = None, None

    def _weight_packed(self) -> Tensor:
        self._drop_stale_packs()
        if self._packed is None:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), ROWS_HINT)
        return self._packed

    def _halves_packed(self) -> GluHalves:
        """The packed ``[value; gate]`` halves of the weight and their biases (for :meth:`forward_glu`)."""
        self._drop_stale_packs()
        if self._halves is None:
            with torch.no_grad():
                value, gate = (torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), ROWS_HINT) for w in self.weight.detach().chunk(2))
                value_b, gate_b = self.bias.detach().chunk(2) if self.bias is not None else (None, None)
            self._halves = GluHalves(value, gate, value_b, gate_b)
        return self._halves

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features) → (..., out_features)``."""
        if not self._fast(x):
            return F.linear(x, self.weight, self.bias)
        out: Tensor = torch.ops.mkldnn._linear_pointwise(x, self._weight_packed(), self.bias, "none", [], "")
        return out

    def forward_add(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + linear(x)``; ``residual`` has the output's shape ``(..., out_features)``."""
        if not self._fast(x, residual) or not residual.is_contiguous():
            return residual + F.linear(x, self.weight, self.bias)
        out: Tensor = torch.ops.mkldnn._linear_pointwise.binary(x, residual, self._weight_packed(), self.bias, "add")
        return out

    def forward_glu(self, x: Tensor) -> Tensor:
        """``value · silu(gate)`` where ``[value, gate] = linear(x).chunk(2, -1)``: ``(..., in) → (..., out / 2)``."""
        if not self._fast(x):
            return _glu_reference(F.linear(x, self.weight, self.bias))
        h = self._halves_packed()
        gate = torch.ops.mkldnn._linear_pointwise(x, h.gate, h.gate_bias, "swish", [], "")
        out: Tensor = torch.ops.mkldnn._linear_pointwise.binary(x, gate, h.value, h.value_bias, "mul")
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed=oneDNN"


def tensor_version(tensor: Tensor | None) -> int:
    """Autograd's in-place modification counter (-1: no tensor; -2: an inference tensor, which keeps none;
    writes through ``.data`` do not count either)."""
    if tensor is None:
        return -1
    return -2 if tensor.is_inference() else tensor._version


def _glu_reference(projected: Tensor) -> Tensor:
    value, gate = projected.chunk(2, dim=-1)
    return value * F.silu(gate)


def linear_add(layer: nn.Module, x: Tensor, residual: Tensor | None) -> Tensor:
    """``residual + layer(x)`` (just ``layer(x)`` for ``residual=None``) for an ``nn.Linear`` or a
    :class:`PackedLinear`, where the add is fused into the linear's output."""
    if residual is None:
        out_only: Tensor = layer(x)
        return out_only
    if isinstance(layer, PackedLinear):
        return layer.forward_add(x, residual)
    out: Tensor = residual + layer(x)
    return out


def linear_glu(layer: nn.Module, x: Tensor) -> Tensor:
    """``value · silu(gate)`` of ``[value, gate] = layer(x).chunk(2, -1)`` (two fused linears for a :class:`PackedLinear`)."""
    if isinstance(layer, PackedLinear):
        return layer.forward_glu(x)
    return _glu_reference(layer(x))


def pack_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` inside ``module`` (in place) with a :class:`PackedLinear`.

    Returns:
        The number of layers replaced (0 where :func:`packing_available` is false: nothing changes).
    """
    if not packing_available():
        return 0
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    return replaced
