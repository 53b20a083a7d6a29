"""Training losses of the LMDM variants and of the bidirectional base, as pure functions over a DiT.

- :func:`lmdm_block_causal_loss`: sequences of ``N`` clean blocks; ``J`` of them are noised and packed
  as targets into one banded-mask forward (:func:`~lmdm.streaming.sequences.block_causal_forward`).
  Target ``j`` sees clean blocks ``j − Ctx … j − 1`` only (never its own clean copy), and through
  ``depth`` layers of clean-to-clean attention it depends on clean blocks ``j − depth·Ctx … j − 1``.
- :func:`lmdm_encdec_loss`: windows of ``Ctx`` clean context blocks + one noisy target
  (:func:`~lmdm.streaming.sequences.window_forward` with the ``encdec`` mask).
- :func:`base_inpainting_loss`: the bidirectional base (Stable Audio's :meth:`DiT.forward`) with
  random inpainting masks: pure generation, a clean prefix (outpainting) or a clean span.

Every loss is the objective's mean squared error on generated (target) frames only. Frame inputs
follow :mod:`lmdm.streaming.sequences`: a clean frame is ``[0, clean, 1]``, a generated frame
``[x_t, 0, 0]``. Context dropout marks history blocks / context slots invalid (masked out as
keys: the one representation of "no context"); CFG dropout zeroes a sample's prompt (the engines'
unconditional branch uses zero text). All randomness comes from the passed generator, drawn on its
device in a fixed order (targets, t, noise, prompt dropout, context dropout or inpainting mask), so
the same seed gives the same draws whatever the dropout probabilities. Nothing calls ``.item()``.

Legend: B batch, C latent channels, T frames, Bf block frames, N history blocks, J packed targets,
Ctx context blocks, L text tokens, Dc text width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from einops import rearrange
from torch import Tensor

from lmdm.diffusion.objectives import Objective
from lmdm.models.dit import DiT
from lmdm.streaming.sequences import BlockGeometry, block_causal_forward, window_forward

__all__ = [
    "LossOutput",
    "TSampler",
    "base_inpainting_loss",
    "lmdm_block_causal_loss",
    "lmdm_encdec_loss",
    "sample_context_valid",
    "sample_inpainting_mask",
    "sample_t",
]

TSampler = Literal["uniform", "logit_normal"]


@dataclass(frozen=True)
class LossOutput:
    """A loss and the random draws it was computed from (for logging and exact re-computation).

    Attributes:
        loss: ``()`` mean squared error over generated frames and channels (backpropagate this).
        per_target: ``(B, J)`` mean squared error per sample and target block (``J = 1`` for
            ``encdec`` and the base, where it is the mean over the sample's generated frames).
        t: ``(B, J)`` diffusion time of each target.
        noise: ``eps`` of the noisy inputs: ``(B, C, J·Bf)`` packed targets (block-causal),
            ``(B, C, Bf)`` (encdec) or ``(B, C, T)`` (base; only generated frames are used).
        context_valid: bool, which clean inputs were given: ``(B, N)`` history blocks
            (block-causal), ``(B, Ctx)`` context slots (encdec), ``(B, T)`` clean frames (base).
        text_kept: ``(B,)`` bool, False where CFG dropout zeroed the prompt; ``None`` without text.
        targets: ``(J,)`` int64 stream block of each packed target, ascending (block-causal only).
    """

    loss: Tensor
    per_target: Tensor
    t: Tensor
    noise: Tensor
    context_valid: Tensor
    text_kept: Tensor | None = None
    targets: Tensor | None = None


# ---- random draws ------------------------------------------------------------------------------


def sample_t(shape: tuple[int, ...], generator: torch.Generator, t_sampler: TSampler, dtype: torch.dtype = torch.float32) -> Tensor:
    """Training times in ``[0, 1]``, on the generator's device.

    Args:
        shape: output shape, e.g. ``(B, J)``.
        generator: the source of randomness.
        t_sampler: ``"uniform"`` (``U[0, 1)``) or ``"logit_normal"`` (``sigmoid(N(0, 1))``, which
            favours mid-range times, as in SD3's rectified-flow training).
        dtype: floating dtype of the result.

    Returns:
        ``shape`` tensor.

    Raises:
        ValueError: for an unknown ``t_sampler``.
    """
    if t_sampler == "uniform":
        return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype)
    if t_sampler == "logit_normal":
        return torch.sigmoid(torch.randn(shape, generator=generator, device=generator.device, dtype=dtype))
    raise ValueError(f"unknown t_sampler {t_sampler!r}; expected one of {list(get_args(TSampler))}")


def sample_context_valid(batch: int, blocks: int, generator: torch.Generator, whole: float, oldest: float) -> Tensor:
    """Context dropout as a validity mask over history blocks / context slots (oldest first).

    Per sample, with probability ``whole`` every block is dropped; independently, with probability
    ``oldest`` a random prefix ``0 … k−1`` is dropped, ``k`` uniform in ``1 … blocks`` (the sample
    then looks like a stream that started at block ``k``). Draws ``3·batch`` numbers whatever the
    probabilities.

    Args:
        batch: ``B``; blocks: ``N`` (or ``Ctx``); generator: the source of randomness.
        whole, oldest: probabilities in ``[0, 1]``.

    Returns:
        ``(B, N)`` bool on the generator's device; False = dropped.
    """
    device = generator.device
    drop_all = torch.rand(batch, generator=generator, device=device) < whole
    drop_prefix = torch.rand(batch, generator=generator, device=device) < oldest
    k = torch.randint(1, max(blocks, 1) + 1, (batch,), generator=generator, device=device)
    in_prefix = torch.arange(blocks, device=device)[None, :] < k[:, None]
    return ~(drop_all[:, None] | (drop_prefix[:, None] & in_prefix))


def sample_inpainting_mask(batch: int, frames: int, generator: torch.Generator, generate_prob: float, prefix_prob: float) -> Tensor:
    """Random inpainting masks for the base: which frames are given clean.

    Per sample: with probability ``generate_prob`` none (pure generation); with ``prefix_prob`` a
    clean prefix of ``1 … T−1`` frames (outpainting: the prefix is the context); otherwise a clean
    contiguous span of ``1 … T−1`` frames at a uniform start. At least one frame is always generated.

    Args:
        batch: ``B``; frames: ``T ≥ 2``; generator: the source of randomness.
        generate_prob, prefix_prob: probabilities, ``generate_prob + prefix_prob ≤ 1``.

    Returns:
        ``(B, T)`` bool on the generator's device; True = clean (context) frame.
    """
    device = generator.device
    kind = torch.rand(batch, generator=generator, device=device)
    length = torch.randint(1, frames, (batch,), generator=generator, device=device)  # 1 … T−1
    start = (torch.rand(batch, generator=generator, device=device) * (frames - length + 1)).floor().long()  # 0 … T−length
    start = torch.where(kind >= generate_prob + prefix_prob, start, torch.zeros_like(start))  # a prefix starts at 0
    pos = torch.arange(frames, device=device)[None, :]
    clean = (pos >= start[:, None]) & (pos < (start + length)[:, None])
    return clean & (kind >= generate_prob)[:, None]


# ---- validation and shared steps ---------------------------------------------------------------


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


def _check_model(dit: DiT, latents: Tensor, what: str) -> None:
    C_in = dit.args.io_channels
    if dit.args.input_concat_dim != C_in + 1:
        raise ValueError(
            f"LMDM/base losses need a DiT with input_concat_dim = io_channels + 1 = {C_in + 1} "
            f"(clean context + context mask), got {dit.args.input_concat_dim}"
        )
    if latents.ndim != 3 or latents.shape[1] != C_in:
        raise ValueError(f"{what} must be (B, C={C_in}, frames), got {tuple(latents.shape)}")


def _check_conditioning(dit: DiT, B: int, text: Tensor | None, global_cond: Tensor | None) -> None:
    if text is not None:
        Dc = dit.args.cond_token_dim
        if Dc == 0:
            raise ValueError("text given, but the model has no text conditioning (cond_token_dim=0)")
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != Dc:
            raise ValueError(f"text must be (B={B}, L, Dc={Dc}), one prompt per sample, got {tuple(text.shape)}")
    if global_cond is not None and tuple(global_cond.shape) != (B, dit.args.global_cond_dim):
        raise ValueError(f"global_cond must be (B={B}, global_cond_dim={dit.args.global_cond_dim}), got {tuple(global_cond.shape)}")


def _drop_text(text: Tensor | None, generator: torch.Generator, cfg_dropout: float) -> tuple[Tensor | None, Tensor | None]:
    """Zero each sample's prompt ``(B, L, Dc)`` with probability ``cfg_dropout``; also return kept ``(B,)``."""
    if text is None:
        return None, None
    kept = torch.rand(text.shape[0], generator=generator, device=generator.device) >= cfg_dropout
    kept = kept.to(text.device)
    return text * kept[:, None, None].to(text.dtype), kept


# ---- losses ------------------------------------------------------------------------------------


def lmdm_block_causal_loss(
    dit: DiT,
    objective: Objective,
    geometry: BlockGeometry,
    latents: Tensor,
    text: Tensor | None = None,
    *,
    targets_per_sequence: int,
    generator: torch.Generator,
    context_dropout: float = 0.0,
    oldest_dropout: float = 0.0,
    cfg_dropout: float = 0.0,
    t_sampler: TSampler = "uniform",
    global_cond: Tensor | None = None,
) -> LossOutput:
    """The ``block_causal`` LMDM loss: packed noisy targets over a clean history, banded mask.

    ``targets_per_sequence`` distinct blocks ``j`` (shared by the batch) are noised, each at its own
    ``t`` per sample, and run in one :func:`block_causal_forward` with the clean history = all ``N``
    blocks. A target ``j`` depends on clean blocks ``j − depth·Ctx … j − 1``, so targets with
    ``j < depth·Ctx`` see a truncated history, as blocks near a stream's start do; make ``N`` well
    above ``depth·Ctx`` for most targets to see the full receptive field.
    Target indices are drawn on the generator's device and read back as a list (a CPU generator
    makes this free of device syncs).

    Args:
        dit: the DiT (``input_concat_dim = io_channels + 1``).
        objective: the diffusion objective (``rectified_flow`` or ``v``).
        geometry: block frames ``Bf`` and context blocks ``Ctx``.
        latents: ``(B, C, N·Bf)`` clean sequences, ``N ≥ 1`` whole blocks.
        text: ``(B, L, Dc)`` one prompt per sequence (every block cross-attends to it), or ``None``.
        targets_per_sequence: ``J``, ``1 ≤ J ≤ N``.
        generator: the source of all randomness.
        context_dropout: per-sample probability of dropping the whole history.
        oldest_dropout: per-sample probability of dropping a random prefix of the history.
        cfg_dropout: per-sample probability of zeroing the prompt (classifier-free guidance).
        t_sampler: ``"uniform"`` or ``"logit_normal"``.
        global_cond: ``(B, global_cond_dim)`` timing conditioning, or ``None``.

    Returns:
        :class:`LossOutput` with ``per_target``/``t`` ``(B, J)``, ``noise`` ``(B, C, J·Bf)``,
        ``context_valid`` ``(B, N)`` and ``targets`` ``(J,)``.

    Raises:
        ValueError: on a model without clean-context input channels, latents that are not whole
            blocks, a bad ``J``, probability or ``t_sampler``, or mis-shaped conditioning.
    """
    _check_model(dit, latents, "latents")
    B, C, T = latents.shape
    Bf = geometry.block_frames
    N, J = T // Bf, targets_per_sequence
    if T == 0 or T % Bf:
        raise ValueError(f"latents must hold N ≥ 1 whole blocks of {Bf} frames, got {T} frames")
    if not 1 <= J <= N:
        raise ValueError(f"targets_per_sequence must be in 1 … N = {N} (blocks in the sequence), got {J}")
    for name, p in (("context_dropout", context_dropout), ("oldest_dropout", oldest_dropout), ("cfg_dropout", cfg_dropout)):
        _check_probability(name, p)
    _check_conditioning(dit, B, text, global_cond)
    device, dtype = latents.device, latents.dtype

    targets = torch.randperm(N, generator=generator, device=generator.device)[:J].sort().values
    t = sample_t((B, J), generator, t_sampler, dtype).to(device)
    eps = torch.randn(B, C, J * Bf, generator=generator, device=generator.device, dtype=dtype).to(device)
    text, kept = _drop_text(text, generator, cfg_dropout)
    valid = sample_context_valid(B, N, generator, context_dropout, oldest_dropout).to(device)

    x0 = rearrange(latents, "b c (n f) -> b n c f", f=Bf)[:, targets.to(device)]  # (B, J, C, Bf)
    x0, eps_j, t_j = rearrange(x0, "b j c f -> (b j) c f"), rearrange(eps, "b c (j f) -> (b j) c f", f=Bf), t.reshape(B * J)
    x_t = rearrange(objective.noise(x0, eps_j, t_j), "(b j) c f -> b c (j f)", b=B)
    goal = rearrange(objective.target(x0, eps_j, t_j), "(b j) c f -> b j c f", b=B)
    out = block_causal_forward(
        dit,
        geometry,
        latents,
        x_t,
        targets.tolist(),
        t,
        text=None if text is None else text[:, None],
        context_valid=valid,
        global_cond=global_cond,
    )
    per_target = (rearrange(out, "b c (j f) -> b j c f", f=Bf) - goal).square().mean(dim=(2, 3))  # (B, J)
    return LossOutput(per_target.mean(), per_target, t, eps, valid, kept, targets)


def lmdm_encdec_loss(
    dit: DiT,
    objective: Objective,
    geometry: BlockGeometry,
    context: Tensor,
    target: Tensor,
    text: Tensor | None = None,
    *,
    generator: torch.Generator,
    context_dropout: float = 0.0,
    oldest_dropout: float = 0.0,
    cfg_dropout: float = 0.0,
    t_sampler: TSampler = "uniform",
    global_cond: Tensor | None = None,
) -> LossOutput:
    """The ``encdec`` LMDM loss on windows: ``Ctx`` clean context blocks + one noisy target block.

    Args:
        dit: the DiT (``input_concat_dim = io_channels + 1``).
        objective: the diffusion objective.
        geometry: block frames ``Bf`` and context blocks ``Ctx``.
        context: ``(B, C, Ctx·Bf)`` clean context, oldest block first.
        target: ``(B, C, Bf)`` the clean block that follows it.
        text: ``(B, L, Dc)`` one prompt per window, or ``None``.
        generator: the source of all randomness.
        context_dropout, oldest_dropout: per-sample probabilities of emptying every slot / a random
            prefix of the oldest slots (:func:`sample_context_valid`).
        cfg_dropout: per-sample probability of zeroing the prompt.
        t_sampler: ``"uniform"`` or ``"logit_normal"``.
        global_cond: ``(B, global_cond_dim)`` or ``None``.

    Returns:
        :class:`LossOutput` with ``per_target``/``t`` ``(B, 1)``, ``noise`` ``(B, C, Bf)`` and
        ``context_valid`` ``(B, Ctx)``.

    Raises:
        ValueError: on a model without clean-context input channels, mis-shaped windows or
            conditioning, or a bad probability or ``t_sampler``.
    """
    _check_model(dit, target, "target")
    B, C, Bf = target.shape
    Ctx = geometry.context_blocks
    if Bf != geometry.block_frames or tuple(context.shape) != (B, C, Ctx * Bf):
        raise ValueError(
            f"a window is context (B, C, Ctx·Bf = {Ctx * geometry.block_frames}) + target (B, C, Bf = {geometry.block_frames}); "
            f"got context {tuple(context.shape)} and target {tuple(target.shape)}"
        )
    for name, p in (("context_dropout", context_dropout), ("oldest_dropout", oldest_dropout), ("cfg_dropout", cfg_dropout)):
        _check_probability(name, p)
    _check_conditioning(dit, B, text, global_cond)
    device, dtype = target.device, target.dtype

    t = sample_t((B,), generator, t_sampler, dtype).to(device)
    eps = torch.randn(B, C, Bf, generator=generator, device=generator.device, dtype=dtype).to(device)
    text, kept = _drop_text(text, generator, cfg_dropout)
    valid = sample_context_valid(B, Ctx, generator, context_dropout, oldest_dropout).to(device)

    x_t = objective.noise(target, eps, t)
    out = window_forward(
        dit,
        "encdec",
        geometry,
        context,
        x_t,
        t,
        text=None if text is None else text[:, None],
        context_valid=valid,
        global_cond=global_cond,
    )
    per_target = (out - objective.target(target, eps, t)).square().mean(dim=(1, 2))[:, None]  # (B, 1)
    return LossOutput(per_target.mean(), per_target, t[:, None], eps, valid, kept)


def base_inpainting_loss(
    dit: DiT,
    objective: Objective,
    latents: Tensor,
    text: Tensor | None = None,
    *,
    generator: torch.Generator,
    generate_prob: float = 0.2,
    prefix_prob: float = 0.4,
    clean_mask: Tensor | None = None,
    cfg_dropout: float = 0.0,
    t_sampler: TSampler = "uniform",
    global_cond: Tensor | None = None,
) -> LossOutput:
    """The bidirectional base's loss with inpainting masks (Stable Audio's :meth:`DiT.forward`).

    Inputs are ``x = x_t`` with clean frames zeroed and ``input_concat_cond = [clean·mask, mask]``:
    per frame exactly :func:`~lmdm.streaming.sequences.context_inputs` (``[0, clean, 1]``) on clean
    frames and :func:`~lmdm.streaming.sequences.target_inputs` (``[x_t, 0, 0]``) on generated ones.
    Attention is full (no mask); the loss covers generated frames only and weighs every generated
    frame of the batch equally.

    Args:
        dit: the DiT (``input_concat_dim = io_channels + 1``).
        objective: the diffusion objective.
        latents: ``(B, C, T)`` clean latents, ``T ≥ 2``.
        text: ``(B, L, Dc)`` one prompt per sample, or ``None``.
        generator: the source of all randomness.
        generate_prob, prefix_prob: mask probabilities of :func:`sample_inpainting_mask` (the rest
            is a random clean span).
        clean_mask: ``(B, T)`` bool (True = given clean) to use instead of a random one; a sample
            without generated frames contributes nothing.
        cfg_dropout: per-sample probability of zeroing the prompt.
        t_sampler: ``"uniform"`` or ``"logit_normal"``.
        global_cond: ``(B, global_cond_dim)`` or ``None``.

    Returns:
        :class:`LossOutput` with ``per_target``/``t`` ``(B, 1)``, ``noise`` ``(B, C, T)`` and
        ``context_valid`` = the clean mask ``(B, T)``.

    Raises:
        ValueError: on a model without clean-context input channels, mis-shaped latents, mask or
            conditioning, or bad probabilities or ``t_sampler``.
    """
    _check_model(dit, latents, "latents")
    B, C, T = latents.shape
    if T < 2:
        raise ValueError(f"latents need at least 2 frames (one clean, one generated), got {T}")
    for name, p in (("generate_prob", generate_prob), ("prefix_prob", prefix_prob), ("cfg_dropout", cfg_dropout)):
        _check_probability(name, p)
    if generate_prob + prefix_prob > 1.0:
        raise ValueError(f"generate_prob + prefix_prob must be ≤ 1 (the rest is spans), got {generate_prob} + {prefix_prob}")
    if clean_mask is not None and (clean_mask.dtype != torch.bool or tuple(clean_mask.shape) != (B, T)):
        raise ValueError(f"clean_mask must be a bool (B={B}, T={T}) tensor, got {clean_mask.dtype} {tuple(clean_mask.shape)}")
    _check_conditioning(dit, B, text, global_cond)
    device, dtype = latents.device, latents.dtype

    t = sample_t((B,), generator, t_sampler, dtype).to(device)
    eps = torch.randn(B, C, T, generator=generator, device=generator.device, dtype=dtype).to(device)
    text, kept = _drop_text(text, generator, cfg_dropout)
    if clean_mask is None:
        clean_mask = sample_inpainting_mask(B, T, generator, generate_prob, prefix_prob)
    clean_mask = clean_mask.to(device)

    mask = clean_mask[:, None].to(dtype)  # (B, 1, T)
    x = objective.noise(latents, eps, t) * (1 - mask)
    out = dit(x, t, cross_attn_cond=text, global_embed=global_cond, input_concat_cond=torch.cat([latents * mask, mask], dim=1))
    generated = (~clean_mask).to(dtype)  # (B, T)
    se = (out - objective.target(latents, eps, t)).square().mean(dim=1) * generated  # (B, T)
    per_target = (se.sum(dim=1) / generated.sum(dim=1).clamp_min(1))[:, None]  # (B, 1)
    loss = se.sum() / generated.sum().clamp_min(1)
    return LossOutput(loss, per_target, t[:, None], eps, clean_mask, kept)
