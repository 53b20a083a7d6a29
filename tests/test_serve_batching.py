"""Serving at scale, below the web layer: a replica's sessions stepped and decoded as batches (``next_chunks``)
give each session the audio it gets alone, while sessions join, leave and change prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdm.builders import build_autoencoder_from, build_dit
from lmdm.config import Config, load_config
from lmdm.serve.protocol import WeightedPrompt
from lmdm.serve.session import ServeModels, SessionError, StreamSession, next_chunks
from lmdm.text.encoders import load_text_encoder

TINY = [
    "dit.width=64",
    "dit.depth=2",
    "dit.head_dim=32",
    "dit.project_cond_tokens=true",
    "autoencoder.channels=8",
    "stream.block_frames=4",
    "stream.context_blocks=2",
    "stream.steps=2",
    "stream.cfg_scale=2.0",
    "serve.max_sessions=3",
]


def models(cfg: Config) -> ServeModels:
    torch.manual_seed(0)
    dit, vae = build_dit(cfg).eval(), build_autoencoder_from(cfg).eval()
    for p in dit.parameters():  # non-zero everywhere (the default init zeroes the residual convs)
        torch.nn.init.normal_(p, std=0.05)
    encoder = load_text_encoder(cfg.text.encoder, cfg.text.path, cfg.text.max_tokens)
    return ServeModels(cfg, dit, vae, encoder, "test", "test")


def test_sessions_batched_by_the_scheduler_equal_each_session_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timeline over 9 blocks: A from the start; B joins at 1 (its first block alone: no pending block yet,
    then with A, its context still filling); A changes prompt at 3; C joins at 4 from a starting context; B
    leaves at 5 and D takes its pooled row at 6. Every session's int16 audio equals the same session streamed
    alone within 1 LSB, and the pool's rows come back."""
    import lmdm.streaming.batching as batching

    cfg = load_config("quickstart", TINY)
    served, lone = models(cfg), models(cfg)
    stacked: list[int] = []
    original = batching.stack
    monkeypatch.setattr(batching, "stack", lambda engine, states: (stacked.append(len(states)), original(engine, states))[1])
    prompts = {k: [WeightedPrompt(text=t, weight=1.0)] for k, t in {"a": "warm piano", "a2": "bright flute", "b": "slow bass"}.items()}
    context = torch.randn(1, cfg.autoencoder.latent_channels, 2 * cfg.stream.block_frames, generator=torch.Generator().manual_seed(3))
    plan = {  # name: (joins, leaves, seed, prompt, context)
        "A": (0, 9, 1, "a", None),
        "B": (1, 5, 2, "b", None),
        "C": (4, 9, 3, "a", context),
        "D": (6, 9, 4, "b", None),
    }
    live: dict[str, StreamSession] = {}
    got: dict[str, list[np.ndarray]] = {name: [] for name in plan}
    rows_seen = set()
    for step in range(9):
        for name, (joins, leaves, seed, prompt, ctx) in plan.items():
            if step == joins:
                condition = served.condition(prompts[prompt] if prompt else [])
                live[name] = StreamSession(served, condition, seed, None, None, ctx, pooled=True)
                assert live[name]._row is not None
                rows_seen.add(live[name]._row[1])
            if step == leaves and name in live:
                live.pop(name).close()
        if step == 3:
            live["A"].set_condition(served.condition(prompts["a2"]))
        names = list(live)
        for name, chunk in zip(names, next_chunks([live[n] for n in names]), strict=True):
            got[name].append(chunk.pcm)
    assert rows_seen == {0, 1, 2}  # D reused B's row: three rows for four sessions
    assert stacked == [2, 2, 2, 2, 2, 3, 3]  # blocks 2–8; a session's first block (no pending block yet) runs apart
    for session in live.values():
        session.close()
    pool = next(iter(served._pools.values()))
    assert pool.in_use == 0

    for name, (joins, leaves, seed, prompt, ctx) in plan.items():
        alone = StreamSession(lone, lone.condition(prompts[prompt] if prompt else []), seed, None, None, ctx)
        want = []
        for step in range(joins, min(leaves, 9)):
            if name == "A" and step == 3:
                alone.set_condition(lone.condition(prompts["a2"]))
            want.append(alone.next_chunk().pcm)
        assert len(want) == len(got[name])
        for w, g in zip(want, got[name], strict=True):
            assert w.shape == g.shape
            assert int(np.abs(w.astype(np.int32) - g.astype(np.int32)).max(initial=0)) <= 1, name


def test_a_full_pool_refuses_a_session_saying_so() -> None:
    cfg = load_config("quickstart", [*TINY, "serve.max_sessions=1"])
    served = models(cfg)
    first = StreamSession(served, served.condition([]), 0, None, None, pooled=True)
    with pytest.raises(SessionError, match="all 1 cache rows are in use"):
        StreamSession(served, served.condition([]), 1, None, None, pooled=True)
    first.close()
    first.close()  # once only
    StreamSession(served, served.condition([]), 1, None, None, pooled=True).close()
