"""ARC-Forcing's pieces as pure functions (DESIGN §5): the exit steps, the self-rollout, and the adversarial
relativistic + contrastive losses. The training loop that alternates them is ``lmdm arc``
(:mod:`lmdm.pipelines.arc`).

- :func:`draw_exit_steps`: per block, the denoising step whose clean prediction becomes the block; seeded by
  the training step alone, so every worker draws the same steps (their rollouts cost the same).
- :func:`self_rollout`: ``K`` blocks from a real context through the real streaming engine and the one
  :func:`~lmdm.streaming.rollout.rollout` (CFG 1, gradients through each block's exit step only).
- :func:`discriminator_loss` / :func:`generator_loss`: the discriminator scores ``[real context | noised
  continuation]``; real and generated continuations share the context, ``t`` and the noise.

  - relativistic: discriminator ``softplus(−(D(real) − D(fake)))``, generator ``softplus(D(real) − D(fake))``;
  - contrastive: real audio under the batch's prompts rolled by one counts as fake for the discriminator,
    ``softplus(−(D(real) − D(real, rolled prompt)))``, which keeps prompt adherence;
  - optional R1/R2 by finite differences: ``(D(x_t + σ·n) − D(x_t))²`` on real / generated inputs, a
    gradient penalty without double backward.

Legend: B batch, C latent channels, Kc context frames, T = K·Bf continuation frames, L text tokens, Dc text width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmdm.diffusion.noise import randn
from lmdm.diffusion.objectives import Objective
from lmdm.models.discriminator import Discriminator
from lmdm.streaming.common import Condition, Engine
from lmdm.streaming.rollout import rollout

__all__ = [
    "DiscriminatorLoss",
    "NoiseDraw",
    "discriminator_loss",
    "draw_exit_steps",
    "draw_noise",
    "generator_loss",
    "relativistic_d",
    "relativistic_g",
    "self_rollout",
]


def draw_exit_steps(seed: int, step: int, blocks: int, steps: int, full_chain_p: float) -> list[int]:
    """Each block's exit step for training step ``step``: the last step (``steps − 1``) with probability
    ``full_chain_p``, else uniform over ``0 … steps − 1``. A function of ``(seed, step)`` only: the same
    on every worker, and again after a resume.

    Raises:
        ValueError: ``steps < 1``, ``blocks < 1`` or ``full_chain_p`` outside ``[0, 1]``.
    """
    if steps < 1 or blocks < 1:
        raise ValueError(f"need at least one block and one step, got blocks={blocks}, steps={steps}")
    if not 0.0 <= full_chain_p <= 1.0:
        raise ValueError(f"full_chain_p must be in [0, 1], got {full_chain_p}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    full = torch.rand(blocks, generator=g, dtype=torch.float64) < full_chain_p
    uniform = torch.randint(0, steps, (blocks,), generator=g)
    return [steps - 1 if bool(f) else int(k) for f, k in zip(full, uniform, strict=True)]


def self_rollout(
    engine: Engine[object],
    context: Tensor,
    text: Tensor | None,
    blocks: int,
    exit_steps: list[int] | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The generator's ``blocks`` blocks ``(B, C, blocks·Bf)`` after the real ``context`` ``(B, C, Kc)``.

    With ``exit_steps`` (one per block) each block is its exit step's clean prediction and carries gradients
    through that step alone; blocks enter the context detached. ``None``: the inference rollout.
    """
    condition = Condition(text=text, key="arc") if text is not None else Condition()
    return rollout(engine, blocks, condition, batch=context.shape[0], context=context, generator=generator, exit_steps=exit_steps)


@dataclass(frozen=True)
class NoiseDraw:
    """The discriminator's noise level ``t`` ``(B,)`` and noise ``eps`` ``(B, C, T)``, shared by real and fake."""

    t: Tensor
    eps: Tensor

    def noised(self, objective: Objective, x: Tensor) -> Tensor:
        """``x`` ``(B, C, T)`` noised to ``t`` with ``eps``."""
        return objective.noise(x, self.eps.to(x.dtype), self.t.to(x.dtype))


def draw_noise(real: Tensor, t_min: float, t_max: float, generator: torch.Generator | None) -> NoiseDraw:
    """``t`` uniform in ``[t_min, t_max]`` per window and standard normal ``eps`` shaped like ``real``."""
    device = real.device
    u = torch.rand(real.shape[0], generator=generator, device=generator.device if generator is not None else device, dtype=real.dtype)
    eps = randn(tuple(real.shape), generator, device, real.dtype)
    return NoiseDraw(t=(t_min + (t_max - t_min) * u).to(device), eps=eps)


def relativistic_d(real: Tensor, fake: Tensor) -> Tensor:
    """The discriminator's relativistic loss ``mean softplus(−(D(real) − D(fake)))`` (lower: real scored higher)."""
    return F.softplus(-(real - fake)).mean()


def relativistic_g(real: Tensor, fake: Tensor) -> Tensor:
    """The generator's relativistic loss ``mean softplus(D(real) − D(fake))`` (lower: fake scored as real)."""
    return F.softplus(real - fake).mean()


@dataclass(frozen=True)
class DiscriminatorLoss:
    """The discriminator's loss and its parts (floats for logging, except ``loss``).

    Accuracies: ``real`` = windows whose real score beats the batch's mean fake score; ``fake`` = generated
    windows scored below the batch's mean real score; ``contrastive`` = real windows scored higher under their
    own prompt than under the rolled one.
    """

    loss: Tensor
    relativistic: float
    contrastive: float
    penalty: float
    acc_real: float
    acc_fake: float
    acc_contrastive: float


def discriminator_loss(
    disc: Discriminator,
    objective: Objective,
    context: Tensor,
    real: Tensor,
    fake: Tensor,
    text: Tensor | None,
    noise: NoiseDraw,
    contrastive_weight: float = 1.0,
    r1_weight: float = 0.0,
    r2_weight: float = 0.0,
    penalty_sigma: float = 0.01,
    generator: torch.Generator | None = None,
) -> DiscriminatorLoss:
    """One discriminator objective on real and generated continuations ``(B, C, T)`` of ``context``.

    ``fake`` is detached here (the generator gets no gradient from this loss). The contrastive term needs
    text and ``B ≥ 2`` (a batch of one has no other prompt); it is skipped otherwise.
    """
    fake = fake.detach()
    real_t, fake_t = noise.noised(objective, real), noise.noised(objective, fake)
    d_real = disc(context, real_t, noise.t, text)
    d_fake = disc(context, fake_t, noise.t, text)
    loss = relativistic_d(d_real, d_fake)
    relativistic, contrastive = float(loss.detach()), float("nan")
    acc_contrastive = float("nan")
    if contrastive_weight > 0 and text is not None and real.shape[0] > 1:
        d_wrong = disc(context, real_t, noise.t, text.roll(1, dims=0))
        c = relativistic_d(d_real, d_wrong)
        loss = loss + contrastive_weight * c
        contrastive, acc_contrastive = float(c.detach()), float((d_real > d_wrong).float().mean())
    penalty = torch.zeros((), dtype=loss.dtype, device=loss.device)
    for weight, x_t, d_x in ((r1_weight, real_t, d_real), (r2_weight, fake_t, d_fake)):
        if weight > 0:
            bumped = x_t + penalty_sigma * randn(tuple(x_t.shape), generator, x_t.device, x_t.dtype)
            penalty = penalty + weight * (disc(context, bumped, noise.t, text) - d_x).pow(2).mean()
    loss = loss + penalty
    with torch.no_grad():
        acc_real = float((d_real > d_fake.mean()).float().mean())
        acc_fake = float((d_fake < d_real.mean()).float().mean())
    return DiscriminatorLoss(loss, relativistic, contrastive, float(penalty.detach()), acc_real, acc_fake, acc_contrastive)


def generator_loss(
    disc: Discriminator, objective: Objective, context: Tensor, real: Tensor, fake: Tensor, text: Tensor | None, noise: NoiseDraw
) -> Tensor:
    """The generator's relativistic loss: its continuation ``fake`` (with gradients) against the real one,
    both noised with ``noise``; the discriminator's own parameters get no gradient (it is frozen here)."""
    frozen = [p for p in disc.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            d_real = disc(context, noise.noised(objective, real), noise.t, text)
        d_fake = disc(context, noise.noised(objective, fake), noise.t, text)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return relativistic_g(d_real, d_fake)
