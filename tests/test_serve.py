"""``lmdm serve``: a real Ray Serve app on loopback (one instance for the module), real WebSocket clients.

The model is tiny (random weights saved as real checkpoints); sessions stream blocks that must equal the
offline rollout, decoded by the streaming decoder, after the same int16 conversion.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmdm.builders import build_autoencoder_from, build_dit, build_engine, build_runtime, load_stream_models
from lmdm.checkpoints.format import TrainedWith, save_checkpoint
from lmdm.config import Config, load_config
from lmdm.models.autoencoder import StreamingDecoder
from lmdm.serve.protocol import HEADER, AudioHeader, CloseCode, WeightedPrompt, prompt_key
from lmdm.serve.session import blend, encode_context, pcm16
from lmdm.streaming.common import Condition
from lmdm.streaming.rollout import rollout

pytestmark = pytest.mark.slow

TINY = [
    "dit.width=64",
    "dit.depth=1",
    "dit.head_dim=32",
    "dit.project_cond_tokens=true",
    "autoencoder.channels=8",
    "stream.block_frames=4",
    "stream.context_blocks=2",
    "stream.steps=2",
    "stream.runtime=packed",
    "serve.threads=1",
    "serve.warmup_blocks=1",
    "serve.max_sessions=3",
    "serve.spare_requests=6",
    "serve.idle_timeout_s=6",
    "serve.control_rate=5",
    "serve.control_burst=5",
    "serve.max_message_bytes=2048",
    "serve.max_prompt_chars=200",
    "serve.max_unacked=3",
    "serve.token=s3cret-token",
]
TOKEN = {"Authorization": "Bearer s3cret-token"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(local_ray: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One Serve instance for the module: tiny checkpoints, loopback, a free port."""
    from ray import serve

    from lmdm.serve.app import build_app

    root = tmp_path_factory.mktemp("serve")
    cfg = load_config("quickstart", TINY)
    torch.manual_seed(0)
    ae = save_checkpoint(root / "autoencoder", build_autoencoder_from(cfg), trained=TrainedWith(stage="autoencoder"))
    dit = save_checkpoint(root / "lmdm", build_dit(cfg), trained=TrainedWith(stage="lmdm", variant="block_causal"))
    port = _free_port()
    cfg = load_config("quickstart", [*TINY, f"serve.dit={dit}", f"serve.autoencoder={ae}", f"serve.port={port}"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="lmdm-test", route_prefix="/")
    yield _Server(cfg, f"127.0.0.1:{port}")
    serve.delete("lmdm-test")
    serve.shutdown()


class _Server:
    def __init__(self, cfg: Config, host: str) -> None:
        self.cfg, self.host = cfg, host
        self.ws_url = f"ws://{host}/v1/stream"
        self.http = f"http://{host}"
        self._offline: Any = None

    def stats(self) -> dict[str, Any]:
        import httpx

        result: dict[str, Any] = httpx.get(f"{self.http}/v1/stats", headers=TOKEN, timeout=30).json()
        return result

    def offline(self) -> Any:
        """The replica's models, loaded here the same way (same checkpoints, runtime, one thread)."""
        if self._offline is None:
            from lmdm.text.encoders import load_text_encoder

            encoder = load_text_encoder(self.cfg.text.encoder, self.cfg.text.path, self.cfg.text.max_tokens)
            dit, vae = load_stream_models(self.cfg, self.cfg.serve.dit, self.cfg.serve.autoencoder, encoder)
            self._offline = (dit.eval(), vae.eval(), encoder)
        return self._offline

    def reference(self, n_blocks: int, seed: int, schedule: Any, context: torch.Tensor | None = None) -> list[np.ndarray]:
        """Each block's final audio (int16) from the offline rollout and the streaming decoder."""
        dit, vae, _ = self.offline()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            engine = build_engine(self.cfg, dit, runtime=build_runtime(self.cfg, dit))
            with torch.inference_mode():
                latents = rollout(engine, n_blocks, schedule, context=context, generator=torch.Generator().manual_seed(seed))
                decoder = StreamingDecoder(vae)
                if context is not None:
                    decoder.prime(context)
                Bf = self.cfg.stream.block_frames
                return [pcm16(decoder.push(latents[..., i * Bf : (i + 1) * Bf])[0]) for i in range(n_blocks)]
        finally:
            torch.set_num_threads(threads)

    def condition(self, prompts: list[WeightedPrompt]) -> Condition:
        dit, _, encoder = self.offline()
        tokens = [encoder.encode([p.text]).tokens.to(next(dit.parameters()).dtype) for p in prompts]
        return Condition(blend(tokens, [p.weight for p in prompts]), prompt_key(prompts))


def _run(coro: Any, timeout: float = 120.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _connect(url: str, headers: dict[str, str] | None = TOKEN, **kwargs: Any) -> Any:
    import websockets

    return await websockets.connect(url, open_timeout=30, additional_headers=headers, **kwargs)


async def _next_json(ws: Any) -> dict[str, Any]:
    while True:
        raw = await ws.recv()
        if isinstance(raw, str):
            result: dict[str, Any] = json.loads(raw)
            return result


async def _frames(ws: Any, n: int, ack: bool = True, first: int = 0) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """``n`` audio frames (acknowledged) from block ``first`` on, and the JSON messages between them."""
    frames: list[np.ndarray] = []
    messages: list[dict[str, Any]] = []
    while len(frames) < n:
        raw = await ws.recv()
        if isinstance(raw, str):
            messages.append(json.loads(raw))
            continue
        header = AudioHeader.unpack(raw)
        assert header.block == first + len(frames)
        frames.append(np.frombuffer(raw, dtype="<i2", offset=HEADER.size).reshape(header.frames, header.channels))
        if ack:
            await ws.send(json.dumps({"type": "ack", "block": header.block}))
    return frames, messages


PROMPT_A, PROMPT_B = "Bach chorale, for organ, moderato", "Monteverdi madrigal, for strings, allegro"


def test_a_session_streams_the_offline_rollout(server: _Server) -> None:
    async def go() -> tuple[dict[str, Any], list[np.ndarray]]:
        ws = await _connect(server.ws_url)
        await ws.send(json.dumps({"type": "start", "prompt": PROMPT_A, "seed": 7}))
        started = await _next_json(ws)
        frames, _ = await _frames(ws, 5)
        await ws.close()
        return started, frames

    started, frames = _run(go())
    assert started["type"] == "started" and started["sample_rate"] == server.cfg.audio.sample_rate
    expected = server.reference(5, 7, server.condition([WeightedPrompt(text=PROMPT_A)]))
    assert [f.shape for f in frames] == [e.shape for e in expected]
    for got, want in zip(frames, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert sum(f.shape[0] for f in frames) == 5 * started["block_samples"] - started["latency_samples"]


def test_a_prompt_change_mid_stream_equals_the_offline_schedule(server: _Server) -> None:
    blend_b = [WeightedPrompt(text=PROMPT_A, weight=1.0), WeightedPrompt(text=PROMPT_B, weight=3.0)]

    async def go() -> tuple[int, list[np.ndarray]]:
        ws = await _connect(server.ws_url)
        await ws.send(json.dumps({"type": "start", "prompt": PROMPT_A, "seed": 3}))
        await _next_json(ws)
        first, _ = await _frames(ws, 2)
        await ws.send(json.dumps({"type": "set_prompts", "prompts": [p.model_dump() for p in blend_b]}))
        rest, messages = [], []
        while len(first) + len(rest) < 6:
            raw = await ws.recv()
            if isinstance(raw, str):
                messages.append(json.loads(raw))
                continue
            header = AudioHeader.unpack(raw)
            rest.append(np.frombuffer(raw, dtype="<i2", offset=HEADER.size).reshape(header.frames, header.channels))
            await ws.send(json.dumps({"type": "ack", "block": header.block}))
        await ws.close()
        (changed,) = [m for m in messages if m["type"] == "prompts_set"]
        return int(changed["from_block"]), first + rest

    from_block, frames = _run(go())
    assert 2 <= from_block < 6
    a, b = server.condition([WeightedPrompt(text=PROMPT_A)]), server.condition(blend_b)
    expected = server.reference(6, 3, lambda i: a if i < from_block else b)
    for got, want in zip(frames, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    unchanged = server.reference(6, 3, a)
    assert not np.array_equal(frames[-1], unchanged[-1])  # the change reached the audio


async def _closed(ws: Any, timeout: float = 20.0) -> tuple[int, str, list[dict[str, Any]]]:
    """Read until the server closes: (code, reason, JSON messages seen)."""
    import websockets

    messages = []
    try:
        while True:
            raw = await asyncio.wait_for(ws.recv(), timeout)
            if isinstance(raw, str):
                messages.append(json.loads(raw))
    except websockets.ConnectionClosed as closed:
        assert closed.rcvd is not None, "closed without a close frame"
        return closed.rcvd.code, closed.rcvd.reason, messages


def test_bad_input_gets_a_clear_error_and_leaves_other_sessions_untouched(server: _Server) -> None:
    cfg = server.cfg.serve

    async def go() -> dict[str, Any]:
        found: dict[str, Any] = {}
        healthy = await _connect(server.ws_url)
        await healthy.send(json.dumps({"type": "start", "prompt": PROMPT_A, "seed": 11}))
        await _next_json(healthy)
        frames, _ = await _frames(healthy, 2)

        bad = await _connect(server.ws_url)

        async def ask(raw: str) -> dict[str, Any]:  # one message per token refill: these test the answers, not the rate
            await asyncio.sleep(1.0 / cfg.control_rate)
            await bad.send(raw)
            return await _next_json(bad)

        found["bad_json"] = await ask("{not json")
        found["unknown"] = await ask(json.dumps({"type": "dance"}))
        found["before_start"] = await ask(json.dumps({"type": "set_prompts", "prompts": [{"text": "x"}]}))
        found["long_prompt"] = await ask(json.dumps({"type": "start", "prompt": "a" * (cfg.max_prompt_chars + 1)}))
        found["steps"] = await ask(json.dumps({"type": "start", "prompt": "ok", "steps": cfg.max_steps + 1}))
        found["zero_weights"] = await ask(json.dumps({"type": "start", "prompts": [{"text": "a", "weight": 0}]}))
        found["extra_field"] = await ask(json.dumps({"type": "pause", "extra": 1}))
        await bad.send(json.dumps({"type": "stop", "pad": "x" * cfg.max_message_bytes}))
        found["too_big"] = await _closed(bad)

        flood = await _connect(server.ws_url)
        for _ in range(cfg.control_burst + 3):  # bad messages cost tokens too
            await flood.send("{garbage")
        found["flood"] = []
        while not found["flood"] or found["flood"][-1]["error"] != "rate_limited":
            found["flood"].append(await _next_json(flood))
        await flood.close()

        for name, headers in (("no_token", None), ("wrong_token", {"Authorization": "Bearer nope"})):
            ws = await _connect(server.ws_url, headers=headers)
            found[name] = await _closed(ws)
        ws = await _connect(server.ws_url, headers={**TOKEN, "Origin": "http://evil.example"})
        found["origin"] = await _closed(ws)

        more = [await _connect(server.ws_url) for _ in range(cfg.max_sessions - 1)]  # with `healthy`: full
        extra = await _connect(server.ws_url)
        found["full"] = await _closed(extra)
        for ws in more:
            await ws.close()

        rest, _ = await _frames(healthy, 4, first=2)
        frames += rest
        found["frames"] = frames
        await healthy.close()
        return found

    found = _run(go(), timeout=180)
    assert found["bad_json"]["error"] == "bad_json" and "not JSON" in found["bad_json"]["message"]
    assert found["unknown"]["error"] == "unknown_type" and "dance" in found["unknown"]["message"]
    assert found["before_start"]["error"] == "invalid" and "start" in found["before_start"]["message"]
    assert found["long_prompt"]["error"] == "invalid" and "serve.max_prompt_chars" in found["long_prompt"]["message"]
    assert "serve.max_steps" in found["steps"]["message"]
    assert "sum to 0" in found["zero_weights"]["message"]
    assert found["extra_field"]["error"] == "invalid" and "extra" in found["extra_field"]["message"]
    code, reason, messages = found["too_big"]
    assert code == CloseCode.TOO_BIG and "serve.max_message_bytes" in reason and messages[-1]["error"] == "too_big"
    *answered, dropped = found["flood"]
    assert all(m["error"] == "bad_json" for m in answered) and len(answered) in (cfg.control_burst, cfg.control_burst + 1)  # one may refill
    assert "serve.control_rate" in dropped["message"]
    assert found["no_token"][0] == CloseCode.UNAUTHORIZED and "bearer token" in found["no_token"][1]
    assert found["wrong_token"][0] == CloseCode.UNAUTHORIZED and "wrong" in found["wrong_token"][1]
    assert found["origin"][0] == CloseCode.FORBIDDEN_ORIGIN and "evil.example" in found["origin"][1]
    assert found["full"][0] == CloseCode.FULL and "server full" in found["full"][1]
    expected = server.reference(6, 11, server.condition([WeightedPrompt(text=PROMPT_A)]))
    for got, want in zip(found["frames"], expected, strict=True):
        np.testing.assert_array_equal(got, want)


def _live(server: _Server) -> dict[str, Any]:
    live: dict[str, Any] = server.stats()["live"]
    return live


def test_a_client_that_never_reads_is_held_then_closed_and_a_disconnect_frees_its_session(server: _Server) -> None:
    cfg = server.cfg.serve

    async def go() -> dict[str, Any]:
        found: dict[str, Any] = {}
        mute = await _connect(server.ws_url, max_queue=None)
        await mute.send(json.dumps({"type": "start", "prompt": PROMPT_A, "seed": 1}))
        await asyncio.sleep(2.0)  # many blocks' time: without acks the server stops at max_unacked
        (entry,) = [v for v in _live(server).values() if v["kind"] == "stream"]
        found["held"] = entry
        await asyncio.sleep(1.0)
        (entry,) = [v for v in _live(server).values() if v["kind"] == "stream"]
        found["still"] = entry
        found["idle"] = await _closed(mute, timeout=cfg.idle_timeout_s + 10)
        found["after_idle"] = _live(server)

        leaver = await _connect(server.ws_url)
        await leaver.send(json.dumps({"type": "start", "prompt": PROMPT_B, "seed": 2}))
        await _next_json(leaver)
        await _frames(leaver, 1)
        found["during"] = len(_live(server))
        leaver.transport.abort()  # gone mid-stream, no close handshake
        begin = time.monotonic()
        while _live(server) and time.monotonic() - begin < 10:
            await asyncio.sleep(0.05)
        found["freed_in"] = time.monotonic() - begin
        found["after_leave"] = server.stats()
        return found

    found = _run(go(), timeout=120)
    assert found["held"]["block"] == cfg.max_unacked and found["held"]["unacked"] == cfg.max_unacked
    assert found["still"]["block"] == cfg.max_unacked  # no block generated while nobody reads
    code, reason, _ = found["idle"]
    assert code == CloseCode.IDLE and "serve.idle_timeout_s" in reason
    assert found["after_idle"] == {}
    assert found["during"] == 1
    assert found["freed_in"] < 2.0 and found["after_leave"]["sessions"] == 0 and found["after_leave"]["live"] == {}


def test_a_refused_prompt_change_and_a_long_pause_leave_the_session_playing(server: _Server) -> None:
    """A set_prompts the server refuses is an error message, not the end of the stream (the client once raised on
    it); a paused player sends nothing, and the idle timeout waits for it (it once closed it)."""
    from lmdm.serve.client import StreamClient

    async def go() -> tuple[StreamClient, list[Any]]:
        client = StreamClient(server.ws_url, token="s3cret-token", reconnect=False)
        await client.start([WeightedPrompt(text=PROMPT_A)], seed=6)
        frames = []
        async for frame in client.frames(blocks=2):
            frames.append(frame)
        await client.set_prompts([WeightedPrompt(text="x" * (server.cfg.serve.max_prompt_chars + 1))])
        async for frame in client.frames(blocks=2):
            frames.append(frame)
        await client.pause()
        await asyncio.sleep(server.cfg.serve.idle_timeout_s + 1.5)
        await client.play()
        async for frame in client.frames(blocks=3):
            frames.append(frame)
        await client.close()
        return client, frames

    client, frames = _run(go(), timeout=90)
    assert [f.header.block for f in frames][:4] == [0, 1, 2, 3] and len(frames) >= 7
    blocks = [f.header.block for f in frames]
    assert blocks == list(range(len(blocks)))  # no gap, no repeat across the pause
    (refused,) = client.errors
    assert refused["to"] == "set_prompts" and "serve.max_prompt_chars" in refused["message"]
    assert [s.from_block for s in client.latencies] == [-2]  # marked refused, never "heard"
    assert {e["type"] for e in client.events} >= {"paused", "playing"}


def test_generate_streams_a_wav_of_the_offline_rollout(server: _Server) -> None:
    import io

    import httpx
    import soundfile as sf

    blocks = 3
    block_seconds = server.cfg.stream.block_frames * 512 / server.cfg.audio.sample_rate
    body = {"prompt": PROMPT_B, "seconds": blocks * block_seconds - 0.05, "seed": 5}
    chunks = []
    with httpx.stream("POST", f"{server.http}/v1/generate", json=body, headers=TOKEN, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
        chunks = list(response.iter_bytes())
    audio, rate = sf.read(io.BytesIO(b"".join(chunks)), dtype="int16", always_2d=True)
    assert rate == server.cfg.audio.sample_rate and audio.shape[0] == round(body["seconds"] * rate)
    expected = np.concatenate(server.reference(blocks + 4, 5, server.condition([WeightedPrompt(text=PROMPT_B)])))
    np.testing.assert_array_equal(audio, expected[: audio.shape[0]])
    refused = httpx.post(f"{server.http}/v1/generate", json={**body, "seconds": 1e6}, headers=TOKEN, timeout=30)
    assert refused.status_code == 422 and "serve.max_generate_seconds" in refused.json()["message"]
    assert httpx.post(f"{server.http}/v1/generate", json=body, timeout=30).status_code == 401


def test_healthz_stats_and_the_instrument_page(server: _Server) -> None:
    import httpx

    assert httpx.get(f"{server.http}/healthz", timeout=30).json()["ok"] is True
    assert httpx.get(f"{server.http}/v1/stats", timeout=30).status_code == 401  # the sessions' prompts are the token holder's
    stats = server.stats()
    assert stats["warm_block_seconds"] > 0 and stats["blocks_per_second"] >= 0 and stats["queue_depth"] == 0
    assert stats["model"]["dit"] == str(server.cfg.serve.dit) and stats["model"]["runtime"] == "packed"
    assert stats["batching"]["on"] is True and stats["batching"]["batches"] >= 0  # serve.batching's default
    page = httpx.get(f"{server.http}/", timeout=30)
    assert page.status_code == 200 and "AudioWorklet" in page.text
    assert httpx.get(f"{server.http}/web/worklet.js", timeout=30).status_code == 200
    assert httpx.get(f"{server.http}/web/..%2Fapp.py", timeout=30).status_code == 404


def test_the_instrument_page_streams_and_changes_prompts_in_headless_chromium(server: _Server) -> None:
    import os

    from lmdm.eval.browser import find_chromium, open_page

    if find_chromium() is None:
        message = "no Chromium on PATH (Debian: apt-get install chromium; .ci/run installs it): the instrument's browser test did not run"
        if os.environ.get("LMDM_REQUIRE_BROWSER") == "1":
            pytest.fail(message + ", and LMDM_REQUIRE_BROWSER=1 requires it")
        pytest.skip(message)

    async def until(page: Any, condition: str, timeout: float = 30.0) -> Any:
        begin = time.monotonic()
        while time.monotonic() - begin < timeout:
            if await page.evaluate(condition):
                return await page.evaluate("JSON.parse(JSON.stringify(lmdm.state))")
            await asyncio.sleep(0.1)
        state = await page.evaluate("JSON.stringify(lmdm.state)")
        raise AssertionError(f"the page never reached {condition}: {state}")

    async def go() -> dict[str, Any]:
        found: dict[str, Any] = {}
        async with open_page() as page:
            await page.goto(f"{server.http}/?token=s3cret-token")
            await page.evaluate("document.getElementById('start').click()")
            found["playing"] = await until(page, "lmdm.state.blocks >= 8 && lmdm.state.played > 0")
            # the player moves the sliders: all weight on the second prompt (applied as they edit)
            await page.evaluate(
                """(() => { const rows = document.querySelectorAll('#prompts .prompt');
                   rows[0].children[1].value = 0; rows[0].children[1].dispatchEvent(new Event('input'));
                   rows[1].children[1].value = 1; rows[1].children[1].dispatchEvent(new Event('input')); return true; })()"""
            )
            found["changed"] = await until(
                page,
                "lmdm.state.promptsSet.length > 0 && lmdm.state.latencies.length > 0 && lmdm.state.blocks >= lmdm.state.promptsSet[0].from_block + 4",
            )
            found["counters"] = await page.evaluate("document.getElementById('c-blocks').textContent")
            await page.evaluate("document.getElementById('stop').click()")
            found["stopped"] = await until(page, "lmdm.state.closed !== null")
            await page.evaluate("document.getElementById('start').click()")  # a second session on the same page
            found["again"] = await until(page, "lmdm.state.blocks >= 4 && lmdm.state.played > 0")
        return found

    found = _run(go(), timeout=120)
    changed = found["changed"]
    assert changed["error"] is None and changed["gaps"] == 0, changed
    assert changed["blocks"] >= 12 and int(found["counters"]) >= 12
    assert changed["played"] > 0 and changed["started"]["sample_rate"] == server.cfg.audio.sample_rate
    (prompts_set,) = changed["promptsSet"]
    assert prompts_set["from_block"] >= 8 and "Monteverdi" in prompts_set["key"] and "Bach" not in prompts_set["key"]
    assert changed["latencies"][0] > 0
    assert found["stopped"]["closed"]["code"] == 1000 and found["stopped"]["gaps"] == 0
    again = found["again"]
    assert (
        again["gaps"] == 0
        and again["error"] is None
        and again["promptsSet"] == []
        and again["started"]["session"] != changed["started"]["session"]
    )


def test_lmdm_listen_writes_the_stream_and_measures_control_latency(server: _Server, tmp_path: Path) -> None:
    import soundfile as sf
    from typer.testing import CliRunner

    from lmdm.pipelines.cli import app

    out, figures = tmp_path / "listen.wav", tmp_path / "listen.json"
    args = ["listen", "--url", server.ws_url, "--token", "s3cret-token", "--seconds", "3", "--out", str(out), "--seed", "4"]
    args += [
        "--prompt",
        f"{PROMPT_A} @ 0.7",
        "--prompt",
        f"{PROMPT_B} @ 0.3",
        "--measure-latency",
        "--change-every",
        "0.6",
        "--json",
        str(figures),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "control latency over" in result.output and "arithmetic: blocks_ahead" in result.output
    audio, rate = sf.read(out, dtype="int16", always_2d=True)
    assert rate == server.cfg.audio.sample_rate and audio.shape[0] == 3 * rate
    found = json.loads(figures.read_text())
    lat, bounds = found["control_latency_s"], found["arithmetic_s"]
    assert lat["n"] >= 2 and 0 < lat["min"] <= lat["max"] < bounds["max_s"] + 1.0  # + scheduling slack on a busy CI machine
    assert found["first_audio_s"] > 0 and found["reconnects"] == 0
    refused = CliRunner().invoke(app, ["listen", "--url", server.ws_url, "--seconds", "1", "--out", str(out)])
    assert refused.exit_code == 1 and "bearer token" in refused.output


def test_reconnect_after_the_replica_is_killed_continues_from_the_clients_audio(server: _Server) -> None:
    """Last in the module: it kills the replica (Serve starts a new one)."""
    import ray
    from ray.util.state import list_actors

    from lmdm.serve.client import StreamClient

    prompts = [WeightedPrompt(text=PROMPT_A)]

    async def go() -> tuple[StreamClient, list[Any], int]:
        client = StreamClient(server.ws_url, token="s3cret-token", reconnect_timeout=90)
        await client.start(prompts, seed=9)
        before, after = [], []
        killed_pid = 0
        async for frame in client.frames():
            if frame.session_index == 0:
                before.append(frame)
                if len(before) == 6:  # enough audio for the whole context: kill the replica from outside
                    address = ray.get_runtime_context().gcs_address
                    (actor,) = list_actors(
                        address=address,
                        filters=[("class_name", "=", "ServeReplica:lmdm-test:LMDMServer"), ("state", "=", "ALIVE")],
                        detail=True,
                    )
                    killed_pid = int(actor.pid)
                    ray.kill(ray.get_actor(actor.name, namespace=actor.ray_namespace), no_restart=True)
            else:
                after.append(frame)
                if len(after) == 4:
                    break
        await client.close()
        return client, before + after, killed_pid

    client, frames, killed_pid = _run(go(), timeout=180)
    assert client.reconnects == 1 and server.stats()["pid"] != killed_pid
    (context,) = client.resumed_from
    assert context is not None and context.shape[0] == client.started["context_samples"]
    before = [f for f in frames if f.session_index == 0]
    after = [f for f in frames if f.session_index == 1]
    assert after[0].position == before[-1].position + before[-1].header.frames  # the timeline goes on
    _, vae, _ = server.offline()
    expected = server.reference(len(after), 9, server.condition(prompts), context=encode_context(vae, context))
    for got, want in zip(after, expected, strict=True):
        np.testing.assert_array_equal(got.pcm, want)
    # the first audio after reconnecting starts where the context audio ends (no repeat, no gap):
    # the primed decoder's first samples are those of the block after the context
    assert sum(f.header.frames for f in after) == len(after) * client.started["block_samples"] - client.started["latency_samples"]
