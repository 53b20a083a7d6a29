"""Streaming engines: one interface (:class:`~lmdm.streaming.common.Engine`), three methods, each with its
own state type.

- :class:`OutpaintingEngine`: the bidirectional base denoises the whole window at every step.
- :class:`LMDMEngine` (``encdec`` or ``block_causal``): context keys/values live in a
  :class:`~lmdm.models.kv_cache.BlockKVCache`; each denoising step runs only the global token and the
  target block.
"""

from lmdm.streaming.common import Condition, Engine, Progress, RotaryMode, Sampling, concat_text
from lmdm.streaming.lmdm_engine import LMDMEngine, LMDMState
from lmdm.streaming.outpainting import OutpaintingEngine, OutpaintingState

__all__ = [
    "Condition",
    "Engine",
    "LMDMEngine",
    "LMDMState",
    "OutpaintingEngine",
    "OutpaintingState",
    "Progress",
    "RotaryMode",
    "Sampling",
    "concat_text",
]
