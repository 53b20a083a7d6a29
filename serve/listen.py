"""``lmdm listen``: stream from a running ``lmdm serve`` into a WAV file (or a sound device), and measure what
a player feels: underruns, time to first audio and control latency (from a ``set_prompts`` to the first sample
played that was generated under it), beside its arithmetic.

Control latency arithmetic: a session generates block ``n`` once the client has ``blocks_ahead`` blocks (``a``)
or less still to play, so block ``n``'s first sample plays ``a·S + lat`` samples after its generation began
(``S`` block samples, ``lat`` the decoder's lookahead). A prompt change waits for the next block that has not
begun: it is heard ``(a·S + lat)/sr`` to ``((a + 1)·S + lat)/sr`` seconds later, ``((a + ½)·S + lat)/sr`` on
average (a change that arrives while a block is being generated goes to the next one, as one that arrives
just after it began). Compute does not add to it while it fits inside ``a·S`` (else the stream underruns).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmdm.serve.client import ClientError, StreamClient
from lmdm.serve.protocol import WeightedPrompt

__all__ = ["ListenResult", "latency_bounds", "listen", "parse_prompt"]

_WEIGHTED = re.compile(r"^(?P<text>.*?)\s*@\s*(?P<weight>[0-9]*\.?[0-9]+)\s*$")


def parse_prompt(spec: str) -> WeightedPrompt:
    """``"TEXT"`` or ``"TEXT @ WEIGHT"`` → a weighted prompt.

    Raises:
        ValueError: an empty text.
    """
    match = _WEIGHTED.match(spec)
    text, weight = (match["text"], float(match["weight"])) if match else (spec, 1.0)
    if not text.strip():
        raise ValueError(f"prompt {spec!r} has no text")
    return WeightedPrompt(text=text.strip(), weight=weight)


def latency_bounds(started: dict[str, Any]) -> dict[str, float]:
    """Control latency's arithmetic from a ``started`` message: least, mean and most seconds."""
    a, S, lat, sr = float(started["blocks_ahead"]), started["block_samples"], started["latency_samples"], started["sample_rate"]
    return {"min_s": (a * S + lat) / sr, "mean_s": ((a + 0.5) * S + lat) / sr, "max_s": ((a + 1) * S + lat) / sr}


@dataclass
class ListenResult:
    """What ``lmdm listen`` heard."""

    out: Path | None
    seconds: float
    started: dict[str, Any]
    first_audio_s: float  # from sending start to the first audio frame with samples
    underruns: int
    stalled_s: float
    reconnects: int
    latencies_s: list[float] = field(default_factory=list)
    blocks: int = 0

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_s
        return {
            "seconds": round(self.seconds, 3),
            "blocks": self.blocks,
            "first_audio_s": round(self.first_audio_s, 4),
            "underruns": self.underruns,
            "stalled_s": round(self.stalled_s, 4),
            "reconnects": self.reconnects,
            "control_latency_s": {
                "n": len(lat),
                "mean": round(float(np.mean(lat)), 4) if lat else None,
                "min": round(min(lat), 4) if lat else None,
                "max": round(max(lat), 4) if lat else None,
            },
            "arithmetic_s": {k: round(v, 4) for k, v in latency_bounds(self.started).items()},
            "blocks_ahead": self.started["blocks_ahead"],
            "block_seconds": self.started["block_samples"] / self.started["sample_rate"],
            "lookahead_seconds": self.started["latency_samples"] / self.started["sample_rate"],
            "block_compute_s": self.started.get("warm_block_seconds"),
        }


async def listen(
    url: str,
    prompts: list[WeightedPrompt],
    seconds: float,
    out: Path | None,
    seed: int = 0,
    steps: int | None = None,
    cfg: float | None = None,
    token: str | None = None,
    change_to: list[WeightedPrompt] | None = None,
    change_every: float = 8.0,
    player: Any = None,
    on_progress: Any = None,
) -> ListenResult:
    """Stream ``seconds`` of audio; with ``change_to``, switch between ``prompts`` and it about every
    ``change_every`` seconds (plus a seeded random fraction of a block) and measure each change's control
    latency (changes not yet heard when the stream ends are left out). ``player(sample_rate, channels)`` makes the
    function that plays each block (:func:`sound_output`); ``None``: no playback.

    Raises:
        ClientError: the server refused or ended the session.
    """
    client = StreamClient(url, token=token)
    chunks: list[np.ndarray] = []
    sent = time.monotonic()
    first_audio: float | None = None
    blocks = 0
    changer: asyncio.Task[None] | None = None

    async def change_prompts() -> None:
        # at times independent of the block schedule (a player does not wait for block boundaries): every
        # change_every seconds, shifted by a seeded uniform fraction of a block
        rng = random.Random(seed)
        block_s = client.started["block_samples"] / client.started["sample_rate"]
        current = 0
        while True:
            await asyncio.sleep(change_every + rng.uniform(0.0, block_s))
            current = 1 - current
            assert change_to is not None
            with contextlib.suppress(Exception):  # a connection being replaced: the next change goes out
                await client.set_prompts(change_to if current else prompts)

    try:
        started = await client.start(prompts, seed=seed, steps=steps, cfg=cfg)
        rate = int(started["sample_rate"])
        play = player(rate, int(started["channels"])) if player is not None else None
        async for frame in client.frames(seconds=seconds):
            blocks += 1
            if frame.header.frames and first_audio is None:
                first_audio = frame.arrived - sent
                if change_to:
                    changer = asyncio.create_task(change_prompts())
            chunks.append(frame.pcm)
            if play is not None:
                await asyncio.to_thread(play, frame.pcm)  # a sound device's write blocks: off the event loop
            if on_progress is not None:
                on_progress(min(client.position / rate, seconds), seconds)
    finally:
        if changer is not None:
            changer.cancel()
        await client.close()
    audio = np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.int16)
    audio = audio[: round(seconds * int(client.started.get("sample_rate", 1)))]
    if out is not None:
        import soundfile as sf

        out.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(out), audio, int(client.started["sample_rate"]), subtype="PCM_16")
    clock = client.clock
    return ListenResult(
        out=out,
        seconds=audio.shape[0] / int(client.started["sample_rate"]),
        started=client.started,
        first_audio_s=first_audio if first_audio is not None else float("nan"),
        underruns=clock.underruns if clock else 0,
        stalled_s=clock.stalled if clock else 0.0,
        reconnects=client.reconnects,
        latencies_s=[s.seconds for s in client.latencies if s.seconds is not None],
        blocks=blocks,
    )


def sound_output(sample_rate: int, channels: int) -> Any:
    """A function that plays ``(n, C)`` int16 blocks on the default sound device (``sounddevice``).

    Raises:
        ClientError: no ``sounddevice`` package or no output device.
    """
    try:
        import sounddevice  # type: ignore[import-not-found]
    except (ImportError, OSError) as exc:
        raise ClientError(f"--play needs the sounddevice package and PortAudio ({exc}); write a WAV instead (--out)") from None
    stream = sounddevice.OutputStream(samplerate=sample_rate, channels=channels, dtype="int16")
    stream.start()
    return stream.write


def run_listen(**kwargs: Any) -> ListenResult:
    """:func:`listen` from synchronous code."""
    return asyncio.run(listen(**kwargs))
