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
]


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

        result: dict[str, Any] = httpx.get(f"{self.http}/v1/stats", timeout=30).json()
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


async def _connect(url: str, **kwargs: Any) -> Any:
    import websockets

    return await websockets.connect(url, open_timeout=30, **kwargs)


async def _next_json(ws: Any) -> dict[str, Any]:
    while True:
        raw = await ws.recv()
        if isinstance(raw, str):
            result: dict[str, Any] = json.loads(raw)
            return result


async def _frames(ws: Any, n: int, ack: bool = True) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """``n`` audio frames (acknowledged), and the JSON messages between them."""
    frames: list[np.ndarray] = []
    messages: list[dict[str, Any]] = []
    while len(frames) < n:
        raw = await ws.recv()
        if isinstance(raw, str):
            messages.append(json.loads(raw))
            continue
        header = AudioHeader.unpack(raw)
        assert header.block == len(frames)
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
