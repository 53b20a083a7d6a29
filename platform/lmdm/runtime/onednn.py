"""oneDNN's packed linear for CPU inference, through torch's private ``torch.ops.mkldnn`` ops.

``F.linear`` on CPU re-packs its weight on every call; at the few-token matmuls of an LMDM denoising
step that re-packing costs a large share of the time. oneDNN can pack a weight once into its blocked
layout (``_reorder_linear_weight``) and run linears on it with elementwise work folded into the output
loop (``_linear_pointwise``: ``+ residual``, ``swish``, ``· other``).

These are the only private torch ops of the packed runtime. Every one has a fallback: where this build
lacks them (:func:`available` is false: a non-x86 build, a torch that renamed them), a pack holds the
plain weight and runs ``F.linear`` with the same maths. ``tests/test_runtime.py`` fails loudly on an x86
build where they have disappeared, so a torch upgrade cannot silently turn ``packed`` into ``eager``.

Legend: N rows (any leading axes), I input features, O output features, H GLU hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PRIVATE_OPS", "GluPack", "LinearPack", "available"]

# (namespace, op) of every private op used here
PRIVATE_OPS = (("mkldnn", "_reorder_linear_weight"), ("mkldnn", "_linear_pointwise"))
ROWS_HINT = 64  # oneDNN picks its weight blocking for about this many input rows (49, 64 or 256: same speed here)


def available() -> bool:
    """Whether this torch build has oneDNN and its packed-linear ops (x86 CPU builds do)."""
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    return all(hasattr(getattr(torch.ops, ns), op) for ns, op in PRIVATE_OPS)


@dataclass(frozen=True)
class LinearPack:
    """A linear's weight, packed once for oneDNN (``packed``) or kept plain (the fallback), and its bias.

    Inputs: float32 CPU tensors with autograd off (the runtime checks before it uses a pack)."""

    weight: Tensor  # oneDNN's opaque blocked layout of (O, I), or the plain (O, I) weight
    bias: Tensor | None  # (O,)
    packed: bool

    @staticmethod
    def of(weight: Tensor, bias: Tensor | None) -> LinearPack:
        """Pack ``weight`` ``(O, I)``. The oneDNN layout is a copy (later in-place changes to the weight are not
        seen: re-pack then); the fallback keeps the weight itself."""
        with torch.no_grad():
            w = weight.detach().contiguous()
            b = None if bias is None else bias.detach().contiguous()
            if available():
                return LinearPack(torch.ops.mkldnn._reorder_linear_weight(w, ROWS_HINT), b, True)
            return LinearPack(w, b, False)

    def __call__(self, x: Tensor) -> Tensor:
        """``x · Wᵀ + b``: ``(..., I) → (..., O)``."""
        if self.packed:
            out: Tensor = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return out
        return F.linear(x, self.weight, self.bias)

    def add(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + x · Wᵀ + b``, the add in the linear's output loop; ``residual`` contiguous, of the output's shape."""
        if self.packed:
            out: Tensor = torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
            return out
        return residual + F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class GluPack:
    """A GLU projection whose output rows are ``[value; gate]``, as two half-width packs:
    ``value · silu(gate)`` is two oneDNN linears with ``swish`` and ``mul`` post-ops."""

    value: LinearPack
    gate: LinearPack

    @staticmethod
    def of(weight: Tensor, bias: Tensor | None) -> GluPack:
        """Pack a ``(2H, I)`` projection."""
        value_w, gate_w = weight.detach().chunk(2)
        value_b, gate_b = bias.detach().chunk(2) if bias is not None else (None, None)
        return GluPack(LinearPack.of(value_w, value_b), LinearPack.of(gate_w, gate_b))

    def __call__(self, x: Tensor) -> Tensor:
        """``value · silu(gate)``: ``(..., I) → (..., H)``."""
        v, g = self.value, self.gate
        if v.packed and g.packed:
            gate = torch.ops.mkldnn._linear_pointwise(x, g.weight, g.bias, "swish", [], "")
            out: Tensor = torch.ops.mkldnn._linear_pointwise.binary(x, gate, v.weight, v.bias, "mul")
            return out
        return v(x) * F.silu(g(x))
