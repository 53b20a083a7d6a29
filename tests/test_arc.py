"""ARC-Forcing's pieces: the training rollout (exit steps, detached context, backward through the cache),
the exit-step draws, the discriminator and the relativistic / contrastive losses."""

from __future__ import annotations

import pytest
import torch

from lmdm.diffusion.objectives import get_objective
from lmdm.models.discriminator import Discriminator
from lmdm.streaming.engines import Condition, LMDMEngine, Sampling
from lmdm.streaming.rollout import rollout
from lmdm.training.arc import (
    NoiseDraw,
    discriminator_loss,
    draw_exit_steps,
    generator_loss,
    relativistic_d,
    relativistic_g,
    self_rollout,
)
from tests.test_streaming import BF, CTX, F64, GEO, IO, B, prompts, tiny_dit

K = 4  # blocks per training rollout


def real_context(seed: int = 5) -> torch.Tensor:
    return torch.randn(B, IO, CTX * BF, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("variant", ["block_causal", "encdec"])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "pingpong"])
def test_training_rollout_exiting_at_the_last_step_equals_the_inference_rollout(variant: str, sampler: str) -> None:
    """Every exit at the last step, gradients off: the same blocks as the inference rollout (same seed)."""
    engine = LMDMEngine(tiny_dit(), variant, GEO, Sampling(steps=3, sampler=sampler))  # type: ignore[arg-type]
    text, ctx = prompts(1)[0], real_context()
    with torch.inference_mode():
        want = self_rollout(engine, ctx, text, K, None, torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = self_rollout(engine, ctx, text, K, [2] * K, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_early_exit_is_that_steps_clean_prediction() -> None:
    """Exit at step k: the block is the k-th denoise call's x0 prediction, and no later step runs."""
    dit = tiny_dit()
    engine = LMDMEngine(dit, "block_causal", GEO, Sampling(steps=4))
    objective, text = get_objective("rectified_flow"), prompts(1)[0]
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    inner = engine.denoise_step

    def spy(state: object, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = inner(state, x, t)  # type: ignore[arg-type]
        seen.append((x, t, out))
        return out

    engine.denoise_step = spy  # type: ignore[method-assign]
    state = engine.start(Condition(text, "p"), B, context=real_context(), generator=torch.Generator().manual_seed(0))
    block = engine.step(state, Condition(text, "p"), exit_step=1)
    assert len(seen) == 2
    x, t, out = seen[-1]
    torch.testing.assert_close(block, objective.x0_from_output(x, out, t), rtol=0, atol=0)
    with pytest.raises(ValueError, match="exit_step must be in"):
        engine.step(state, Condition(text, "p"), exit_step=4)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        engine.step(state, Condition(text, "p"), exit_step=0)


def test_gradients_flow_only_through_each_blocks_exit_step_and_context_is_detached() -> None:
    """Every denoise call before the exit runs without autograd, the exit call with it, on an input that
    carries no gradient; the window's context holds detached blocks; block j has no path to block j − 1."""
    dit = tiny_dit()
    engine = LMDMEngine(dit, "block_causal", GEO, Sampling(steps=3))
    calls: list[tuple[int, bool, bool]] = []
    inner = engine.denoise_step

    def spy(state: object, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append((state.progress.block, torch.is_grad_enabled(), x.requires_grad))  # type: ignore[attr-defined]
        return inner(state, x, t)  # type: ignore[arg-type]

    engine.denoise_step = spy  # type: ignore[method-assign]
    exits = [0, 2, 1, 2]
    text = prompts(1)[0]
    state = engine.start(Condition(text, "arc"), B, context=real_context(), generator=torch.Generator().manual_seed(1))
    blocks = [engine.step(state, Condition(text, "arc"), exit_step=k) for k in exits]
    first = CTX  # the real context's blocks come first
    for j, k in enumerate(exits):
        mine = [(grad, x_grad) for block, grad, x_grad in calls if block == first + j]
        assert mine == [(False, False)] * k + [(True, False)], (j, mine)
    assert all(b.requires_grad for b in blocks)
    assert not state.window.latents.requires_grad and not state.pending.inputs.requires_grad
    for j in range(1, K):
        (into,) = torch.autograd.grad(blocks[j].sum(), [blocks[j - 1]], retain_graph=True, allow_unused=True)
        assert into is None  # detached before it became context


@pytest.mark.parametrize("variant", ["block_causal", "encdec"])
def test_a_backward_after_a_k_block_rollout_equals_block_by_block_gradients(variant: str) -> None:
    """A rollout with exits at every step (0: the merged commit pass carries autograd) backpropagates at the end
    without an in-place error, and its gradients equal those taken right after each block."""
    weights = torch.randn(B, IO, K * BF, generator=torch.Generator().manual_seed(9), dtype=F64)
    exits = [0, 1, 0, 2]
    text = prompts(1)[0]

    def grads(at_once: bool) -> list[torch.Tensor]:
        dit = tiny_dit()
        engine = LMDMEngine(dit, variant, GEO, Sampling(steps=3))  # type: ignore[arg-type]
        state = engine.start(Condition(text, "arc"), B, context=real_context(), generator=torch.Generator().manual_seed(0))
        blocks = []
        for j, k in enumerate(exits):
            block = engine.step(state, Condition(text, "arc"), exit_step=k)
            if at_once:
                blocks.append(block)
            else:
                (block * weights[..., j * BF : (j + 1) * BF]).sum().backward()
        if at_once:
            (torch.cat(blocks, -1) * weights).sum().backward()
        return [p.grad.clone() for p in dit.parameters() if p.grad is not None]

    at_once, one_by_one = grads(True), grads(False)
    assert len(at_once) == len(one_by_one) > 0 and any(g.abs().sum() > 0 for g in at_once)
    for a, b in zip(at_once, one_by_one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_exit_steps_are_seeded_by_the_step_alone_and_full_chain_p_picks_the_last() -> None:
    assert draw_exit_steps(0, 7, 12, 4, 0.3) == draw_exit_steps(0, 7, 12, 4, 0.3)
    assert draw_exit_steps(0, 7, 12, 4, 0.3) != draw_exit_steps(0, 8, 12, 4, 0.3)
    assert draw_exit_steps(0, 7, 12, 4, 1.0) == [3] * 12
    draws = [k for s in range(400) for k in draw_exit_steps(1, s, 4, 4, 0.0)]
    assert set(draws) == {0, 1, 2, 3}  # the last step is trained too (the paper's code never draws it)
    counts = torch.bincount(torch.tensor(draws), minlength=4).double() / len(draws)
    assert counts.sub(0.25).abs().max() < 0.05
    last = [k for s in range(400) for k in draw_exit_steps(1, s, 4, 4, 0.5)]
    assert abs(last.count(3) / len(last) - (0.5 + 0.5 / 4)) < 0.05
    with pytest.raises(ValueError, match="full_chain_p"):
        draw_exit_steps(0, 0, 4, 4, 1.5)


def test_relativistic_loss_signs() -> None:
    """A discriminator that scores real higher lowers its own loss and raises the generator's."""
    fake = torch.zeros(8)
    low, high = torch.full((8,), 0.5), torch.full((8,), 3.0)
    assert relativistic_d(high, fake) < relativistic_d(low, fake) < relativistic_d(fake, fake)
    assert relativistic_g(high, fake) > relativistic_g(low, fake) > relativistic_g(fake, fake)
    torch.testing.assert_close(relativistic_d(fake, fake), torch.log(torch.tensor(2.0)))
    torch.testing.assert_close(relativistic_d(high, fake) + 3.0, relativistic_g(high, fake))  # softplus(x) − softplus(−x) = x


def small_disc(seed: int = 0) -> Discriminator:
    return Discriminator(tiny_dit(seed).float(), layer=2, head_width=32, head_kernel=3)


def test_the_discriminator_scores_the_continuation_under_the_prompt() -> None:
    disc = small_disc()
    assert len(disc.dit.layers) == 2 and disc.dit.transformer.project_out is None
    g = torch.Generator().manual_seed(0)
    ctx, x = torch.randn(B, IO, CTX * BF, generator=g), torch.randn(B, IO, K * BF, generator=g)
    t, text = torch.rand(B, generator=g), prompts(2)
    frames = disc.frame_scores(ctx, x, t, text[0].float())
    assert frames.shape == (B, K * BF)
    torch.testing.assert_close(disc(ctx, x, t, text[0].float()), frames.mean(-1))
    assert not torch.allclose(disc(ctx, x, t, text[1].float()), disc(ctx, x, t, text[0].float()))  # conditioned on the prompt
    assert not torch.allclose(disc(ctx * 0, x, t, text[0].float()), disc(ctx, x, t, text[0].float()))  # and on the context
    with pytest.raises(ValueError, match="disc_layer"):
        Discriminator(tiny_dit(), layer=4)


def test_one_discriminator_step_raises_real_over_fake_and_the_generator_loss_follows() -> None:
    """A few optimizer steps on the discriminator loss separate real from fake (and from the rolled prompts):
    its loss falls, the generator's rises; the generator loss reaches the fake but not the discriminator."""
    torch.manual_seed(0)
    disc, objective = small_disc(), get_objective("rectified_flow")
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(4, IO, CTX * BF, generator=g)
    real = torch.randn(4, IO, K * BF, generator=g) + 2.0
    fake = torch.randn(4, IO, K * BF, generator=g).requires_grad_(True)
    text = torch.randn(4, 5, 32, generator=g)
    noise = NoiseDraw(t=torch.full((4,), 0.2), eps=torch.randn(4, IO, K * BF, generator=g))
    before_g = float(generator_loss(disc, objective, ctx, real, fake, text, noise).detach())
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        out = discriminator_loss(disc, objective, ctx, real, fake, text, noise, contrastive_weight=1.0, r1_weight=0.1, r2_weight=0.1)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    assert fake.grad is None  # the discriminator step never reaches the generator
    assert losses[-1] < losses[0] and out.acc_real == out.acc_fake == 1.0 and out.acc_contrastive > 0.5
    g_loss = generator_loss(disc, objective, ctx, real, fake, text, noise)
    assert float(g_loss) > before_g
    g_loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    grads_before = [None if p.grad is None else p.grad.clone() for p in disc.parameters()]
    generator_loss(disc, objective, ctx, real, fake, text, noise).backward()
    assert all((a is None and p.grad is None) or torch.equal(a, p.grad) for a, p in zip(grads_before, disc.parameters(), strict=True))
    assert all(p.requires_grad for p in disc.parameters() if p is not None)


def test_a_rollout_needs_a_block_per_exit_step() -> None:
    engine = LMDMEngine(tiny_dit(), "block_causal", GEO, Sampling(steps=2))
    with pytest.raises(ValueError, match="one per block"):
        rollout(engine, 3, Condition(), batch=B, exit_steps=[0, 1])
