"""Uncached forwards over whole sequences: what training computes, and the exact references of the
cached engines.

Frame inputs are ``[noisy | clean | context mask]`` (``2·C + 1`` channels for ``C`` latent
channels): a context frame is ``[0, clean, 1]``, a target frame ``[x_t, 0, 0]``. Rotary positions
are stream positions: frame ``f`` of the stream sits at ``f + 1``, and the global token of target
block ``j`` at ``(j − context_blocks) · block_frames`` — one before the first frame of its window,
exactly where Stable Audio puts its prepended token relative to the window. Only differences of
positions matter, so windows can equally be placed at fixed positions (global 0, window frames
``1 … (C+1)·Bf``): :func:`window_forward` does that.

Legend: B batch, C latent channels, Bf block frames, N history blocks, J packed targets,
Ctx context blocks, L text tokens, P prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmdm.models.block_mask import (
    CLEAN,
    GLOBAL,
    NOISY,
    TokenLayout,
    Variant,
    attention_mask,
    flex_available,
    flex_block_mask,
    text_group_mask,
)
from lmdm.models.dit import DiT, TextKV

__all__ = ["BlockGeometry", "block_causal_forward", "context_inputs", "target_inputs", "window_forward"]


@dataclass(frozen=True)
class BlockGeometry:
    """Streaming geometry: ``block_frames`` latent frames per block, ``context_blocks`` of context."""

    block_frames: int
    context_blocks: int

    @property
    def context_frames(self) -> int:
        return self.block_frames * self.context_blocks


def context_inputs(clean: Tensor) -> Tensor:
    """Clean latents ``(B, C, T)`` → context-frame inputs ``(B, 2C+1, T)`` = ``[0, clean, 1]``."""
    B, _, T = clean.shape
    return torch.cat([torch.zeros_like(clean), clean, clean.new_ones(B, 1, T)], dim=1)


def target_inputs(x_t: Tensor) -> Tensor:
    """Noisy latents ``(B, C, T)`` → target-frame inputs ``(B, 2C+1, T)`` = ``[x_t, 0, 0]``."""
    B, C, T = x_t.shape
    return torch.cat([x_t, x_t.new_zeros(B, C + 1, T)], dim=1)


def _text(dit: DiT, text: Tensor | None) -> tuple[TextKV | None, int]:
    """Text tokens ``(B, P, L, Dc)`` → per-layer K/V of all prompts concatenated, and ``L``."""
    if text is None:
        return None, 0
    B, P, L, Dc = text.shape
    return dit.text_kv(text.reshape(B, P * L, Dc)), L


def block_causal_forward(
    dit: DiT,
    geometry: BlockGeometry,
    clean: Tensor,
    noisy: Tensor,
    targets: list[int],
    t: Tensor,
    text: Tensor | None = None,
    block_prompt: Tensor | None = None,
    target_prompt: Tensor | None = None,
    context_valid: Tensor | None = None,
    global_cond: Tensor | None = None,
    flex: bool | None = None,
) -> Tensor:
    """One forward over a stream of clean history blocks and packed noisy targets (banded mask).

    Target ``j`` sees clean blocks ``j − Ctx … j − 1``, itself and its own global token; clean block
    ``b`` sees clean blocks ``b − Ctx … b``. With one target ``j = N`` this is the exact reference of
    the cached ``block_causal`` engine at block ``N``; with several it is the packed training pass.

    Args:
        clean: ``(B, C, N·Bf)`` clean history, blocks ``0 … N−1``.
        noisy: ``(B, C, J·Bf)`` noisy targets, in the order of ``targets``.
        targets: stream block index of each target (``0 ≤ j ≤ N``; ``j < N`` means the target is
            a noised copy of history block ``j``, which it does not see).
        t: ``(B, J)`` diffusion time of each target.
        text: ``(B, P, L, Dc)`` prompts; ``block_prompt`` ``(N,)`` and ``target_prompt`` ``(J,)``
            index them (each block cross-attends to the prompt it was committed under).
        context_valid: ``(B, N)`` or ``(N,)`` bool; False drops a history block (context dropout).
        global_cond: ``(B, global_cond_dim)`` timing conditioning.
        flex: run self-attention with FlexAttention over a block mask
            (:func:`~lmdm.models.block_mask.flex_block_mask`, the paper's kernel) instead of SDPA over the
            dense mask (:func:`~lmdm.models.block_mask.attention_mask`); the same predicate, equal outputs
            within float rounding. ``None``: FlexAttention off the CPU where
            :func:`~lmdm.models.block_mask.flex_available` says it runs (CUDA), the dense mask on CPU:
            torch 2.13 has no FlexAttention backward on CPU (training cannot use it there), and its eager
            CPU forward is an unfused reference that materialises the scores. Measured (torch 2.13 CPU,
            1 thread, no grad, per-sample context validity): tiny DiT (width 64, depth 3, S = 30, B = 2)
            dense 1.8 ms vs flex 41 ms in float32, 2.6 vs 42 ms in float64 (outputs equal to 3e-7 and
            3.5e-16 relative); default-size DiT (width 384, depth 4, S = 196, B = 8) float32 300 vs
            432 ms, of which ~9 ms builds the block mask. The dense default also keeps the float64
            engine-equality references bit-for-bit what they were.

    Returns:
        ``(B, C, J·Bf)`` model outputs for the targets.

    Raises:
        ValueError: history or targets that are not whole blocks; ``flex=True`` where FlexAttention
            does not run.
    """
    Bf, Ctx = geometry.block_frames, geometry.context_blocks
    B, _, T = clean.shape
    N, J = T // Bf, len(targets)
    if T != N * Bf or noisy.shape[-1] != J * Bf:
        raise ValueError(f"history ({T} frames) and targets ({noisy.shape[-1]} frames) must be whole blocks of {Bf}")
    device = clean.device
    tgt = torch.tensor(targets, dtype=torch.long, device=device)
    hist_block = torch.arange(N, device=device).repeat_interleave(Bf)
    tgt_block = tgt.repeat_interleave(Bf)
    valid_hist = torch.ones(N, dtype=torch.bool, device=device) if context_valid is None else context_valid
    valid_hist = valid_hist.repeat_interleave(Bf, dim=-1)
    ones_j = torch.ones(J, dtype=torch.bool, device=device)
    ones_t = torch.ones(J * Bf, dtype=torch.bool, device=device)
    if valid_hist.ndim == 2:
        ones_j, ones_t = ones_j.expand(B, -1), ones_t.expand(B, -1)
    layout = TokenLayout(
        kind=torch.cat([tgt.new_full((J,), GLOBAL), tgt.new_full((N * Bf,), CLEAN), tgt.new_full((J * Bf,), NOISY)]),
        block=torch.cat([tgt, hist_block, tgt_block]),
        valid=torch.cat([ones_j, valid_hist, ones_t], dim=-1),
    )
    grad = torch.is_grad_enabled() and (clean.requires_grad or noisy.requires_grad or any(p.requires_grad for p in dit.parameters()))
    if flex is None:
        flex = device.type != "cpu" and flex_available(device, clean.dtype, grad)
    elif flex and not flex_available(device, clean.dtype, grad):
        need = " with gradients" if grad else ""
        raise ValueError(f"flex=True, but FlexAttention does not run on {device} in {clean.dtype}{need} in this torch")
    mask = flex_block_mask(layout, layout, "block_causal", Ctx) if flex else attention_mask(layout, layout, "block_causal", Ctx)
    offset = torch.arange(Bf, device=device) + 1
    frame_pos = torch.cat([hist_block * Bf + offset.repeat(N), tgt_block * Bf + offset.repeat(J)])
    global_pos = (tgt - Ctx) * Bf
    frames = torch.cat([context_inputs(clean), target_inputs(noisy)], dim=-1)
    text_kv, L = _text(dit, text)
    text_mask = None
    if text is not None:
        P = text.shape[1]
        bp = torch.zeros(N, dtype=torch.long, device=device) if block_prompt is None else block_prompt
        tp = torch.zeros(J, dtype=torch.long, device=device) if target_prompt is None else target_prompt
        group = torch.cat([tp, bp.repeat_interleave(Bf), tp.repeat_interleave(Bf)])
        text_mask = text_group_mask(group, L, P)
    # forward_tokens passes the mask through to TransformerBlock, which takes a BlockMask too
    out = dit.forward_tokens(frames, frame_pos, dit.global_tokens(t, global_cond), global_pos, mask, text_kv, text_mask)
    return out[..., N * Bf :]


def window_forward(
    dit: DiT,
    variant: Variant,
    geometry: BlockGeometry,
    context: Tensor,
    x_t: Tensor,
    t: Tensor,
    text: Tensor | None = None,
    slot_prompt: Tensor | None = None,
    target_prompt: int = 0,
    context_valid: Tensor | None = None,
    global_cond: Tensor | None = None,
) -> Tensor:
    """One forward over a window of ``Ctx`` context blocks and one target block, at fixed positions.

    ``variant="full"`` is the bidirectional base / outpainting forward (context re-encoded with the
    target at every step); ``"encdec"`` is the exact reference of the cached ``encdec`` engine.

    Args:
        context: ``(B, C, Ctx·Bf)`` clean context (oldest first).
        x_t: ``(B, C, Bf)`` noisy target; t: ``(B,)``.
        text: ``(B, P, L, Dc)``; ``slot_prompt`` ``(Ctx,)`` indexes each context block's prompt.
        context_valid: ``(Ctx,)`` or ``(B, Ctx)`` bool; False = empty slot (masked out as keys).

    Returns:
        ``(B, C, Bf)`` model output for the target.
    """
    Bf, Ctx = geometry.block_frames, geometry.context_blocks
    B = x_t.shape[0]
    device = x_t.device
    slots = torch.arange(Ctx, device=device).repeat_interleave(Bf)
    valid = torch.ones(Ctx, dtype=torch.bool, device=device) if context_valid is None else context_valid
    valid = valid.repeat_interleave(Bf, dim=-1)
    one, ones_t = torch.ones(1, dtype=torch.bool, device=device), torch.ones(Bf, dtype=torch.bool, device=device)
    if valid.ndim == 2:
        one, ones_t = one.expand(B, -1), ones_t.expand(B, -1)
    layout = TokenLayout(
        kind=torch.cat([slots.new_full((1,), GLOBAL), slots.new_full((Ctx * Bf,), CLEAN), slots.new_full((Bf,), NOISY)]),
        block=torch.cat([slots.new_full((1,), Ctx), slots, slots.new_full((Bf,), Ctx)]),
        valid=torch.cat([one, valid, ones_t], dim=-1),
    )
    mask = attention_mask(layout, layout, variant, Ctx)
    positions = torch.arange((Ctx + 1) * Bf + 1, device=device)
    frames = torch.cat([context_inputs(context), target_inputs(x_t)], dim=-1)
    text_kv, L = _text(dit, text)
    text_mask = None
    if text is not None:
        sp = torch.zeros(Ctx, dtype=torch.long, device=device) if slot_prompt is None else slot_prompt
        group = torch.cat([sp.new_full((1,), target_prompt), sp.repeat_interleave(Bf), sp.new_full((Bf,), target_prompt)])
        text_mask = text_group_mask(group, L, text.shape[1])
    out = dit.forward_tokens(frames, positions[1:], dit.global_tokens(t, global_cond), positions[:1], mask, text_kv, text_mask)
    return out[..., Ctx * Bf :]
