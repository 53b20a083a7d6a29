"""Training losses compute what they claim: equal to hand computations from the sequence forwards,
confined to target frames and their attention bands (gradients prove it), with context and prompt
dropout, and trainable."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import Tensor

from lmdm.diffusion.objectives import Objective, get_objective
from lmdm.models.dit import DiT, DiTArgs
from lmdm.streaming.sequences import BlockGeometry, block_causal_forward, context_inputs, target_inputs, window_forward
from lmdm.training.losses import (
    LossOutput,
    TSampler,
    base_inpainting_loss,
    lmdm_block_causal_loss,
    lmdm_encdec_loss,
    sample_context_valid,
    sample_inpainting_mask,
)

IO, BF, CTX, B, L, DC = 4, 3, 2, 2, 5, 32
GEO = BlockGeometry(block_frames=BF, context_blocks=CTX)
F64 = torch.float64


def tiny_dit(depth: int = 2, seed: int = 0, dtype: torch.dtype = F64) -> DiT:
    torch.manual_seed(seed)
    dit = DiT(DiTArgs(io_channels=IO, width=64, depth=depth, head_dim=32, cond_token_dim=DC, input_concat_dim=IO + 1)).to(dtype)
    for p in dit.parameters():  # non-zero everywhere (the default init zeroes the residual convs)
        torch.nn.init.normal_(p, std=0.2)
    return dit


def batch(frames: int, seed: int = 1, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    """Latents ``(B, IO, frames)`` and one prompt per sample ``(B, L, DC)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, IO, frames, generator=g, dtype=dtype), torch.randn(B, L, DC, generator=g, dtype=dtype)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class DetachedX0:
    """An objective whose noising path and target do not carry gradients to ``x0``: the gradient of
    a loss with respect to its latents then flows through the clean (context) inputs only."""

    name: ClassVar[str] = "detached_x0"

    def __init__(self, base: Objective) -> None:
        self.base = base

    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self.base.noise(x0.detach(), eps, t)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self.base.target(x0.detach(), eps, t)


class Captured:
    """An objective whose ``x_t`` and target are fresh leaves (recorded), to take gradients w.r.t. them."""

    name: ClassVar[str] = "captured"

    def __init__(self, base: Objective) -> None:
        self.base = base
        self.x_t: Tensor | None = None
        self.target_: Tensor | None = None

    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        self.x_t = self.base.noise(x0, eps, t).detach().requires_grad_()
        return self.x_t

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        self.target_ = self.base.target(x0, eps, t).detach().requires_grad_()
        return self.target_


def hand_block_causal(dit: DiT, objective: Objective, latents: Tensor, text: Tensor | None, out: LossOutput) -> Tensor:
    """Per-target MSE ``(B, J)`` recomputed target by target from the loss's own draws."""
    assert out.targets is not None
    targets = out.targets.tolist()
    x0 = [latents[..., j * BF : (j + 1) * BF] for j in targets]
    eps = [out.noise[..., i * BF : (i + 1) * BF] for i in range(len(targets))]
    noisy = torch.cat([objective.noise(x, e, out.t[:, i]) for i, (x, e) in enumerate(zip(x0, eps, strict=True))], -1)
    if text is not None and out.text_kept is not None:
        text = text * out.text_kept[:, None, None]
    pred = block_causal_forward(
        dit, GEO, latents, noisy, targets, out.t, text=None if text is None else text[:, None], context_valid=out.context_valid
    )
    cols = [
        (pred[..., i * BF : (i + 1) * BF] - objective.target(x, e, out.t[:, i])).square().mean(dim=(1, 2))
        for i, (x, e) in enumerate(zip(x0, eps, strict=True))
    ]
    return torch.stack(cols, 1)


# ---- block-causal ------------------------------------------------------------------------------


@pytest.mark.parametrize(("objective_name", "t_sampler"), [("rectified_flow", "uniform"), ("v", "logit_normal")])
def test_block_causal_loss_equals_hand_computation(objective_name: str, t_sampler: TSampler) -> None:
    dit, objective = tiny_dit(), get_objective(objective_name)
    N, J = 6, 3
    latents, text = batch(N * BF)

    def run(seed: int) -> LossOutput:
        return lmdm_block_causal_loss(
            dit,
            objective,
            GEO,
            latents,
            text,
            targets_per_sequence=J,
            generator=gen(seed),
            context_dropout=0.3,
            oldest_dropout=0.5,
            cfg_dropout=0.5,
            t_sampler=t_sampler,
        )

    out = run(3)
    assert out.targets is not None and out.targets.shape == (J,) and out.per_target.shape == (B, J) and out.t.shape == (B, J)
    assert out.targets.unique().numel() == J and torch.equal(out.targets, out.targets.sort().values)
    assert 0 <= int(out.targets.min()) and int(out.targets.max()) < N and bool(((out.t >= 0) & (out.t <= 1)).all())
    per_target = hand_block_causal(dit, objective, latents, text, out)
    torch.testing.assert_close(out.per_target, per_target, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, per_target.mean(), rtol=1e-12, atol=1e-12)
    again = run(3)
    assert torch.equal(again.loss, out.loss)  # the generator is the only source of randomness
    other = run(4)
    assert not torch.equal(other.t, out.t)


@pytest.mark.parametrize("depth", [1, 2])
def test_block_causal_gradient_is_confined_to_the_targets_bands(depth: int) -> None:
    """Through clean history, target j depends on clean blocks j − depth·Ctx … j − 1 exactly; never on
    its own clean copy unless a later target's band covers it; never on blocks after the last target."""
    dit = tiny_dit(depth=depth)
    N = 12
    latents = batch(N * BF)[0].requires_grad_()
    out = lmdm_block_causal_loss(dit, DetachedX0(get_objective("rectified_flow")), GEO, latents, targets_per_sequence=2, generator=gen(1))  # type: ignore[arg-type]
    out.loss.backward()
    assert out.targets is not None and latents.grad is not None
    targets = out.targets.tolist()
    band = {b for j in targets for b in range(max(0, j - depth * CTX), j)}
    seen = {b for b in range(N) if torch.count_nonzero(latents.grad[..., b * BF : (b + 1) * BF]) > 0}
    assert band and len(band) < N  # the test can fail both ways
    assert seen == band, f"targets {targets}: clean-path gradient on blocks {sorted(seen)}, expected {sorted(band)}"
    for j in targets:  # a target's own clean copy counts only if a later target's band covers it
        assert (j in seen) == any(k - depth * CTX <= j < k for k in targets)
    assert max(targets) not in seen  # (seed 1 draws targets {1, 4}: block 1 is unseen at depth 1, seen at depth 2)

    # with the plain objective the targets' own blocks join in (through x0); nothing else does
    latents.grad = None
    out = lmdm_block_causal_loss(dit, get_objective("rectified_flow"), GEO, latents, targets_per_sequence=2, generator=gen(1))
    out.loss.backward()
    assert latents.grad is not None
    seen_all = {b for b in range(N) if torch.count_nonzero(latents.grad[..., b * BF : (b + 1) * BF]) > 0}
    assert seen_all == band | set(targets)


def test_whole_context_dropout_equals_an_empty_history() -> None:
    dit, objective = tiny_dit(), get_objective("rectified_flow")
    latents, text = batch(5 * BF)
    dropped = lmdm_block_causal_loss(dit, objective, GEO, latents, text, targets_per_sequence=3, generator=gen(2), context_dropout=1.0)
    kept = lmdm_block_causal_loss(dit, objective, GEO, latents, text, targets_per_sequence=3, generator=gen(2))
    assert not dropped.context_valid.any() and kept.context_valid.all()
    assert torch.equal(dropped.t, kept.t) and torch.equal(dropped.noise, kept.noise)  # same draws, only the history differs
    assert dropped.targets is not None and kept.targets is not None and torch.equal(dropped.targets, kept.targets)
    empty = LossOutput(
        dropped.loss, dropped.per_target, dropped.t, dropped.noise, torch.zeros(B, 5, dtype=torch.bool), None, dropped.targets
    )
    torch.testing.assert_close(dropped.per_target, hand_block_causal(dit, objective, latents, text, empty), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(dropped.loss, kept.loss)


def test_encdec_whole_context_dropout_empties_every_slot() -> None:
    dit, objective = tiny_dit(), get_objective("rectified_flow")
    latents, text = batch((CTX + 1) * BF)
    context, target = latents[..., : CTX * BF], latents[..., CTX * BF :]
    dropped = lmdm_encdec_loss(dit, objective, GEO, context, target, text, generator=gen(2), context_dropout=1.0)
    kept = lmdm_encdec_loss(dit, objective, GEO, context, target, text, generator=gen(2))
    assert not dropped.context_valid.any() and torch.equal(dropped.noise, kept.noise)
    x_t = objective.noise(target, dropped.noise, dropped.t[:, 0])
    empty = window_forward(
        dit,
        "encdec",
        GEO,
        torch.zeros_like(context),
        x_t,
        dropped.t[:, 0],
        text=text[:, None],
        context_valid=torch.zeros(CTX, dtype=torch.bool),
    )
    goal = objective.target(target, dropped.noise, dropped.t[:, 0])
    torch.testing.assert_close(dropped.loss, (empty - goal).square().mean(), rtol=1e-12, atol=1e-12)  # dropped context is not even read
    assert not torch.allclose(dropped.loss, kept.loss)


def test_context_dropout_masks_are_whole_or_oldest_prefixes() -> None:
    g = gen(0)
    oldest = sample_context_valid(400, 5, g, whole=0.0, oldest=1.0)
    k = (~oldest).sum(1)
    assert bool((k >= 1).all()) and set(k.tolist()) == {1, 2, 3, 4, 5}
    assert torch.equal(oldest, torch.arange(5)[None] >= k[:, None])  # exactly blocks 0 … k−1 dropped
    whole = sample_context_valid(2000, 5, g, whole=0.25, oldest=0.0)
    empty = (~whole).all(1)
    assert torch.equal(whole, ~empty[:, None].expand(-1, 5)) and abs(empty.double().mean().item() - 0.25) < 0.04
    assert sample_context_valid(50, 5, g, whole=0.0, oldest=0.0).all()


def test_cfg_dropout_zeroes_the_prompt() -> None:
    dit, objective = tiny_dit(), get_objective("rectified_flow")
    latents, text = batch(4 * BF)
    dropped = lmdm_block_causal_loss(dit, objective, GEO, latents, text, targets_per_sequence=2, generator=gen(5), cfg_dropout=1.0)
    null = lmdm_block_causal_loss(dit, objective, GEO, latents, torch.zeros_like(text), targets_per_sequence=2, generator=gen(5))
    full = lmdm_block_causal_loss(dit, objective, GEO, latents, text, targets_per_sequence=2, generator=gen(5))
    assert dropped.text_kept is not None and not dropped.text_kept.any()
    assert full.text_kept is not None and full.text_kept.all()
    torch.testing.assert_close(dropped.loss, null.loss, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(dropped.loss, full.loss)


# ---- encdec ------------------------------------------------------------------------------------


def test_encdec_loss_equals_hand_computation() -> None:
    dit, objective = tiny_dit(), get_objective("v")
    latents, text = batch((CTX + 1) * BF)
    context, target = latents[..., : CTX * BF], latents[..., CTX * BF :]
    out = lmdm_encdec_loss(
        dit, objective, GEO, context, target, text, generator=gen(7), context_dropout=0.3, oldest_dropout=0.5, cfg_dropout=0.5
    )
    assert out.per_target.shape == (B, 1) and out.context_valid.shape == (B, CTX) and out.noise.shape == (B, IO, BF)
    assert out.text_kept is not None
    t = out.t[:, 0]
    x_t = objective.noise(target, out.noise, t)
    text_used = (text * out.text_kept[:, None, None])[:, None]
    pred = window_forward(dit, "encdec", GEO, context, x_t, t, text=text_used, context_valid=out.context_valid)
    per = (pred - objective.target(target, out.noise, t)).square().mean(dim=(1, 2))
    torch.testing.assert_close(out.per_target[:, 0], per, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, per.mean(), rtol=1e-12, atol=1e-12)


# ---- base (bidirectional, inpainting) ----------------------------------------------------------


def test_base_inputs_follow_the_frame_convention() -> None:
    """``x_t`` zeroed on clean frames + ``[clean·mask, mask]`` is, frame by frame, ``context_inputs``
    on clean frames and ``target_inputs`` elsewhere; with a clean prefix of ``Ctx`` blocks it is the
    outpainting window (``window_forward(..., "full")``)."""
    dit, objective = tiny_dit(), get_objective("rectified_flow")
    T = (CTX + 1) * BF
    latents, text = batch(T)
    out = base_inpainting_loss(dit, objective, latents, text, generator=gen(4), generate_prob=0.0, prefix_prob=0.0)
    mask, t = out.context_valid, out.t[:, 0]
    assert mask.any() and (~mask).any()
    x_t = objective.noise(latents, out.noise, t)
    frames = torch.where(mask[:, None], context_inputs(latents), target_inputs(x_t))
    pos = torch.arange(T + 1)
    pred = dit.forward_tokens(frames, pos[1:], dit.global_tokens(t), pos[:1], None, dit.text_kv(text))
    se = (pred - objective.target(latents, out.noise, t)).square().mean(1)
    torch.testing.assert_close(out.loss, se[~mask].mean(), rtol=1e-12, atol=1e-12)

    prefix = (torch.arange(T) < CTX * BF)[None].expand(B, -1)
    out = base_inpainting_loss(dit, objective, latents, text, generator=gen(4), clean_mask=prefix)
    t = out.t[:, 0]
    x_t = objective.noise(latents[..., CTX * BF :], out.noise[..., CTX * BF :], t)
    pred = window_forward(dit, "full", GEO, latents[..., : CTX * BF], x_t, t, text=text[:, None])
    goal = objective.target(latents[..., CTX * BF :], out.noise[..., CTX * BF :], t)
    torch.testing.assert_close(out.loss, (pred - goal).square().mean(), rtol=1e-12, atol=1e-12)


def test_base_loss_covers_generated_frames_only() -> None:
    dit, captured = tiny_dit(), Captured(get_objective("rectified_flow"))
    latents, text = batch(4 * BF)
    out = base_inpainting_loss(dit, captured, latents, text, generator=gen(6), generate_prob=0.0)  # type: ignore[arg-type]
    out.loss.backward()
    assert captured.x_t is not None and captured.target_ is not None
    assert captured.x_t.grad is not None and captured.target_.grad is not None
    clean = out.context_valid[:, None].expand(-1, IO, -1)
    assert clean.any() and (~clean).any()
    assert torch.count_nonzero(captured.x_t.grad[clean]) == 0  # clean-region noise is never read
    assert torch.count_nonzero(captured.target_.grad[clean]) == 0  # nor scored
    assert torch.count_nonzero(captured.x_t.grad[~clean]) == (~clean).sum()
    assert torch.count_nonzero(captured.target_.grad[~clean]) == (~clean).sum()


def test_inpainting_masks_are_contiguous_and_leave_frames_to_generate() -> None:
    T = 8
    mask = sample_inpainting_mask(3000, T, gen(0), generate_prob=0.2, prefix_prob=0.4)
    n = mask.sum(1)
    assert bool((n < T).all())  # at least one generated frame
    first = torch.where(n > 0, mask.float().argmax(1), torch.zeros_like(n))
    assert torch.equal(mask, (torch.arange(T)[None] >= first[:, None]) & (torch.arange(T)[None] < (first + n)[:, None]))
    none, prefix = (n == 0).double().mean().item(), ((n > 0) & mask[:, 0]).double().mean().item()
    assert abs(none - 0.2) < 0.03 and prefix > 0.4 - 0.03  # spans may also start at frame 0
    assert bool(((n > 0) & ~mask[:, 0]).any())
    assert not sample_inpainting_mask(100, T, gen(0), generate_prob=1.0, prefix_prob=0.0).any()


# ---- training and validation -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["block_causal", "encdec", "base"])
def test_a_few_adam_steps_decrease_each_loss(which: str) -> None:
    dit, objective = tiny_dit(dtype=torch.float32), get_objective("rectified_flow")
    latents, text = batch(4 * BF, dtype=torch.float32)

    def loss() -> Tensor:  # a fixed batch: the same draws at every step
        g = gen(9)
        if which == "block_causal":
            return lmdm_block_causal_loss(dit, objective, GEO, latents, text, targets_per_sequence=2, generator=g, context_dropout=0.2).loss
        if which == "encdec":
            return lmdm_encdec_loss(
                dit, objective, GEO, latents[..., : CTX * BF], latents[..., CTX * BF : (CTX + 1) * BF], text, generator=g
            ).loss
        return base_inpainting_loss(dit, objective, latents, text, generator=g).loss

    opt = torch.optim.Adam(dit.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.detach())
    assert losses[-1] < 0.9 * losses[0], losses


def test_bad_inputs_raise_clear_errors() -> None:
    dit, rf = tiny_dit(depth=1), get_objective("rectified_flow")
    latents, text = batch(4 * BF)
    with pytest.raises(ValueError, match="whole blocks"):
        lmdm_block_causal_loss(dit, rf, GEO, latents[..., :-1], targets_per_sequence=1, generator=gen())
    with pytest.raises(ValueError, match="targets_per_sequence"):
        lmdm_block_causal_loss(dit, rf, GEO, latents, targets_per_sequence=5, generator=gen())
    with pytest.raises(ValueError, match="context_dropout"):
        lmdm_block_causal_loss(dit, rf, GEO, latents, targets_per_sequence=1, generator=gen(), context_dropout=1.5)
    with pytest.raises(ValueError, match="text must be"):
        lmdm_block_causal_loss(dit, rf, GEO, latents, text[..., :-1], targets_per_sequence=1, generator=gen())
    with pytest.raises(ValueError, match="t_sampler"):
        lmdm_block_causal_loss(dit, rf, GEO, latents, targets_per_sequence=1, generator=gen(), t_sampler="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a window is"):
        lmdm_encdec_loss(dit, rf, GEO, latents[..., : CTX * BF], latents[..., : BF + 1], generator=gen())
    with pytest.raises(ValueError, match="at least 2 frames"):
        base_inpainting_loss(dit, rf, latents[..., :1], generator=gen())
    with pytest.raises(ValueError, match="generate_prob \\+ prefix_prob"):
        base_inpainting_loss(dit, rf, latents, generator=gen(), generate_prob=0.6, prefix_prob=0.6)
    bare = DiT(DiTArgs(io_channels=IO, width=64, depth=1, head_dim=32, input_concat_dim=0))
    with pytest.raises(ValueError, match="input_concat_dim"):
        base_inpainting_loss(bare, rf, latents.float(), generator=gen())
