"""Cached streaming engines compute exactly what the uncached references (and training) compute."""

from __future__ import annotations

import pytest
import torch

from lmdm.models.block_mask import CLEAN, GLOBAL, NOISY, TokenLayout, attention_mask
from lmdm.models.dit import DiT, DiTArgs
from lmdm.models.kv_cache import CacheIO
from lmdm.streaming.batching import stack_conditions
from lmdm.streaming.engines import Condition, LMDMEngine, OutpaintingEngine, Sampling
from lmdm.streaming.sequences import BlockGeometry, block_causal_forward, window_forward

IO, BF, CTX, B = 4, 3, 2, 2
GEO = BlockGeometry(block_frames=BF, context_blocks=CTX)
F64 = torch.float64


def tiny_dit(seed: int = 0, depth: int = 3) -> DiT:
    torch.manual_seed(seed)
    dit = DiT(DiTArgs(io_channels=IO, width=64, depth=depth, head_dim=32, cond_token_dim=32, input_concat_dim=IO + 1)).to(F64)
    for p in dit.parameters():  # non-zero everywhere (the default init zeroes the residual convs)
        torch.nn.init.normal_(p, std=0.2)
    return dit


def prompts(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, 5, 32, generator=g, dtype=F64) for _ in range(n)]


def prompt_at(block: int) -> int:
    """A stream whose prompt changes twice: blocks 0-1 prompt 0, 2-3 prompt 1, then prompt 2."""
    return 0 if block < 2 else (1 if block < 4 else 2)


def reference(
    dit: DiT, variant: str, hist: list[torch.Tensor], keys: list[int], texts: list[torch.Tensor], x: torch.Tensor, t: torch.Tensor, j: int
) -> torch.Tensor:
    text = torch.stack(texts, 1)
    if variant == "block_causal":  # one forward over the whole stream so far, banded mask
        clean = torch.cat(hist, -1) if hist else x.new_zeros(B, IO, 0)
        return block_causal_forward(
            dit,
            GEO,
            clean,
            x,
            [j],
            t[:, None],
            text=text,
            block_prompt=torch.tensor(keys, dtype=torch.long),
            target_prompt=torch.tensor([prompt_at(j)]),
        )
    ctx = hist[-CTX:]  # encdec / full: a recomputation of the window
    empty = CTX - len(ctx)
    context = torch.cat([x.new_zeros(B, IO, BF * empty), *ctx], -1)
    valid = torch.tensor([False] * empty + [True] * len(ctx))
    slot_prompt = torch.tensor([0] * empty + keys[len(keys) - len(ctx) :], dtype=torch.long)
    mask_variant = "full" if variant == "outpainting" else "encdec"
    return window_forward(
        dit, mask_variant, GEO, context, x, t, text=text, slot_prompt=slot_prompt, target_prompt=prompt_at(j), context_valid=valid
    )  # type: ignore[arg-type]


def make_engine(dit: DiT, variant: str, cfg: float, rotary: str = "fixed") -> OutpaintingEngine | LMDMEngine:
    sampling = Sampling(steps=2, cfg_scale=cfg)
    if variant == "outpainting":
        return OutpaintingEngine(dit, GEO, sampling)
    return LMDMEngine(dit, variant, GEO, sampling, rotary=rotary)  # type: ignore[arg-type]


ENGINE_CASES = [
    ("block_causal", "fixed"),
    ("block_causal", "growing"),
    ("encdec", "fixed"),
    ("encdec", "growing"),
    ("outpainting", "fixed"),
]


@pytest.mark.parametrize(("variant", "rotary"), ENGINE_CASES)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_cached_denoiser_equals_uncached_reference(variant: str, cfg: float, rotary: str) -> None:
    """Over 7 blocks (the FIFO evicts from block 2 on), from an empty start, with two prompt changes."""
    dit, texts = tiny_dit(), prompts()
    nulls = [torch.zeros_like(p) for p in texts]
    engine = make_engine(dit, variant, cfg, rotary)
    state = engine.start(Condition(texts[0], "p0"), B, generator=torch.Generator().manual_seed(0))
    hist: list[torch.Tensor] = []
    keys: list[int] = []
    g = torch.Generator().manual_seed(2)
    for j in range(7):
        cond = Condition(texts[prompt_at(j)], f"p{prompt_at(j)}")
        x, t = torch.randn(B, IO, BF, generator=g, dtype=F64), torch.rand(B, generator=g, dtype=F64)
        engine.begin_block(state, cond)
        out = engine.denoise_step(state, x, t)
        ref = reference(dit, variant, hist, keys, texts, x, t, j)
        if cfg != 1.0:
            unc = reference(dit, variant, hist, keys, nulls, x, t, j)
            ref = unc + cfg * (ref - unc)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        hist.append(engine.step(state, cond))
        keys.append(prompt_at(j))


def test_float32_streaming_within_1e5_relative() -> None:
    dit = tiny_dit().float()
    texts = [p.float() for p in prompts()]
    engine = LMDMEngine(dit, "block_causal", GEO, Sampling(steps=2))
    state = engine.start(Condition(texts[0], "p0"), B, generator=torch.Generator().manual_seed(0))
    hist: list[torch.Tensor] = []
    for j in range(6):
        x, t = torch.randn(B, IO, BF), torch.rand(B)
        engine.begin_block(state, Condition(texts[0], "p0"))
        out = engine.denoise_step(state, x, t)
        clean = torch.cat(hist, -1) if hist else x.new_zeros(B, IO, 0)
        ref = block_causal_forward(dit, GEO, clean, x, [j], t[:, None], text=texts[0][:, None])
        assert ((out - ref).abs().max() / ref.abs().max()) < 1e-5
        hist.append(engine.step(state, Condition(texts[0], "p0")))


@pytest.mark.parametrize("variant", ["block_causal", "encdec"])
def test_fixed_and_growing_rotary_generate_the_same_stream(variant: str) -> None:
    dit, texts = tiny_dit(), prompts()
    streams = []
    for rotary in ("fixed", "growing"):
        engine = LMDMEngine(dit, variant, GEO, Sampling(steps=3, sampler="pingpong"), rotary=rotary)  # type: ignore[arg-type]
        state = engine.start(Condition(texts[0], "p0"), B, generator=torch.Generator().manual_seed(5))
        streams.append(torch.cat([engine.step(state, Condition(texts[prompt_at(j)], f"p{prompt_at(j)}")) for j in range(8)], -1))
    torch.testing.assert_close(streams[0], streams[1], rtol=1e-10, atol=1e-10)


def test_packed_training_forward_equals_cached_engine() -> None:
    """Several noisy targets packed in one sequence (the training pass) give, for each target, the
    cached engine's output on the same clean history, noise and t: no extra or missing context block."""
    dit, texts = tiny_dit(), prompts(1)
    engine = LMDMEngine(dit, "block_causal", GEO, Sampling(steps=2))
    cond = Condition(texts[0], "p0")
    g = torch.Generator().manual_seed(3)
    history = torch.randn(B, IO, 6 * BF, generator=g, dtype=F64)
    targets = [0, 2, 3, 5]
    noisy = torch.randn(B, IO, len(targets) * BF, generator=g, dtype=F64)
    t = torch.rand(B, len(targets), generator=g, dtype=F64)
    packed = block_causal_forward(dit, GEO, history, noisy, targets, t, text=texts[0][:, None])
    for i, j in enumerate(targets):
        state = engine.start(cond, B, context=history[..., : j * BF] if j else None)
        engine.begin_block(state, cond)
        cached = engine.denoise_step(state, noisy[..., i * BF : (i + 1) * BF], t[:, i])
        torch.testing.assert_close(cached, packed[..., i * BF : (i + 1) * BF], rtol=1e-10, atol=1e-10)


def test_starting_context_equals_generated_history() -> None:
    """engine.start(context=...) commits real context exactly as generated blocks would be committed."""
    dit, texts = tiny_dit(), prompts(1)
    cond = Condition(texts[0], "p0")
    engine = LMDMEngine(dit, "block_causal", GEO, Sampling(steps=2))
    a = engine.start(cond, B, generator=torch.Generator().manual_seed(0))
    blocks = torch.cat([engine.step(a, cond) for _ in range(3)], -1)
    b = engine.start(cond, B, context=blocks)
    x, t = torch.randn(B, IO, BF, dtype=F64), torch.rand(B, dtype=F64)
    for s in (a, b):
        engine.begin_block(s, cond)
    torch.testing.assert_close(engine.denoise_step(a, x, t), engine.denoise_step(b, x, t), rtol=1e-12, atol=1e-12)


def test_context_is_independent_of_target_and_timestep() -> None:
    dit, texts = tiny_dit(), prompts(1)
    cond = Condition(texts[0], "p0")
    engine = LMDMEngine(dit, "block_causal", GEO, Sampling(steps=2))
    state = engine.start(cond, B, context=torch.randn(B, IO, 3 * BF, dtype=F64))
    engine.begin_block(state, cond)
    ctx = state.cache.ring
    before = state.cache.k[:, :, :, ctx].clone(), state.cache.v[:, :, :, ctx].clone()
    for seed in range(3):  # different noisy targets and timesteps
        g = torch.Generator().manual_seed(seed)
        engine.denoise_step(state, torch.randn(B, IO, BF, generator=g, dtype=F64), torch.rand(B, generator=g, dtype=F64))
        assert torch.equal(state.cache.k[:, :, :, ctx], before[0]) and torch.equal(state.cache.v[:, :, :, ctx], before[1])


def test_merged_commit_is_independent_of_the_target_and_timestep() -> None:
    """block_causal commits block j−1 inside block j's first denoising step: the committed keys/values
    must be bit-identical whatever noisy target and timestep ride along in that pass."""
    dit, texts = tiny_dit(), prompts(1)
    cond = Condition(texts[0], "p0")
    engine = LMDMEngine(dit, "block_causal", GEO, Sampling(steps=2))
    rings = []
    for seed in range(3):
        state = engine.start(cond, B, generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            engine.step(state, cond)  # the last block is pending
        engine.begin_block(state, cond)
        assert state.merged_plan is not None
        g = torch.Generator().manual_seed(100 + seed)
        engine.denoise_step(state, torch.randn(B, IO, BF, generator=g, dtype=F64), torch.rand(B, generator=g, dtype=F64))
        assert state.merged_plan is None and state.cache.slot_block == [2, 1]
        rings.append((state.cache.k[:, :, :, state.cache.ring].clone(), state.cache.v[:, :, :, state.cache.ring].clone()))
    for k, v in rings[1:]:
        assert torch.equal(k, rings[0][0]) and torch.equal(v, rings[0][1])


@pytest.mark.parametrize("variant", ["block_causal", "encdec"])
def test_context_outputs_have_zero_gradient_wrt_target_and_t(variant: str) -> None:
    """Gradients prove the mask: context-token outputs do not depend on the noisy target or on t."""
    dit = tiny_dit()
    N = 4
    layout = TokenLayout.of([GLOBAL] + [CLEAN] * N * BF + [NOISY] * BF, [N] + [b for b in range(N) for _ in range(BF)] + [N] * BF)
    mask = attention_mask(layout, layout, variant, CTX)  # type: ignore[arg-type]
    clean = torch.randn(1, 2 * IO + 1, N * BF, dtype=F64)
    noisy = torch.randn(1, 2 * IO + 1, BF, dtype=F64, requires_grad=True)
    t = torch.rand(1, dtype=F64, requires_grad=True)
    h = torch.cat([dit.global_tokens(t), dit.embed_frames(torch.cat([clean, noisy], -1))], dim=1)
    pos = torch.arange(h.shape[1])
    out = dit.run_layers(h, dit.freqs(pos), mask, None)
    grad_noisy, grad_t = torch.autograd.grad(out[:, 1 : 1 + N * BF].sum(), (noisy, t), allow_unused=True, retain_graph=True)
    assert grad_noisy is not None and torch.count_nonzero(grad_noisy) == 0
    assert grad_t is None or torch.count_nonzero(grad_t) == 0
    target_grad = torch.autograd.grad(out[:, -BF:].sum(), noisy)[0]
    assert torch.count_nonzero(target_grad) > 0  # and the test can fail: targets do depend on themselves


def test_outputs_from_returns_the_later_tokens_and_the_same_keys() -> None:
    """``run_layers(outputs_from=k)`` (the merged commit's last layer skips the committed block's outputs)
    returns exactly rows ``k:`` of the full forward, and every layer writes the same keys/values to the cache."""
    dit = tiny_dit()
    g = torch.Generator().manual_seed(3)
    h = torch.randn(B, 7, 64, generator=g, dtype=F64)
    text = dit.text_kv(prompts(1)[0])
    mask = torch.rand(7, 7, generator=g) > 0.3
    mask |= torch.eye(7, dtype=torch.bool)
    text_mask = torch.rand(7, 5, generator=g) > 0.3
    text_mask[:, 0] = True

    def io() -> CacheIO:
        k = torch.zeros(len(dit.layers), B, 2, 7, 32, dtype=F64)
        return CacheIO(k, torch.zeros_like(k), torch.arange(7), 0, 7)

    full_io, part_io, none_io = io(), io(), io()
    full = dit.run_layers(h, dit.freqs(torch.arange(7)), mask, text, text_mask, full_io)
    torch.testing.assert_close(full, dit.run_layers(h, dit.freqs(torch.arange(7)), mask, text, text_mask), rtol=0, atol=0)  # own keys
    part = dit.run_layers(h, dit.freqs(torch.arange(7)), mask, text, text_mask, part_io, outputs_from=3)
    assert part.shape == (B, 4, 64)
    torch.testing.assert_close(part, full[:, 3:], rtol=1e-12, atol=1e-12)  # float64: only the matmul row blocking differs
    none = dit.run_layers(h, dit.freqs(torch.arange(7)), mask, text, text_mask, none_io, outputs_from=7)  # keys/values only
    assert none.shape == (B, 0, 64)
    for other in (part_io, none_io):
        assert torch.equal(other.k, full_io.k) and torch.equal(other.v, full_io.v) and full_io.k.abs().sum() > 0


@pytest.mark.parametrize("variant", ["outpainting", "encdec", "block_causal"])
def test_every_denoising_pass_computes_last_layer_outputs_for_the_target_only(variant: str) -> None:
    """Outpainting and the LMDM passes run the same layer stack with the same optimisations: no engine's
    last layer computes outputs that nothing reads (outpainting's global and context tokens, an LMDM
    step's global token, the merged pass's committed block). Counted at the last feed-forward."""
    dit, texts = tiny_dit(), prompts(1)
    rows: list[int] = []
    dit.layers[-1].ff.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[1]))
    engine = make_engine(dit, variant, 1.0)
    state = engine.start(Condition(texts[0], "p0"), B, generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # the second and third blocks start with block_causal's merged commit pass
        engine.step(state, Condition(texts[0], "p0"))
    assert rows == [BF] * 6  # 3 blocks × 2 steps (encdec's context encodings: keys/values only)


def test_block_causal_mask_predicate() -> None:
    layout = TokenLayout.of([GLOBAL, CLEAN, CLEAN, CLEAN, NOISY], [3, 0, 1, 2, 3])
    mask = attention_mask(layout, layout, "block_causal", 1)
    expected = torch.tensor(
        [
            [1, 0, 0, 1, 1],  # global(3): clean block 2 (band 1), its target, itself
            [0, 1, 0, 0, 0],  # clean 0: itself
            [0, 1, 1, 0, 0],  # clean 1: blocks 0..1
            [0, 0, 1, 1, 0],  # clean 2: blocks 1..2
            [1, 0, 0, 1, 1],  # noisy(3): clean block 2, itself, its global token
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_empty_context_slots_are_masked_not_zero_latents() -> None:
    """A stream from silence (no context) differs from one whose context is zero latents."""
    dit, texts = tiny_dit(), prompts(1)
    cond = Condition(texts[0], "p0")
    engine = LMDMEngine(dit, "encdec", GEO, Sampling(steps=2))
    empty = engine.start(cond, B)
    zeros = engine.start(cond, B, context=torch.zeros(B, IO, CTX * BF, dtype=F64))
    x, t = torch.randn(B, IO, BF, dtype=F64), torch.rand(B, dtype=F64)
    outs = []
    for s in (empty, zeros):
        engine.begin_block(s, cond)
        outs.append(engine.denoise_step(s, x, t))
    assert not torch.allclose(outs[0], outs[1])


def test_engine_rejects_wrong_model() -> None:
    dit = DiT(DiTArgs(io_channels=IO, width=64, depth=1, head_dim=32))
    with pytest.raises(ValueError, match="input_concat_dim = io_channels \\+ 1"):
        LMDMEngine(dit, "block_causal", GEO, Sampling())


@pytest.mark.parametrize(("variant", "rotary"), ENGINE_CASES)
def test_cached_denoiser_with_timing_global_cond_equals_reference(variant: str, rotary: str) -> None:
    """Timing conditioning (``global_cond``, in the global token only) through the public per-step API."""
    torch.manual_seed(4)
    dit = DiT(DiTArgs(io_channels=IO, width=64, depth=2, head_dim=32, cond_token_dim=32, input_concat_dim=IO + 1, global_cond_dim=6)).to(
        F64
    )
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.2)
    text = prompts(1)[0]
    timing = torch.randn(B, 6, dtype=F64)
    cond = Condition(text, "p0", global_cond=timing)
    engine = make_engine(dit, variant, 1.0, rotary)
    state = engine.start(cond, B, generator=torch.Generator().manual_seed(0))
    hist: list[torch.Tensor] = []
    g = torch.Generator().manual_seed(2)
    for j in range(4):
        x, t = torch.randn(B, IO, BF, generator=g, dtype=F64), torch.rand(B, generator=g, dtype=F64)
        engine.begin_block(state, cond)
        out = engine.denoise_step(state, x, t)
        if variant == "block_causal":
            clean = torch.cat(hist, -1) if hist else x.new_zeros(B, IO, 0)
            ref = block_causal_forward(dit, GEO, clean, x, [j], t[:, None], text=text[:, None], global_cond=timing)
        else:
            ctx = hist[-CTX:]
            context = torch.cat([x.new_zeros(B, IO, BF * (CTX - len(ctx))), *ctx], -1)
            valid = torch.tensor([False] * (CTX - len(ctx)) + [True] * len(ctx))
            mask_variant = "full" if variant == "outpainting" else "encdec"
            ref = window_forward(dit, mask_variant, GEO, context, x, t, text=text[:, None], context_valid=valid, global_cond=timing)  # type: ignore[arg-type]
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        engine.end_block(state, x)
        hist.append(x)


def test_sessions_stepped_as_one_batch_equal_each_stepped_alone() -> None:
    """Serving batches sessions: two sessions (own prompts, contexts, noise, a prompt change, CFG) stacked into
    one state and stepped as one batch give the blocks each gives alone, and continue alone after unstacking."""
    dit = tiny_dit()
    texts = prompts(3)
    engine = LMDMEngine(dit, "block_causal", GEO, Sampling(steps=2, sampler="pingpong", cfg_scale=2.0))
    schedules = [lambda j: Condition(texts[0], "a"), lambda j: Condition(texts[1] if j < 3 else texts[2], "b" if j < 3 else "c")]

    def started() -> list:
        states = []
        for i in range(2):
            context = torch.randn(B, IO, CTX * BF, generator=torch.Generator().manual_seed(10 + i), dtype=F64)
            states.append(engine.start(schedules[i](0), B, context=context, generator=torch.Generator().manual_seed(20 + i)))
        for i, s in enumerate(states):  # one block alone: now a block is pending in each
            engine.step(s, schedules[i](0))
        return states

    alone = started()
    want = [torch.cat([engine.step(s, schedules[i](j)) for j in range(1, 6)], -1) for i, s in enumerate(alone)]
    sessions = started()
    both = engine.stack(sessions)
    together = [engine.step(both, stack_conditions([schedules[0](j), schedules[1](j)])) for j in range(1, 4)]
    again = engine.unstack(both, [B, B])
    for i in range(2):
        got = torch.cat(
            [*(block[i * B : (i + 1) * B] for block in together), *(engine.step(again[i], schedules[i](j)) for j in range(4, 6))], -1
        )
        torch.testing.assert_close(got, want[i], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="step phase"):  # a pending block beside none: the first steps differ
        engine.stack([again[0], engine.start(schedules[0](0), B)])


def test_a_rollout_with_gradients_through_the_cache_backpropagates() -> None:
    """ARC-Forcing trains through the cache: a rollout with one gradient-carrying denoising step per block
    backpropagates at the end without an in-place error, and its gradients equal those taken block by block
    right after each step (so no cache slice a gradient step read was overwritten before the backward)."""
    cond = Condition(prompts(1)[0], "p0")
    weights = torch.randn(B, IO, 4 * BF, generator=torch.Generator().manual_seed(9), dtype=F64)

    def grads(at_once: bool) -> list[torch.Tensor]:
        dit = tiny_dit()
        engine = LMDMEngine(dit, "block_causal", GEO, Sampling(steps=2))
        state = engine.start(cond, B, generator=torch.Generator().manual_seed(0))
        blocks = []
        for j in range(4):
            block = engine.step(state, cond, exit_step=1)
            if at_once:
                blocks.append(block)
            else:
                (block * weights[..., j * BF : (j + 1) * BF]).sum().backward()  # prompt K/V are recomputed per block under autograd
        if at_once:
            (torch.cat(blocks, -1) * weights).sum().backward()
        return [p.grad.clone() for p in dit.parameters() if p.grad is not None]

    at_once, one_by_one = grads(True), grads(False)
    assert len(at_once) == len(one_by_one) > 0 and any(g.abs().sum() > 0 for g in at_once)
    for a, b in zip(at_once, one_by_one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("variant", "rotary"), ENGINE_CASES)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_a_prompt_given_and_taken_away_mid_stream_equals_reference(variant: str, cfg: float, rotary: str) -> None:
    """Blocks 0-1 without text, 2-3 under a prompt, then without again: the blocks without text cross-attend to
    nothing, which the reference computes as an all-zero prompt (cross-attention has no bias)."""
    dit, texts = tiny_dit(), prompts(1)
    silent = torch.zeros_like(texts[0])
    engine = make_engine(dit, variant, cfg, rotary)

    def at(j: int) -> Condition:
        return Condition(texts[0], "p") if 2 <= j < 4 else Condition()

    state = engine.start(at(0), B, generator=torch.Generator().manual_seed(0))
    hist: list[torch.Tensor] = []
    g = torch.Generator().manual_seed(2)
    for j in range(7):
        x, t = torch.randn(B, IO, BF, generator=g, dtype=F64), torch.rand(B, generator=g, dtype=F64)
        engine.begin_block(state, at(j))
        out = engine.denoise_step(state, x, t)
        keys = [prompt_at(b) for b in range(j)]  # indices into [silent, prompt, silent]: 0 for blocks 0-1, 1 for 2-3, 2 after
        ref = reference(dit, variant, hist, keys, [silent, texts[0], silent], x, t, j)
        if cfg != 1.0:
            unc = reference(dit, variant, hist, keys, [silent] * 3, x, t, j)
            ref = unc + cfg * (ref - unc)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        hist.append(engine.step(state, at(j)))


def test_end_block_with_a_block_made_elsewhere_commits_the_pending_block_first() -> None:
    """begin_block then end_block with an outside block (no denoising step ran, so the merged pass that would
    commit block j − 1 never did): block j − 1 is committed on its own and the stream stays exact."""
    dit, texts = tiny_dit(), prompts(1)
    cond = Condition(texts[0], "p0")
    engine = LMDMEngine(dit, "block_causal", GEO, Sampling(steps=2))
    state = engine.start(cond, B, generator=torch.Generator().manual_seed(0))
    first = engine.step(state, cond)  # block 0, pending
    outside = torch.randn(B, IO, BF, generator=torch.Generator().manual_seed(5), dtype=F64)
    engine.begin_block(state, cond)
    engine.end_block(state, outside)  # block 1 from elsewhere (live input, say)
    x, t = torch.randn(B, IO, BF, dtype=F64), torch.rand(B, dtype=F64)
    engine.begin_block(state, cond)
    out = engine.denoise_step(state, x, t)
    ref = block_causal_forward(dit, GEO, torch.cat([first, outside], -1), x, [2], t[:, None], text=texts[0][:, None])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert sorted(state.cache.slot_block) == [0, 1]
