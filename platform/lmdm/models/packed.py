"""Prepacked linear layers for CPU inference: our prefetching kernel where it builds, else oneDNN.

``F.linear`` on CPU runs a BLAS ``sgemm`` that re-packs the weight on every call; at the 49-token
matmuls of an LMDM denoising step that re-packing and the BLAS's small-``M`` tiling run well below
the FLOP rate of the 241-token matmuls of outpainting. A weight packed once into a kernel's blocked
layout runs both nearer the same rate. :func:`pack_linears` swaps a model's ``nn.Linear`` layers for
:class:`PackedLinear`, which keeps the same parameters (state-dict keys and checkpoints are unchanged)
and uses the packed copy only where it is exact to float32 rounding: float32 CPU inputs with gradients
off. With gradients on it is a plain ``F.linear``, and a weight changed in place (an optimizer step,
``load_state_dict``) is re-packed on the next call.

Two kernels (:class:`LinearPack`, :class:`GluPack`), the same for every caller:

- ``cpu_gemm`` (:mod:`lmdm.models.cpu_gemm`, ours): prefetches the next weight panel while it computes
  the current one, so a few-row linear no longer waits on its weights streaming from memory. Used by
  ``kernel="auto"`` where it builds, for every shape it takes: an output width that is a multiple of
  16 (32 for a GLU projection) and at most 65536 input features.
- oneDNN's packed linear (``torch.ops.mkldnn``), ``kernel="onednn"`` and everywhere else.

Measured with ``lmdm bench stream`` (width-512 depth-8 model, paper geometry) on the 2-core dev
machine, medians of five alternating runs per kernel: block-causal 617 (oneDNN) → 495 ms (ours) per
block, outpainting 1759 → 1567 ms.

Elementwise work that follows a linear is folded into its output loop, which at 49 rows is mostly
per-op overhead: :meth:`PackedLinear.forward_add` (``linear(x) + residual``, the transformer's
residual adds) and :meth:`PackedLinear.forward_glu` (``value · silu(gate)`` from one projection whose
output rows are ``[value; gate]``; oneDNN: two half-width linears with ``swish`` and ``mul`` post-ops).
:func:`linear_add` and :func:`linear_glu` dispatch to them for any linear layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lmdm.models import cpu_gemm

__all__ = [
    "GluPack",
    "LinearPack",
    "PackedLinear",
    "kernels_used",
    "linear_add",
    "linear_glu",
    "pack_linears",
    "packing_available",
    "tensor_version",
]

Kernel = Literal["auto", "onednn"]

ROWS_HINT = 64  # oneDNN picks its weight blocking for about this many input rows (49, 64 or 256: same speed here)


def packing_available() -> bool:
    """Whether this torch build has oneDNN's packed linear (x86 CPU builds do)."""
    onednn = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    return onednn and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@dataclass(frozen=True)
class LinearPack:
    """A linear's weight packed once for one kernel, and its bias.

    ``weight`` is our kernel's panels (``panels=True``, :mod:`lmdm.models.cpu_gemm`) or oneDNN's opaque
    blocked layout of ``(out, in)``. Inputs: float32, CPU, no autograd (the caller checks)."""

    weight: Tensor
    bias: Tensor | None
    panels: bool

    @staticmethod
    def of(weight: Tensor, bias: Tensor | None, kernel: Kernel = "auto") -> LinearPack:
        with torch.no_grad():
            w = weight.detach()
            b = None if bias is None else bias.detach().contiguous()
            if kernel == "auto" and cpu_gemm.supports(w.shape[0], w.shape[1]):
                return LinearPack(cpu_gemm.pack(w), b, True)
            return LinearPack(torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), ROWS_HINT), b, False)

    def __call__(self, x: Tensor) -> Tensor:
        """``x · Wᵀ + b``: ``(..., in) → (..., out)``."""
        if self.panels:
            return cpu_gemm.linear(x, self.weight, self.bias)
        out: Tensor = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return out

    def add(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + x · Wᵀ + b`` with the add in the kernel's output loop; ``residual`` contiguous."""
        if self.panels:
            return cpu_gemm.linear(x, self.weight, self.bias, residual)
        out: Tensor = torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        return out


@dataclass(frozen=True)
class GluPack:
    """A GLU projection (output rows ``[value; gate]``) packed once: ``value · silu(gate)`` in one call of our
    kernel (``panels``: value and gate panels in pairs, ``bias`` the whole ``(2H,)``), or as two oneDNN
    half-width linears with ``swish`` and ``mul`` post-ops (``value``, ``gate``)."""

    panels: Tensor | None
    bias: Tensor | None
    value: LinearPack | None
    gate: LinearPack | None

    @staticmethod
    def of(weight: Tensor, bias: Tensor | None, kernel: Kernel = "auto") -> GluPack:
        with torch.no_grad():
            w = weight.detach()
            if kernel == "auto" and cpu_gemm.supports(w.shape[0], w.shape[1], glu=True):
                return GluPack(cpu_gemm.pack(w, glu=True), None if bias is None else bias.detach().contiguous(), None, None)
            value, gate = (torch.ops.mkldnn._reorder_linear_weight(h.contiguous(), ROWS_HINT) for h in w.chunk(2))
            value_b, gate_b = bias.detach().chunk(2) if bias is not None else (None, None)
            return GluPack(None, None, LinearPack(value, value_b, False), LinearPack(gate, gate_b, False))

    def __call__(self, x: Tensor) -> Tensor:
        """``value · silu(gate)``: ``(..., in) → (..., H)``."""
        if self.panels is not None:
            return cpu_gemm.glu(x, self.panels, self.bias)
        assert self.value is not None and self.gate is not None
        gate = torch.ops.mkldnn._linear_pointwise(x, self.gate.weight, self.gate.bias, "swish", [], "")
        out: Tensor = torch.ops.mkldnn._linear_pointwise.binary(x, gate, self.value.weight, self.value.bias, "mul")
        return out


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose CPU float32 inference path uses a packed copy of its weight
    (:class:`LinearPack`: our kernel where it builds, else oneDNN).

    Args:
        linear: the layer to wrap; its ``weight`` and ``bias`` parameters are shared, not copied.
        kernel: ``auto`` (our kernel where it builds and takes the shape, else oneDNN) or ``onednn``;
            changing it later re-packs on the next call.
    """

    kernel: Kernel = "auto"  # class defaults: a layer pickled by an older version unpickles without them
    _glu: GluPack | None = None

    def __init__(self, linear: nn.Linear, kernel: Kernel = "auto") -> None:
        super().__init__()
        if kernel not in ("auto", "onednn"):
            raise ValueError(f"kernel must be 'auto' or 'onednn', got {kernel!r}")
        self.kernel = kernel
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed: LinearPack | None = None
        self._glu: GluPack | None = None
        self._packed_version: tuple[int, int, str] | None = None  # the weight and bias versions (and kernel) of the packs
        self._packed_for: tuple[Tensor, Tensor | None] | None = None  # ... and the tensors themselves

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles carry the parameters, not the packs (oneDNN's opaque tensors have no storage to
        copy); a copy packs again on its first call."""
        state = dict(self.__dict__)
        state.update(_packed=None, _glu=None, _packed_for=None, _packed_version=None)
        return state

    def _fast(self, x: Tensor, other: Tensor | None = None) -> bool:
        """Whether the packed path is exact here: float32 CPU tensors, no gradients needed (runs per call: kept cheap)."""
        weight, bias = self.weight, self.bias
        if weight.dtype is not torch.float32 or not weight.is_cpu or x.dtype is not torch.float32 or not x.is_cpu:
            return False
        if bias is not None and (bias.dtype is not torch.float32 or not bias.is_cpu):
            return False
        if other is not None and (other.dtype is not torch.float32 or not other.is_cpu):
            return False
        needs_grad = weight.requires_grad or x.requires_grad or (other is not None and other.requires_grad)
        return not (needs_grad and torch.is_grad_enabled())

    def _drop_stale_packs(self) -> None:
        """Forget both packs after the weight or bias changed in place (inference tensors keep no version:
        packed once)."""
        weight, bias = self.weight, self.bias
        version = (tensor_version(weight), tensor_version(bias), self.kernel)
        if (
            self._packed_for is None
            or self._packed_for[0] is not weight
            or self._packed_for[1] is not bias
            or self._packed_version != version
        ):
            self._packed_for, self._packed_version = (weight, bias), version  # new tensors (load with assign=True) re-pack too
            self._packed, self._glu = None, None

    def pack(self) -> LinearPack:
        """The packed weight (packed on first use, and again after the weight or bias changed)."""
        self._drop_stale_packs()
        if self._packed is None:
            self._packed = LinearPack.of(self.weight, self.bias, self.kernel)
        return self._packed

    def glu_pack(self) -> GluPack:
        """The packed ``[value; gate]`` projection for :meth:`forward_glu`."""
        self._drop_stale_packs()
        if self._glu is None:
            self._glu = GluPack.of(self.weight, self.bias, self.kernel)
        return self._glu

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features) → (..., out_features)``."""
        if not self._fast(x):
            return F.linear(x, self.weight, self.bias)
        return self.pack()(x)

    def forward_add(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + linear(x)``; ``residual`` has the output's shape ``(..., out_features)``."""
        if not self._fast(x, residual) or not residual.is_contiguous() or residual.shape != (*x.shape[:-1], self.out_features):
            return residual + F.linear(x, self.weight, self.bias)  # (a residual that broadcasts, too)
        return self.pack().add(x, residual)

    def forward_glu(self, x: Tensor) -> Tensor:
        """``value · silu(gate)`` where ``[value, gate] = linear(x).chunk(2, -1)``: ``(..., in) → (..., out / 2)``."""
        if not self._fast(x):
            return _glu_reference(F.linear(x, self.weight, self.bias))
        return self.glu_pack()(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, kernel={self.kernel}"


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


def kernels_used(module: nn.Module) -> dict[str, int]:
    """How many packed linears inside ``module`` have run on each kernel (``cpu_gemm``, ``onednn``); a GLU
    projection counts once, under the kernel of its GLU pack."""
    counts = {"cpu_gemm": 0, "onednn": 0}
    for m in module.modules():
        if isinstance(m, PackedLinear):
            glu = m._glu
            if glu is not None:
                counts["cpu_gemm" if glu.panels is not None else "onednn"] += 1
            elif m._packed is not None:
                counts["cpu_gemm" if m._packed.panels else "onednn"] += 1
    return counts


def pack_linears(module: nn.Module, kernel: Kernel = "auto") -> int:
    """Replace every ``nn.Linear`` inside ``module`` (in place) with a :class:`PackedLinear` using ``kernel``.

    Returns:
        The number of layers replaced (0 where :func:`packing_available` is false: nothing changes).
    """
    if not packing_available():
        return 0
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child, kernel))
                replaced += 1
    return replaced
