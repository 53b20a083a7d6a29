"""Streaming engines: one interface (:class:`~lmdm.streaming.base.Engine`), three methods.

- :class:`OutpaintingEngine`: the bidirectional base denoises the whole window at every step.
- :class:`LMDMEngine` (``encdec`` or ``block_causal``): context keys/values live in a
  :class:`~lmdm.models.kv_cache.BlockKVCache`; each denoising step runs only the global token and the
  target block.
"""

from lmdm.streaming.base import Condition, Engine, RotaryMode, Sampling, StreamState, concat_text
from lmdm.streaming.lmdm_engine import LMDMEngine
from lmdm.streaming.outpainting import OutpaintingEngine

__all__ = ["Condition", "Engine", "LMDMEngine", "OutpaintingEngine", "RotaryMode", "Sampling", "StreamState", "concat_text"]
