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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["PackedLinear", "pack_linears", "packing_available"]

ROWS_HINT = 64  # oneDNN picks its weight blocking for about this many input rows (49, 64 or 256: same speed here)


def packing_available() -> bool:
    """Whether this torch build has oneDNN's packed linear (x86 CPU builds do)."""
    onednn = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    return onednn and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


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
        self._packed_version = -1

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features) → (..., out_features)``."""
        weight = self.weight
        needs_grad = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)
        if needs_grad or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu":
            return F.linear(x, weight, self.bias)
        version = -2 if weight.is_inference() else weight._version  # inference tensors keep no version: pack once
        if self._packed_version != version or self._packed is None:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)
            self._packed_version = version
        out: Tensor = torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed=oneDNN"


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
