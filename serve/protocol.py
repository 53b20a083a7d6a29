"""The live streaming protocol of ``WS /v1/stream``: JSON control messages in, audio frames out.

One WebSocket connection is one session. The client sends JSON text messages; the server sends JSON text
messages (``started``, ``prompts_set``, ``paused``, ``playing``, ``error``, ``stopped``) and binary audio
frames. Each audio frame is a 32-byte little-endian header (:class:`AudioHeader`) followed by 16-bit PCM,
channels interleaved::

    offset size  field
    0      4     magic  b"LMDA"
    4      1     version (1)
    5      1     channels
    6      2     flags (bit 0: the last frame of the session)
    8      4     session   (this replica's session number)
    12     4     block     (the latent block this audio ends; see below)
    16     4     sample_rate
    20     4     frames    (samples per channel in this frame)
    24     8     first_sample (index of the frame's first sample in the session, per channel)

Audio lags the latents by the decoder's lookahead (``latency_samples`` in ``started``): frame ``k`` holds
samples ``[k·S - lat, (k+1)·S - lat)`` of the session (``S`` = ``block_samples``; frame 0 starts at 0), so the
first sample generated under a prompt set that applies ``from_block = j`` is sample ``j·S``.

Flow control: the client acknowledges each audio frame (``{"type": "ack", "block": k}``); the server keeps
at most ``max_unacked`` frames unacknowledged and never runs more than ``blocks_ahead`` blocks ahead of
real time, so a client that stops reading costs the server nothing more. See the README for an example
exchange and the close codes (:class:`CloseCode`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

__all__ = [
    "HEADER",
    "MAGIC",
    "Ack",
    "AudioHeader",
    "ClientMessage",
    "CloseCode",
    "ContextAudio",
    "Pause",
    "Play",
    "ProtocolError",
    "SetPrompts",
    "Start",
    "Stop",
    "WeightedPrompt",
    "parse_client_message",
    "prompt_key",
    "prompt_set",
]

MAGIC = b"LMDA"
VERSION = 1
HEADER = struct.Struct("<4sBBHIIIIQ")
FLAG_LAST = 1


class CloseCode(IntEnum):
    """WebSocket close codes the server uses (4000–4999 are the application's own)."""

    NORMAL = 1000  # the client sent stop, or the session ended
    UNSUPPORTED = 1003  # a binary message where none was announced
    TOO_BIG = 1009  # a message over serve.max_message_bytes
    INTERNAL = 1011  # the server failed generating (the reason says why)
    FULL = 1013  # try again later: serve.max_sessions sessions are live
    UNAUTHORIZED = 4401  # missing or wrong bearer token
    FORBIDDEN_ORIGIN = 4403  # a browser page from an Origin not allowed
    IDLE = 4408  # nothing received (not even acks) for serve.idle_timeout_s
    RATE_LIMITED = 4429  # control messages far over serve.control_rate


@dataclass(frozen=True)
class AudioHeader:
    """The header of a binary audio frame (see the module docstring)."""

    session: int
    block: int
    sample_rate: int
    channels: int
    frames: int
    first_sample: int
    last: bool = False

    def pack(self) -> bytes:
        flags = FLAG_LAST if self.last else 0
        return HEADER.pack(MAGIC, VERSION, self.channels, flags, self.session, self.block, self.sample_rate, self.frames, self.first_sample)

    @staticmethod
    def unpack(data: bytes) -> AudioHeader:
        """The header of ``data`` (a whole frame); raises ``ValueError`` on a short frame or a foreign magic/version."""
        if len(data) < HEADER.size:
            raise ValueError(f"an audio frame is at least {HEADER.size} bytes, got {len(data)}")
        magic, version, channels, flags, session, block, rate, frames, first = HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"not an LMDM audio frame (magic {magic!r}, version {version}; expected {MAGIC!r}, {VERSION})")
        if len(data) != HEADER.size + 2 * channels * frames:
            raise ValueError(f"audio frame of {len(data)} bytes; its header says {frames} frames × {channels} channels")
        return AudioHeader(session, block, rate, channels, frames, first, bool(flags & FLAG_LAST))


class ProtocolError(ValueError):
    """A client message the server cannot use: ``code`` names the kind (``bad_json``, ``unknown_type``,
    ``invalid``, ``too_big``, ...), the message says what and how to fix it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightedPrompt(_Message):
    text: str = Field(min_length=1)
    weight: float = Field(1.0, ge=0.0, le=100.0)

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("a prompt weight must be a finite number")
        return value


class ContextAudio(_Message):
    """Starting audio sent right after ``start`` as one binary message of 16-bit PCM, channels interleaved."""

    frames: int = Field(ge=1)
    channels: int = Field(ge=1, le=8)
    sample_rate: int = Field(ge=1)


class Start(_Message):
    type: Literal["start"]
    prompt: str | None = Field(None, min_length=1)
    prompts: list[WeightedPrompt] | None = Field(None, max_length=64)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    steps: int | None = Field(None, ge=1)
    cfg: float | None = Field(None, ge=0.0, le=30.0)
    context: ContextAudio | None = None


class SetPrompts(_Message):
    type: Literal["set_prompts"]
    prompts: list[WeightedPrompt] = Field(min_length=1, max_length=64)


class Pause(_Message):
    type: Literal["pause"]


class Play(_Message):
    type: Literal["play"]


class Stop(_Message):
    type: Literal["stop"]


class Ack(_Message):
    type: Literal["ack"]
    block: int = Field(ge=0)


ClientMessage = Annotated[Start | SetPrompts | Pause | Play | Stop | Ack, Field(discriminator="type")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(ClientMessage)
TYPES = ("start", "set_prompts", "pause", "play", "stop", "ack")


def parse_client_message(raw: str | bytes, max_bytes: int) -> Start | SetPrompts | Pause | Play | Stop | Ack:
    """One client text message, validated.

    Raises:
        ProtocolError: too big (``too_big``), not JSON (``bad_json``), no or an unknown ``type``
            (``unknown_type``), or fields that do not validate (``invalid``; the message names them).
    """
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise ProtocolError("too_big", f"a control message of {size} bytes; the server takes at most {max_bytes} (serve.max_message_bytes)")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, a 5000-digit number, deep nesting
        raise ProtocolError("bad_json", f"not JSON that can be read: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_json", f"a message is a JSON object with a 'type', got {type(data).__name__}")
    kind = data.get("type")
    if kind not in TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}; expected one of {', '.join(TYPES)}")
    try:
        message: Start | SetPrompts | Pause | Play | Stop | Ack = _ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or kind}: {e['msg']}" for e in exc.errors())
        raise ProtocolError("invalid", f"{kind}: {problems}") from None
    return message


def prompt_set(prompt: str | None, prompts: list[WeightedPrompt] | None) -> list[WeightedPrompt]:
    """A request's prompt set: one ``prompt`` (weight 1) or weighted ``prompts`` (none: unconditional).

    Raises:
        ProtocolError: both given.
    """
    if prompt is not None and prompts is not None:
        raise ProtocolError("invalid", "give either 'prompt' or 'prompts', not both")
    return [WeightedPrompt(text=prompt)] if prompt is not None else list(prompts or [])


def prompt_key(prompts: list[WeightedPrompt]) -> str:
    """A prompt set's cache key: its prompts and normalised weights, order-free (the same blend, the same key)."""
    total = sum(p.weight for p in prompts)
    merged: dict[str, float] = {}
    for p in prompts:
        merged[p.text] = merged.get(p.text, 0.0) + p.weight / total
    return json.dumps(sorted((text, round(w, 6)) for text, w in merged.items() if w > 0), ensure_ascii=False)
