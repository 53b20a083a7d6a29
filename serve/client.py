"""The Python client of ``WS /v1/stream`` (async): starts a session, yields audio frames (acknowledging each),
sends prompt changes, models a player's clock (underruns, control latency), and continues after a fault.

Continuity: the client keeps the last ``context_samples`` of audio it received. When the connection drops
(its replica died and Serve restarts it) it reconnects and starts a new session from that audio, which the
server encodes as starting context: the music goes on from where it was instead of starting over.

Usage::

    async with StreamClient("ws://127.0.0.1:8000/v1/stream") as client:
        await client.start([WeightedPrompt(text="Bach chorale, for organ")], seed=1)
        async for frame in client.frames(seconds=20):
            ...  # frame.pcm: (n, C) int16
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmdm.serve.protocol import AudioHeader, WeightedPrompt

__all__ = ["ClientError", "Frame", "LatencySample", "PlaybackClock", "StreamClient"]

# close codes after which the client reconnects: going away, abnormal (no close frame), internal error, restart
RECONNECT_CODES = {1001, 1006, 1011, 1012, 1014}


def _close_of(closed: Any) -> tuple[int, str]:
    """A closed connection's code and reason (1006 where no close frame came: the server died)."""
    return (closed.rcvd.code, closed.rcvd.reason) if closed.rcvd is not None else (1006, "connection lost without a close frame")


class ClientError(RuntimeError):
    """The server refused or ended the session (``code``: the close code or error name; the message says why)."""

    def __init__(self, message: str, code: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Frame:
    """One audio frame as the client saw it."""

    header: AudioHeader
    pcm: np.ndarray  # (n, C) int16
    position: int  # the frame's first sample on the client's timeline (continues across reconnects)
    arrived: float  # time.monotonic() at receipt
    plays_at: float  # when a player started at the first frame plays its first sample
    session_index: int  # 0 for the first session, 1 after the first reconnect, ...


@dataclass
class LatencySample:
    """One prompt change: sent at ``sent``; its first sample (client position ``position``) plays at ``played``."""

    sent: float
    from_block: int
    position: int
    played: float | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.played is None else self.played - self.sent


@dataclass
class PlaybackClock:
    """A player that starts playing at the first frame and plays at the sample rate; a frame that arrives
    after the buffered audio ran out is an underrun (the player stalls until it arrives)."""

    sample_rate: int
    buffer_end: float | None = None  # when the buffered audio finishes playing
    underruns: int = 0
    stalled: float = 0.0

    def arrive(self, samples: int, now: float) -> float:
        """Buffer ``samples`` arriving at ``now``; returns when their first sample plays."""
        if self.buffer_end is None:
            starts = now
        elif now > self.buffer_end:
            self.underruns += 1
            self.stalled += now - self.buffer_end
            starts = now
        else:
            starts = self.buffer_end
        self.buffer_end = starts + samples / self.sample_rate
        return starts

    def hold(self, seconds: float) -> None:
        """A pause of ``seconds``: the buffered audio plays that much later."""
        if self.buffer_end is not None:
            self.buffer_end += seconds


@dataclass
class _Settings:
    prompts: list[WeightedPrompt]
    seed: int
    steps: int | None
    cfg: float | None


@dataclass
class StreamClient:
    """One live stream (reconnecting with its audio as context when ``reconnect``)."""

    url: str
    token: str | None = None
    reconnect: bool = True
    reconnect_timeout: float = 120.0
    open_timeout: float = 30.0
    ack: bool = True  # acknowledge each frame (a client that stops acking is paused by the server)

    started: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)  # the server's error messages during the stream
    latencies: list[LatencySample] = field(default_factory=list)
    reconnects: int = 0
    resumed_from: list[np.ndarray | None] = field(default_factory=list)  # the context audio each reconnect sent
    position: int = 0
    clock: PlaybackClock | None = None

    def __post_init__(self) -> None:
        self._ws: Any = None
        self._settings: _Settings | None = None
        self._history: collections.deque[np.ndarray] = collections.deque()
        self._history_samples = 0
        self._session_index = 0
        self._session_origin = 0  # client position of the current session's sample 0
        self._paused_at: float | None = None
        self._stopping = False

    async def __aenter__(self) -> StreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- connection

    async def _connect(self) -> None:
        import websockets

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self._ws = await websockets.connect(self.url, additional_headers=headers, open_timeout=self.open_timeout, max_size=2**24)

    async def _send(self, data: dict[str, Any]) -> None:
        await self._ws.send(json.dumps(data))

    async def _recv_json(self, until: str) -> dict[str, Any]:
        """JSON messages up to one of type ``until`` (errors raise :class:`ClientError`)."""
        import websockets

        while True:
            try:
                raw = await self._ws.recv()
            except websockets.ConnectionClosed as closed:
                code, reason = _close_of(closed)
                raise ClientError(f"the server closed the session ({code}: {reason})", code) from None
            if isinstance(raw, bytes):
                continue
            message = json.loads(raw)
            self.events.append({**message, "at": time.monotonic()})
            if message.get("type") == "error":
                raise ClientError(message.get("message", "error"), message.get("error"))
            if message.get("type") == until:
                return message

    async def start(
        self, prompts: list[WeightedPrompt] | None = None, seed: int = 0, steps: int | None = None, cfg: float | None = None
    ) -> dict[str, Any]:
        """Open the session; returns the server's ``started`` message (sample rate, block samples, ...).

        Raises:
            ClientError: the server refused (full, token, origin, a bad prompt).
        """
        self._settings = _Settings(list(prompts or []), seed, steps, cfg)
        await self._connect()
        return await self._start_session(None)

    async def _start_session(self, context: np.ndarray | None) -> dict[str, Any]:
        s = self._settings
        assert s is not None
        message: dict[str, Any] = {"type": "start", "seed": s.seed, "prompts": [p.model_dump() for p in s.prompts]}
        if s.steps is not None:
            message["steps"] = s.steps
        if s.cfg is not None:
            message["cfg"] = s.cfg
        if context is not None:
            channels = context.shape[1]
            message["context"] = {"frames": context.shape[0], "channels": channels, "sample_rate": self.started["sample_rate"]}
        import websockets

        try:
            await self._send(message)
            if context is not None:
                await self._ws.send(np.ascontiguousarray(context, dtype="<i2").tobytes())
        except websockets.ConnectionClosed as closed:  # refused at once (token, origin, full): the close says why
            code, reason = _close_of(closed)
            raise ClientError(f"the server closed the session ({code}: {reason})", code) from None
        try:  # a replica that accepts but never answers must not hang the client
            self.started = await asyncio.wait_for(self._recv_json("started"), self.open_timeout)
        except TimeoutError:
            raise ClientError(f"no 'started' from the server within {self.open_timeout:g} s", "timeout") from None
        if self.clock is None:
            self.clock = PlaybackClock(int(self.started["sample_rate"]))
        self._session_origin = self.position
        return self.started

    def context_audio(self) -> np.ndarray | None:
        """The last whole blocks of received audio, up to ``context_samples`` (``None``: not one block yet)."""
        block, most = int(self.started["block_samples"]), int(self.started["context_samples"])
        have = min(self._history_samples, most) // block * block
        if have == 0:
            return None
        return np.concatenate(list(self._history))[-have:]

    def _remember(self, pcm: np.ndarray) -> None:
        self._history.append(pcm)
        self._history_samples += pcm.shape[0]
        most = int(self.started.get("context_samples", 0))
        while self._history and self._history_samples - self._history[0].shape[0] >= most:
            self._history_samples -= self._history.popleft().shape[0]

    async def _resume(self, why: str) -> None:
        """Reconnect (retrying until ``reconnect_timeout``) and start from the kept audio."""
        import websockets

        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.2
        context = self.context_audio()
        while True:
            try:
                await self._connect()
                await self._start_session(context)
                self.resumed_from.append(context)
                self.reconnects += 1
                self._session_index += 1
                return
            except (
                OSError,
                TimeoutError,
                ClientError,
                websockets.InvalidHandshake,
                websockets.ConnectionClosed,
            ) as exc:  # still restarting
                if isinstance(exc, ClientError) and exc.code not in RECONNECT_CODES and exc.code != "server_full":
                    raise
                if time.monotonic() > deadline:
                    raise ClientError(
                        f"lost the session ({why}) and could not reconnect within {self.reconnect_timeout:g} s: {exc}"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    # ---------------------------------------------------------------- streaming

    async def frames(self, seconds: float | None = None, blocks: int | None = None) -> AsyncIterator[Frame]:
        """Audio frames until ``seconds`` of audio or ``blocks`` frames (``None``: until the server stops).

        Raises:
            ClientError: the session ended with an error (after reconnect attempts, where enabled).
        """
        import websockets

        assert self._ws is not None, "start() first"
        limit = None if seconds is None else round(seconds * int(self.started["sample_rate"]))
        count = 0
        while (limit is None or self.position < limit) and (blocks is None or count < blocks):
            try:
                raw = await self._ws.recv()
            except websockets.ConnectionClosed as closed:
                code, reason = _close_of(closed)
                if code == 1000 or self._stopping:
                    return
                if self.reconnect and code in RECONNECT_CODES:
                    await self._resume(f"{code}: {reason}")
                    continue
                said = f"; its last error: {self.errors[-1]['message']}" if self.errors else ""
                raise ClientError(f"the server closed the session ({code}: {reason}){said}", code) from None
            now = time.monotonic()
            if isinstance(raw, str):
                self._on_message(json.loads(raw), now)
                continue
            header = AudioHeader.unpack(raw)
            pcm = np.frombuffer(raw, dtype="<i2", offset=32).reshape(header.frames, header.channels)
            if self.ack and not header.last:
                with contextlib.suppress(websockets.ConnectionClosed):  # the next recv sees the close and reconnects
                    await self._send({"type": "ack", "block": header.block})
            assert self.clock is not None
            plays_at = self.clock.arrive(header.frames, now) if header.frames else now
            frame = Frame(header, pcm, self._session_origin + header.first_sample, now, plays_at, self._session_index)
            self._remember(pcm)
            self._note_plays(frame)
            self.position = frame.position + header.frames
            count += 1
            yield frame
            if header.last:
                return

    def _on_message(self, message: dict[str, Any], now: float) -> None:
        """Server messages during the stream. An ``error`` does not end it (the server goes on, or closes, and the
        close decides); answers to prompt changes come in the order the changes went out."""
        self.events.append({**message, "at": now})
        pending = [s for s in self.latencies if s.from_block == -1]
        if message.get("type") == "error":
            self.errors.append(message)
            if message.get("to") == "set_prompts" and pending:
                pending[0].from_block = -2  # refused: never heard
        elif message.get("type") == "prompts_set" and pending:
            sample = pending[0]
            sample.from_block = int(message["from_block"])
            sample.position = self._session_origin + sample.from_block * int(self.started["block_samples"])

    def _note_plays(self, frame: Frame) -> None:
        end = frame.position + frame.header.frames
        for sample in self.latencies:
            if sample.played is None and sample.from_block >= 0 and frame.position <= sample.position < end:
                sample.played = frame.plays_at + (sample.position - frame.position) / int(self.started["sample_rate"])

    # ---------------------------------------------------------------- control

    async def set_prompts(self, prompts: list[WeightedPrompt]) -> LatencySample:
        """Change the prompts; the returned sample's ``seconds`` is the control latency once the first sample
        generated under them has been played (by :class:`PlaybackClock`)."""
        assert self._settings is not None
        self._settings.prompts = list(prompts)
        sample = LatencySample(time.monotonic(), -1, -1)
        self.latencies.append(sample)
        await self._send({"type": "set_prompts", "prompts": [p.model_dump() for p in prompts]})
        return sample

    async def pause(self) -> None:
        self._paused_at = time.monotonic()
        await self._send({"type": "pause"})

    async def play(self) -> None:
        if self._paused_at is not None and self.clock is not None:
            self.clock.hold(time.monotonic() - self._paused_at)
        self._paused_at = None
        await self._send({"type": "play"})

    async def stop(self) -> None:
        """Ask the server to end the stream (it sends the decoder's tail as the last frame, then closes)."""
        self._stopping = True
        await self._send({"type": "stop"})

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
