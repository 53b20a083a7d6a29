"""``lmdm serve``: the Ray Serve application. A FastAPI ingress on one deployment, :class:`LMDMServer`:

- ``WS /v1/stream``: one connection = one session (its own engine state and KV cache); the protocol is
  :mod:`lmdm.serve.protocol`.
- ``POST /v1/generate``: N seconds as a chunked WAV stream (for scripts).
- ``GET /healthz``, ``GET /v1/stats`` (sessions, blocks/s, underruns, queue depth), ``GET /`` (the browser
  instrument, :mod:`lmdm.serve.web`).

A replica loads the checkpoints, then generates ``serve.warmup_blocks`` blocks (compiling where the runtime
compiles) before its constructor returns, so Serve routes to it only once it is warm. All torch work runs on
one worker thread per replica (:class:`BlockWorker`), never on the event loop. Live sessions ask
:class:`BlockScheduler` for their blocks: with ``serve.batching`` on, every session waiting when the thread comes
free gets its block from one batched call (:func:`~lmdm.serve.session.next_chunks`), so a replica steps its
concurrent sessions together. ``max_ongoing_requests`` is ``serve.max_sessions +
serve.spare_requests``: every WebSocket holds a request slot for its whole life, and the spare slots keep
health checks, stats and refusals answering while the sessions are full (the app refuses session
``max_sessions + 1`` itself, with close code 1013 and a reason).

Build it with :func:`build_app` (``lmdm serve``) or, for ``serve run`` / ``serve deploy``, :func:`app_builder`
(``infra/serve.yaml``).
"""

# No `from __future__ import annotations`: Serve's class-based ingress re-signs the routes, and FastAPI must
# resolve their parameter types (WebSocket, Request, the body model) as objects, not strings.
import asyncio
import collections
import contextlib
import hmac
import itertools
import json
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from lmdm.config import Config
from lmdm.serve.protocol import (
    Ack,
    AudioHeader,
    CloseCode,
    Pause,
    Play,
    ProtocolError,
    SetPrompts,
    Start,
    Stop,
    WeightedPrompt,
    parse_client_message,
    prompt_set,
)
from lmdm.serve.session import Chunk, Pacer, ServeModels, SessionError, StreamSession, encode_context, next_chunks, pcm16

__all__ = ["BlockWorker", "GenerateRequest", "LMDMServer", "app_builder", "build_app", "deployment_options"]

T = TypeVar("T")
# no /docs, /redoc or /openapi.json: every route but the page, its scripts and /healthz is the token holder's
app = FastAPI(
    title="lmdm serve",
    description="Live Music Diffusion Model streaming: WS /v1/stream, POST /v1/generate",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


class BlockWorker:
    """Runs torch work on one thread, off the event loop; ``depth`` is the jobs waiting or running."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmdm-torch")
        self.depth = 0

    async def run(self, fn: Any, *args: Any) -> Any:
        self.depth += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self.depth -= 1


class BlockScheduler:
    """Where live sessions get their blocks. Off (``serve.batching=off``): each request is its own job on the worker
    thread. On: requests wait in one queue; whenever the thread comes free, every waiting session's block is made
    in one :func:`~lmdm.serve.session.next_chunks` call (sessions that share a denoising step stepped as one batch,
    the others in turn, every decode batched). A session that joins while a batch runs is in the next one.
    A failed batch fails the sessions in it (their streams end with an error), not the replica.
    """

    def __init__(self, worker: BlockWorker, batching: bool) -> None:
        self.worker, self.batching = worker, batching
        self._waiting: list[tuple[StreamSession, asyncio.Future[Chunk]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self.batches = 0
        self.batched_blocks = 0

    async def next_chunk(self, session: StreamSession) -> Chunk:
        if not self.batching:
            chunk: Chunk = await self.worker.run(session.next_chunk)
            return chunk
        future: asyncio.Future[Chunk] = asyncio.get_running_loop().create_future()
        self._waiting.append((session, future))
        if self._drainer is None or self._drainer.done():  # the loop ends, with no await, when the queue is empty
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            # sessions whose wait was cancelled (a client that left) are not stepped: their rows may be freed
            batch = [(s, f) for s, f in self._waiting if not f.done()]
            self._waiting = []
            if not batch:
                continue
            try:
                chunks = await self.worker.run(next_chunks, [s for s, _ in batch])
            except Exception as exc:  # handed to every session of the batch
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.batches += 1
            self.batched_blocks += len(batch)
            for (_, f), chunk in zip(batch, chunks, strict=True):
                if not f.done():
                    f.set_result(chunk)


class GenerateRequest(BaseModel):
    """``POST /v1/generate``'s body."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, min_length=1, max_length=65536)
    prompts: list[WeightedPrompt] | None = Field(None, max_length=64)
    seconds: float = Field(gt=0.0)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    steps: int | None = Field(None, ge=1)
    cfg: float | None = Field(None, ge=0.0, le=30.0)


@dataclass
class _Live:
    """What ``/v1/stats`` shows of one session."""

    kind: str  # "stream" or "generate"
    started: float
    block: int = 0
    ahead_blocks: float = 0.0
    unacked: int = 0
    paused: bool = False
    underruns: int = 0
    prompt: str = ""


@dataclass
class _Stats:
    sessions_total: int = 0
    refused_full: int = 0
    blocks: int = 0
    underruns: int = 0
    recent: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=4096))

    def block_done(self) -> None:
        self.blocks += 1
        self.recent.append(time.monotonic())

    def blocks_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        n = sum(1 for t in self.recent if now - t <= window)
        return n / window


def deployment_options(cfg: Config) -> dict[str, Any]:
    """Serve options from ``serve.*``: replicas, request slots (sessions + spares), CPUs per replica."""
    s = cfg.serve
    return {
        "num_replicas": s.replicas,
        "max_ongoing_requests": s.max_sessions + s.spare_requests,
        "max_queued_requests": s.spare_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus},
        "health_check_period_s": 5.0,
        "graceful_shutdown_timeout_s": 5.0,
    }


def _wav_header(frames: int, channels: int, sample_rate: int) -> bytes:
    data = frames * channels * 2
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16)
        + b"data"
        + struct.pack("<I", data)
    )


class _Disconnected(Exception):
    """The client went away mid-message."""


class _Refused(Exception):
    def __init__(self, code: CloseCode, error: str, message: str) -> None:
        super().__init__(message)
        self.code, self.error = code, error


async def _send_json(ws: WebSocket, data: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):  # the client is gone: nothing to tell it
        await ws.send_text(json.dumps(data))


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    reason_bytes = reason.encode()[:120]
    with contextlib.suppress(Exception):  # closed already
        await ws.close(code=int(code), reason=reason_bytes.decode(errors="ignore"))


def _replica_tag() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:
        return "local"


def _web_file(name: str) -> str:
    return (resources.files("lmdm.serve") / "web" / name).read_text(encoding="utf-8")


class _Connection:
    """One WebSocket session: a receive loop (control messages, acks, the idle timeout) and a generation loop
    (pacing against real time and the client's acks)."""

    def __init__(self, server: "LMDMServer", ws: WebSocket, sid: int) -> None:
        self.server, self.ws, self.sid = server, ws, sid
        self.cfg = server.cfg.serve
        self.models = server.models
        self.info = server.live[sid]
        self.session: StreamSession | None = None
        self.generator: asyncio.Task[None] | None = None
        self.control_tasks: set[asyncio.Task[None]] = set()
        self.control_lock = asyncio.Lock()
        self.wake = asyncio.Event()
        self.stopping = False
        self.pacer = Pacer(server.models.sample_rate)
        self.sent_block = -1
        self.acked = -1
        self.tokens = float(self.cfg.control_burst)
        self.refilled = time.monotonic()
        self.over_limit = 0

    @property
    def paused(self) -> bool:
        return self.pacer.paused_at is not None

    async def run(self) -> None:
        try:
            await self._receive()
            if self.stopping and self.generator is not None:
                await self.generator  # finish: the decoder's tail, 'stopped', close
            elif self.stopping:
                await _close(self.ws, CloseCode.NORMAL, "stopped")
        except _Disconnected:
            pass
        finally:
            for task in [*self.control_tasks, self.generator]:
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if self.session is not None:  # its pooled cache row back, on the worker thread: after any block using it
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.server.worker.run(self.session.close)
            self.session = None

    # ---------------------------------------------------------------- receiving

    async def _receive(self) -> None:
        while True:
            # a paused player sends nothing (no frames to ack): the idle timeout waits for it to play again, and the
            # server's WebSocket pings still find a peer that is gone
            timeout = None if self.paused else self.cfg.idle_timeout_s
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout=timeout)
            except TimeoutError:
                await self._fail(CloseCode.IDLE, "idle", f"nothing received for {self.cfg.idle_timeout_s:g} s (serve.idle_timeout_s)")
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await self._fail(
                    CloseCode.UNSUPPORTED, "unexpected_binary", "a binary message without a 'start' that announced context audio"
                )
                return
            try:
                parsed: Any = parse_client_message(text, self.cfg.max_message_bytes)
                problem: ProtocolError | None = None
            except ProtocolError as exc:
                if exc.code == "too_big":
                    await self._fail(CloseCode.TOO_BIG, "too_big", str(exc))
                    return
                parsed, problem = None, exc
            if not isinstance(parsed, Ack):  # every message but a good ack costs a token, bad ones included
                verdict = await self._charge()
                if verdict == "close":
                    return
                if verdict == "drop":
                    continue
            kind = parsed.type if parsed is not None else None
            try:
                if problem is not None:
                    raise problem
                if await self._handle(parsed):
                    return
            except (ProtocolError, SessionError) as exc:
                code = exc.code if isinstance(exc, ProtocolError) else "invalid"
                await _send_json(self.ws, {"type": "error", "error": code, "message": str(exc), "to": kind})
            except _Disconnected:
                raise
            except Exception as exc:  # a bug of ours must not end the session without a word, nor touch other sessions
                await _send_json(self.ws, {"type": "error", "error": "internal", "message": f"{type(exc).__name__}: {exc}", "to": kind})
            self.wake.set()

    async def _charge(self) -> Literal["take", "drop", "close"]:
        """Take a control-message token; without one the message is dropped (the first drop of a run says so),
        and a long run of drops closes the session."""
        if self._take_token():
            self.over_limit = 0
            return "take"
        self.over_limit += 1
        if self.over_limit > 2 * self.cfg.control_burst:
            await self._fail(CloseCode.RATE_LIMITED, "rate_limited", "far over the control-message rate (serve.control_rate): closing")
            return "close"
        if self.over_limit == 1:
            message = f"over {self.cfg.control_rate:g} control messages/s (serve.control_rate): messages dropped"
            await _send_json(self.ws, {"type": "error", "error": "rate_limited", "message": message})
        return "drop"

    def _take_token(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(self.cfg.control_burst), self.tokens + (now - self.refilled) * self.cfg.control_rate)
        self.refilled = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    async def _handle(self, message: Any) -> bool:
        """Act on one message; ``True`` ends the receive loop."""
        if isinstance(message, Ack):
            if message.block > self.sent_block:
                raise ProtocolError("invalid", f"ack for block {message.block}, but only blocks up to {self.sent_block} were sent")
            self.acked = max(self.acked, message.block)
            return False
        if isinstance(message, Start):
            if self.session is not None:
                raise ProtocolError("invalid", "start: this session has started already (one connection = one session)")
            await self._start(message)
            return False
        if self.session is None:
            raise ProtocolError("invalid", f"{message.type}: send 'start' first")
        if isinstance(message, SetPrompts):
            # off the receive loop (acks and disconnects keep flowing while it waits for the worker), in order
            task = asyncio.create_task(self._set_prompts(list(message.prompts)))
            self.control_tasks.add(task)
            task.add_done_callback(self.control_tasks.discard)
        elif isinstance(message, Pause):
            self.pacer.pause(time.monotonic())
            self.info.paused = True
            await _send_json(self.ws, {"type": "paused", "block": self.sent_block + 1})
        elif isinstance(message, Play):
            self.pacer.play(time.monotonic())
            self.info.paused = False
            await _send_json(self.ws, {"type": "playing", "block": self.sent_block + 1})
        elif isinstance(message, Stop):
            self.stopping = True
            self.wake.set()
            return True
        return False

    async def _set_prompts(self, prompts: list[WeightedPrompt]) -> None:
        session = self.session
        assert session is not None
        models = self.models

        def apply() -> tuple[int, str]:  # one worker job: the change applies from the next block not yet begun
            condition = models.condition(prompts)
            return session.set_condition(condition), condition.key

        async with self.control_lock:
            try:
                from_block, key = await self.server.worker.run(apply)
            except SessionError as exc:
                await _send_json(self.ws, {"type": "error", "error": "invalid", "message": str(exc), "to": "set_prompts"})
                return
            self.info.prompt = key
            await _send_json(self.ws, {"type": "prompts_set", "from_block": from_block, "key": key})

    async def _start(self, message: Start) -> None:
        prompts = prompt_set(message.prompt, message.prompts)
        context = None
        if message.context is not None:
            context = await self._receive_context(message)
        condition = await self.server.worker.run(self.models.condition, prompts)
        self.session = await self.server.worker.run(
            StreamSession, self.models, condition, message.seed, message.steps, message.cfg, context, self.server.cfg.serve.batching
        )
        self.info.prompt = condition.key
        m = self.models
        await _send_json(
            self.ws,
            {
                "type": "started",
                "session": self.sid,
                "sample_rate": m.sample_rate,
                "channels": m.channels,
                "block_samples": m.block_samples,
                "latency_samples": m.latency_samples,
                "context_samples": m.context_blocks * m.block_samples,
                "blocks_ahead": self.cfg.blocks_ahead,
                "max_unacked": self.cfg.max_unacked,
                "resumed": context is not None,
                "warm_block_seconds": round(self.server.warm_block_s, 4),
                "key": condition.key,
            },
        )
        self.generator = asyncio.create_task(self._generate())

    async def _receive_context(self, message: Start) -> Any:
        import numpy as np

        ctx, m = message.context, self.models
        assert ctx is not None
        most = m.context_blocks * m.block_samples
        if ctx.sample_rate != m.sample_rate or ctx.channels != m.channels:
            raise ProtocolError(
                "invalid",
                f"start.context: {ctx.channels} ch at {ctx.sample_rate} Hz; this model streams {m.channels} ch at {m.sample_rate} Hz",
            )
        if ctx.frames % m.block_samples or ctx.frames > most:
            raise ProtocolError(
                "invalid", f"start.context: {ctx.frames} frames; send whole blocks of {m.block_samples}, at most {most} (context_samples)"
            )
        try:
            message_in = await asyncio.wait_for(self.ws.receive(), timeout=self.cfg.idle_timeout_s)
        except TimeoutError:
            raise ProtocolError("invalid", "start.context announced, but no binary message followed") from None
        data = message_in.get("bytes")
        if message_in["type"] == "websocket.disconnect":
            raise _Disconnected
        if data is None or len(data) != 2 * ctx.frames * ctx.channels:
            raise ProtocolError(
                "invalid", f"start.context: expected one binary message of {2 * ctx.frames * ctx.channels} bytes of 16-bit PCM"
            )
        pcm = np.frombuffer(data, dtype="<i2").reshape(ctx.frames, ctx.channels)
        return await self.server.worker.run(encode_context, m.vae, pcm)

    async def _fail(self, code: CloseCode, error: str, message: str) -> None:
        await _send_json(self.ws, {"type": "error", "error": error, "message": message})
        await _close(self.ws, code, message)

    # ---------------------------------------------------------------- generating

    async def _generate(self) -> None:
        try:
            await self._generate_blocks()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed block ends this session, not the replica
            await self._fail(CloseCode.INTERNAL, "internal", f"generation failed: {type(exc).__name__}: {exc}")

    async def _generate_blocks(self) -> None:
        session = self.session
        assert session is not None
        m, limit = self.models, self.cfg.blocks_ahead * self.models.block_samples
        while not self.stopping:
            ahead = self.pacer.ahead(time.monotonic())
            unacked = self.sent_block - self.acked
            self.info.ahead_blocks, self.info.unacked = round(ahead / m.block_samples, 3), unacked
            if self.paused or unacked >= self.cfg.max_unacked or (self.pacer.t0 is not None and ahead >= limit):
                wait = None if self.paused or unacked >= self.cfg.max_unacked else (ahead - limit) / m.sample_rate + 1e-3
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=wait)
                continue
            chunk = await self.server.blocks.next_chunk(session)
            self.server.stats.block_done()
            if self.pacer.send(chunk.pcm.shape[0], time.monotonic()):  # the client ran dry before this frame went out
                self.info.underruns += 1
                self.server.stats.underruns += 1
            header = AudioHeader(self.sid, chunk.block, m.sample_rate, m.channels, chunk.pcm.shape[0], chunk.first_sample)
            self.sent_block = chunk.block  # before the send: an ack may come back before the send returns
            self.info.block = chunk.block + 1
            await self.ws.send_bytes(header.pack() + chunk.pcm.tobytes())
        await self._finish(session)

    async def _finish(self, session: StreamSession) -> None:
        """After ``stop``: the decoder's held-back tail as the last frame, ``stopped``, close 1000."""
        import torch

        def tail() -> Any:
            with torch.inference_mode():
                return pcm16(session.stream.close()[0])

        pcm = await self.server.worker.run(tail)
        m = self.models
        header = AudioHeader(self.sid, session.block, m.sample_rate, m.channels, pcm.shape[0], session.samples, last=True)
        await self.ws.send_bytes(header.pack() + pcm.tobytes())
        await _send_json(self.ws, {"type": "stopped", "blocks": session.block, "samples": session.samples + pcm.shape[0]})
        await _close(self.ws, CloseCode.NORMAL, "stopped")


# Defined after everything its routes call: Serve pickles the ingress routes by value, with the module globals
# they name at that point.
@serve.deployment
@serve.ingress(app)
class LMDMServer:
    """One replica: the models, one torch worker thread, the live sessions and their counters."""

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        self.cfg = Config.model_validate(config)
        s = self.cfg.serve
        torch.set_num_threads(s.threads or os.cpu_count() or 1)
        self.models = ServeModels.load(self.cfg, s.dit, s.autoencoder)
        self.worker = BlockWorker()
        self.blocks = BlockScheduler(self.worker, s.batching)
        self.block_seconds = self.models.block_samples / self.models.sample_rate
        begin = time.perf_counter()
        self.warm_block_s = self.models.warm_up(s.warmup_blocks)
        self.warmup_s = time.perf_counter() - begin
        self.live: dict[int, _Live] = {}
        self.stats = _Stats()
        self._ids = itertools.count(1)

    # ---------------------------------------------------------------- plain HTTP

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"ok": True, "sessions": len(self.live), "max_sessions": self.cfg.serve.max_sessions}

    @app.get("/v1/stats")
    async def stats_view(self, request: Request) -> Any:  # on the event loop: no other coroutine changes `live` meanwhile
        if (problem := self._check_token(request.headers, request.query_params)) is not None:
            return JSONResponse({"error": "unauthorized", "message": problem}, status_code=401)
        m = self.models
        return {
            "replica": _replica_tag(),
            "pid": os.getpid(),
            "sessions": len(self.live),
            "max_sessions": self.cfg.serve.max_sessions,
            "sessions_total": self.stats.sessions_total,
            "refused_full": self.stats.refused_full,
            "blocks": self.stats.blocks,
            "blocks_per_second": round(self.stats.blocks_per_second(), 4),
            "underruns": self.stats.underruns,
            "queue_depth": self.worker.depth,
            "batching": {
                "on": self.blocks.batching,
                "batches": self.blocks.batches,
                "mean_sessions_per_batch": round(self.blocks.batched_blocks / max(self.blocks.batches, 1), 3),
            },
            "block_seconds": self.block_seconds,
            "warm_block_seconds": round(self.warm_block_s, 4),
            "warmup_seconds": round(self.warmup_s, 3),
            "model": {"dit": m.dit_source, "autoencoder": m.autoencoder_source, "runtime": m.runtime.name, "text": m.text},
            "live": {str(k): vars(v) for k, v in self.live.items()},
        }

    @app.get("/", response_class=HTMLResponse)
    def instrument(self) -> HTMLResponse:
        return HTMLResponse(_web_file("index.html"))

    @app.get("/web/{name}")
    def web_file(self, name: str) -> Response:
        if name not in ("instrument.js", "worklet.js"):
            return JSONResponse({"error": "not_found", "message": f"no file {name!r}"}, status_code=404)
        return Response(_web_file(name), media_type="text/javascript")

    # ---------------------------------------------------------------- access checks

    def _check_token(self, headers: Any, query: Any) -> str | None:
        token = self.cfg.serve.token or os.environ.get("LMDM_SERVE_TOKEN")
        if not token:
            return None
        auth = headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else query.get("token", "")
        if not given:
            return "this server needs a bearer token: send 'Authorization: Bearer <token>' (or ?token=<token>)"
        if not hmac.compare_digest(given.encode(), token.encode()):
            return "wrong bearer token"
        return None

    def _check_origin(self, headers: Any) -> str | None:
        origin = headers.get("origin")
        if not origin:
            return None  # not a browser page: scripts and the Python client send no Origin
        if origin in self.cfg.serve.allowed_origins:
            return None
        host = headers.get("host", "")
        # the page's own origin, on a loopback name or the bind address (not any Host a page's DNS may point here:
        # a rebinding page has Origin and Host alike, on a name of its own)
        names = {"127.0.0.1", "localhost", "::1", "[::1]", self.cfg.serve.host}
        if urlsplit(origin).netloc == host and urlsplit(origin).hostname in names:
            return None
        return f"Origin {origin} is not allowed: open the instrument from this server's address or add the Origin to serve.allowed_origins"

    def _admit(self, headers: Any, query: Any) -> None:
        if (problem := self._check_origin(headers)) is not None:
            raise _Refused(CloseCode.FORBIDDEN_ORIGIN, "forbidden_origin", problem)
        if (problem := self._check_token(headers, query)) is not None:
            raise _Refused(CloseCode.UNAUTHORIZED, "unauthorized", problem)
        if len(self.live) >= self.cfg.serve.max_sessions:
            self.stats.refused_full += 1
            n = self.cfg.serve.max_sessions
            raise _Refused(CloseCode.FULL, "server_full", f"server full: {n} of {n} sessions live (serve.max_sessions); try again later")

    # ---------------------------------------------------------------- POST /v1/generate

    @app.post("/v1/generate")
    async def generate(self, body: GenerateRequest, request: Request) -> Response:
        try:
            self._admit(request.headers, request.query_params)
        except _Refused as refused:
            status = {CloseCode.FULL: 503, CloseCode.UNAUTHORIZED: 401}.get(refused.code, 403)
            return JSONResponse({"error": refused.error, "message": str(refused)}, status_code=status)
        limit = self.cfg.serve.max_generate_seconds
        if body.seconds > limit:
            return JSONResponse(
                {"error": "invalid", "message": f"seconds = {body.seconds:g}; at most {limit:g} (serve.max_generate_seconds)"}, 422
            )
        try:
            prompts = prompt_set(body.prompt, body.prompts)
        except ProtocolError as exc:
            return JSONResponse({"error": exc.code, "message": str(exc)}, 422)
        m = self.models
        total = round(body.seconds * m.sample_rate)
        if 44 + 2 * total * m.channels >= 2**32:
            return JSONResponse({"error": "invalid", "message": f"{body.seconds:g} s is over a WAV file's 4 GiB: ask for less"}, 422)
        sid = next(self._ids)
        self.live[sid] = _Live("generate", time.monotonic())
        try:
            condition = await self.worker.run(self.models.condition, prompts)
            session = await self.worker.run(StreamSession, self.models, condition, body.seed, body.steps, body.cfg)
        except SessionError as exc:
            self.live.pop(sid, None)
            return JSONResponse({"error": "invalid", "message": str(exc)}, 422)
        except BaseException:  # cancelled (the client hung up while queued) or failed: the slot is freed either way
            self.live.pop(sid, None)
            raise
        self.stats.sessions_total += 1

        async def body_chunks() -> Any:
            try:
                yield _wav_header(total, m.channels, m.sample_rate)
                sent = 0
                while sent < total:
                    chunk = await self.worker.run(session.next_chunk)
                    self.stats.block_done()
                    self.live[sid].block = chunk.block + 1
                    pcm = chunk.pcm[: total - sent]
                    sent += pcm.shape[0]
                    yield pcm.tobytes()
            finally:
                self.live.pop(sid, None)

        return StreamingResponse(body_chunks(), media_type="audio/wav", headers={"X-LMDM-Session": str(sid)})

    # ---------------------------------------------------------------- WS /v1/stream

    @app.websocket("/v1/stream")
    async def stream(self, ws: WebSocket) -> None:
        await ws.accept()
        try:
            self._admit(ws.headers, ws.query_params)
        except _Refused as refused:
            await _send_json(ws, {"type": "error", "error": refused.error, "message": str(refused)})
            await _close(ws, refused.code, str(refused))
            return
        sid = next(self._ids)
        self.live[sid] = _Live("stream", time.monotonic())
        self.stats.sessions_total += 1
        try:
            await _Connection(self, ws, sid).run()
        finally:
            self.live.pop(sid, None)  # freed at once: the stats no longer count it


def build_app(cfg: Config) -> Any:
    """The Serve application for ``cfg`` (``serve.dit`` / ``serve.autoencoder`` name the checkpoints)."""
    return LMDMServer.options(**deployment_options(cfg)).bind(cfg.model_dump(mode="json"))


class BuilderArgs(BaseModel):
    """``serve run`` / ``serve deploy`` arguments (``infra/serve.yaml``'s ``args``)."""

    model_config = ConfigDict(extra="forbid")

    config: str = "quickstart"
    overrides: list[str] = Field(default_factory=list)


def app_builder(args: dict[str, Any]) -> Any:
    """The application builder ``serve run`` imports (``import_path: lmdm.serve.app:app_builder``).

    Raises:
        ValueError: unknown arguments, or a config without ``serve.dit`` (on a cluster, name the checkpoint).
    """
    from lmdm.config import load_config

    parsed = BuilderArgs.model_validate(args)
    cfg = load_config(parsed.config, parsed.overrides)
    if cfg.serve.dit is None or cfg.serve.autoencoder is None:
        raise ValueError(
            "serve run needs serve.dit and serve.autoencoder (checkpoint folders every replica can read); set them in args.overrides"
        )
    return build_app(cfg)
