"""Noticing weight changes: what both runtimes that hold derived copies of weights (packs, frozen graphs) use
to know when those copies are stale."""

from __future__ import annotations

from torch import Tensor

__all__ = ["WeightWatch"]


def _version(t: Tensor) -> int:
    return -1 if t.is_inference() else t._version  # autograd's in-place counter; inference tensors keep none


class WeightWatch:
    """Remembers a list of tensors by identity and autograd version.

    Seen: a tensor replaced (``load_state_dict(assign=True)``, a new module) or changed in place (an
    optimizer or EMA step, ``load_state_dict``). Not seen: writes through ``.data`` and into inference
    tensors, which keep no version.
    """

    def __init__(self) -> None:
        self._seen: list[tuple[Tensor, int]] | None = None

    def changed(self, tensors: list[Tensor]) -> bool:
        """Whether ``tensors`` differ from those of the previous call (``False`` on the first); remembers them."""
        now = [(t, _version(t)) for t in tensors]
        before, self._seen = self._seen, now
        if before is None:
            return False
        return len(before) != len(now) or any(a is not b or va != vb for (a, va), (b, vb) in zip(before, now, strict=True))

    def forget(self) -> None:
        """Start over: the next :meth:`changed` is a first call."""
        self._seen = None
