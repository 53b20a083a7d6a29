"""Sessions stepped as one batch (serving at scale): renumbering, per-row context masks, pooled cache rows."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_streaming import BF, CTX, F64, GEO, IO, prompts, tiny_dit

from lmdm.streaming.batching import stack_conditions
from lmdm.streaming.engines import Condition, LMDMEngine, Sampling

B = 1


def engine_for(cfg_scale: float = 2.0, rotary: str = "fixed", variant: str = "block_causal") -> LMDMEngine:
    return LMDMEngine(tiny_dit(), variant, GEO, Sampling(steps=2, sampler="pingpong", cfg_scale=cfg_scale), rotary=rotary)  # type: ignore[arg-type]


def context(seed: int, blocks: int) -> torch.Tensor:
    return torch.randn(B, IO, blocks * BF, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("shift", [5, -1, 2])
def test_a_renumbered_stream_continues_exactly(shift: int) -> None:
    """Fixed rotary: positions are relative to the window, so counting the blocks from elsewhere (the ring's
    slots follow) changes no output beyond rounding (attention sums the keys in another order)."""
    engine, cond = engine_for(), Condition(prompts(1)[0][:B], "p")

    def run(renumber: bool) -> torch.Tensor:
        state = engine.start(cond, B, context=context(3, CTX), generator=torch.Generator().manual_seed(4))
        blocks = [engine.step(state, cond) for _ in range(3)]
        if renumber:
            engine.renumber(state, state.progress.block + shift)
        return torch.cat([*blocks, *(engine.step(state, cond) for _ in range(4))], -1)

    torch.testing.assert_close(run(True), run(False), rtol=1e-10, atol=1e-10)  # the ring's keys in another order: rounding only
    state = engine.start(cond, B, context=context(3, CTX))
    with pytest.raises(ValueError, match="negative numbers"):
        engine.renumber(state, 1)
    growing = engine_for(rotary="growing")
    state = growing.start(cond, B)
    with pytest.raises(ValueError, match="fixed-rotary"):
        growing.renumber(state, 3)


def test_sessions_at_other_blocks_and_context_fills_stepped_as_one_batch_equal_each_alone() -> None:
    """Three sessions: one with a full context three blocks in, one fresh after its first block (its context
    still empty), one started from a single context block; they differ in block index, filled slots, prompts
    (one changes prompt while batched), noise and CFG rows. Stacked (renumbered to one count, per-row masks
    over the slots each holds), stepped three blocks as one batch and unstacked, each continues alone and
    every block equals the same session run alone from the start."""
    engine, texts = engine_for(), [t[:B] for t in prompts(3)]
    schedules: list[Callable[[int], Condition]] = [
        lambda j: Condition(texts[0], "a"),
        lambda j: Condition(texts[1] if j < 3 else texts[2], "b" if j < 3 else "c"),
        lambda j: Condition(texts[2], "c"),
    ]
    starts = [(context(10, CTX), 3), (None, 1), (context(12, 1), 1)]  # (starting context, blocks stepped alone first)

    def started() -> list:
        states = []
        for i, (ctx, first) in enumerate(starts):
            state = engine.start(schedules[i](0), B, context=ctx, generator=torch.Generator().manual_seed(20 + i))
            for j in range(first):
                engine.step(state, schedules[i](j))
            states.append(state)
        return states

    alone = started()
    want = [torch.cat([engine.step(s, schedules[i](j)) for j in range(3)], -1) for i, s in enumerate(alone)]  # 3 more each
    later = [torch.cat([engine.step(s, schedules[i](j)) for j in range(3, 5)], -1) for i, s in enumerate(alone)]
    sessions = started()
    assert [s.progress.block for s in sessions] == [5, 1, 2]
    together = engine.stack(sessions)
    assert together.cache.row_slots is not None  # the fresh session holds no context slot yet
    blocks = [engine.step(together, stack_conditions([schedules[i](j) for i in range(3)])) for j in range(3)]
    again = engine.unstack(together, [B, B, B], into=[s.cache for s in sessions])
    for i in range(3):
        got = torch.cat([block[i * B : (i + 1) * B] for block in blocks], -1)
        torch.testing.assert_close(got, want[i], rtol=1e-10, atol=1e-10)
        assert again[i].cache.k.data_ptr() == sessions[i].cache.k.data_ptr()  # copied back into the session's own rows
        torch.testing.assert_close(
            torch.cat([engine.step(again[i], schedules[i](j)) for j in range(3, 5)], -1), later[i], rtol=1e-10, atol=1e-10
        )


def test_sessions_that_cannot_share_a_step_are_refused() -> None:
    engine, cond = engine_for(), Condition(prompts(1)[0][:B], "p")
    fresh, stepped = engine.start(cond, B), engine.start(cond, B)
    engine.step(stepped, cond)
    with pytest.raises(ValueError, match="step phase"):  # no pending block against one: the first step differs
        engine.stack([fresh, stepped])
    other = engine_for(cfg_scale=1.0)
    one = other.start(cond, B)
    with pytest.raises(ValueError, match="step phase"):
        engine.stack([engine.start(cond, B), one])
    encdec = engine_for(variant="encdec")
    a, b = encdec.start(cond, B), encdec.start(cond, B)
    encdec.step(a, cond)
    with pytest.raises(ValueError, match="lockstep"):
        encdec.stack([a, b])


def test_pooled_cache_rows_are_reused_and_nothing_grows() -> None:
    """A session takes a pooled row on start and gives it back on leave: over 100 joins and leaves the pool's
    buffers stay the same tensors, the rows in use return to zero, and a stream on a pooled row equals one on
    its own cache."""
    engine, cond = engine_for(), Condition(prompts(1)[0][:B], "p")
    pool = engine.cache_pool(sessions=3, batch=B)
    storage, size = pool.k.data_ptr(), pool.nbytes()
    live: list[int] = []
    for i in range(100):
        row, cache = pool.take()
        state = engine.start(cond, B, generator=torch.Generator().manual_seed(i), cache=cache)
        if i % 20 == 0:  # a block now and then: the row is written, then freed with its session
            engine.step(state, cond)
        live.append(row)
        if len(live) == 3 or i % 3 == 0:
            pool.give(live.pop(0))
    for row in live:
        pool.give(row)
    assert pool.in_use == 0 and pool.k.data_ptr() == storage and pool.nbytes() == size
    assert sorted(pool.take()[0] for _ in range(3)) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="all 3 cache rows are in use"):
        pool.take()
    with pytest.raises(ValueError, match="not in use"):
        engine.cache_pool(sessions=1).give(0)
    with pytest.raises(ValueError, match="at least one session row"):
        engine.cache_pool(sessions=0)

    pooled = engine.cache_pool(sessions=2, batch=B)
    pooled.take()  # row 0 taken: the stream runs on row 1, a view into the pool
    row, cache = pooled.take()
    on_row = engine.start(cond, B, context=context(5, CTX), generator=torch.Generator().manual_seed(1), cache=cache)
    own = engine.start(cond, B, context=context(5, CTX), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        torch.testing.assert_close(engine.step(on_row, cond), engine.step(own, cond), rtol=0, atol=0)
    assert on_row.cache.k.data_ptr() == pooled.k[row].data_ptr()
    with pytest.raises(ValueError, match="a cache of keys"):
        engine_for(cfg_scale=1.0).start(cond, B, cache=engine.cache_pool(1).take()[1])
