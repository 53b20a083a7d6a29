"""A stream: an engine, streaming autoencoder decode and a conditioning schedule → audio chunks.

Legend: B batch, A audio channels, n samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from lmdm.models.autoencoder import OobleckVAE, StreamingDecoder
from lmdm.streaming.common import Condition, Engine
from lmdm.streaming.rollout import ConditionSchedule, condition_at, rollout_blocks

__all__ = ["Stream"]


class Stream:
    """Generates audio block by block; the condition may change between blocks.

    Audio lags the latents by the decoder's lookahead (``latency_samples``); :meth:`close` returns
    the held-back tail. Concatenated chunks equal a batch decode of the whole latent stream. A stream
    started from ``context`` continues it: the decoder is primed with the context latents
    (:meth:`~lmdm.models.autoencoder.StreamingDecoder.prime`), so the first chunk starts where the
    context's audio ended (one lookahead shorter than a block). ``cache``: an empty cache the stream's
    engine keeps its context in (a server's pooled row, :meth:`~lmdm.streaming.lmdm_engine.LMDMEngine.cache_pool`).
    """

    def __init__(
        self,
        engine: Engine[Any],
        autoencoder: OobleckVAE,
        condition: ConditionSchedule,
        batch: int = 1,
        context: Tensor | None = None,
        generator: torch.Generator | None = None,
        cache: Any | None = None,
    ) -> None:
        self.engine = engine
        self.decoder = StreamingDecoder(autoencoder)
        self.schedule = condition
        self.blocks = 0
        more = {} if cache is None else {"cache": cache}  # a pooled cache row (an LMDM engine's ``start``)
        self.state: Any = engine.start(condition_at(condition, 0), batch, context=context, generator=generator, **more)
        if context is not None and context.shape[-1] > 0:
            self.decoder.prime(context.to(next(autoencoder.parameters()).dtype))

    @property
    def latency_samples(self) -> int:
        return self.decoder.latency_samples

    def set_condition(self, condition: Condition) -> None:
        """Use ``condition`` for every following block (a new prompt, sketch or timing)."""
        self.schedule = condition

    def next_chunk(self) -> Tensor:
        """Generate one block and return the audio that became final, ``(B, A, n)``."""
        (block,) = rollout_blocks(self.engine, self.state, 1, self.schedule, first=self.blocks)
        self.blocks += 1
        with torch.no_grad():
            return self.decoder.push(block.to(next(self.decoder.vae.parameters()).dtype))

    def close(self) -> Tensor:
        """End the stream: the audio held back for the decoder's lookahead."""
        with torch.no_grad():
            return self.decoder.flush()

    def chunks(self, n_blocks: int) -> Iterator[Tensor]:
        """``n_blocks`` chunks, then the tail."""
        for _ in range(n_blocks):
            yield self.next_chunk()
        yield self.close()
