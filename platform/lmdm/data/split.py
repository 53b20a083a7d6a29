"""The held-out reference: built-in corpus clips no training stage ever sees.

Whether clip ``index`` of a corpus with seed ``seed`` is held out is a pure function of the two
(:func:`is_held_out`): a hash of ``"{seed}:{index}"`` read as a number in [0, 1), held out below
:data:`HELD_OUT_FRACTION`. It does not depend on ``num_clips`` or ``clip_seconds``, so a larger or
longer corpus of the same seed holds out the same clips as a smaller one and never trains on its
reference. Sources other than the built-in corpus (a folder, a saved dataset) have no held-out split.
"""

from __future__ import annotations

import hashlib
from typing import Literal

__all__ = ["HELD_OUT_FRACTION", "SPLIT_RULE", "Split", "held_out_indices", "is_held_out"]

HELD_OUT_FRACTION = 0.1
SPLIT_RULE = f"int(sha256(f'{{seed}}:{{index}}')[:16], 16) / 2**64 < {HELD_OUT_FRACTION}"  # recorded in manifests

Split = Literal["train", "held_out", "all"]


def is_held_out(seed: int, index: int) -> bool:
    """Clip ``index`` of the corpus with seed ``seed`` is in the held-out reference."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()
    return int(digest[:16], 16) / 2**64 < HELD_OUT_FRACTION


def held_out_indices(seed: int, num_clips: int) -> list[int]:
    """The held-out clip indices among ``0 … num_clips − 1``."""
    return [i for i in range(num_clips) if is_held_out(seed, i)]
