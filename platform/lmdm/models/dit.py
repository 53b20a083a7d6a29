"""Diffusion transformer with Stable Audio Open's layout (``models/dit.py`` + ``ContinuousTransformer``).

Parameter names follow stable-audio-tools so an imported checkpoint loads by stripping
``model.model.``: ``timestep_features``, ``to_timestep_embed``, ``to_cond_embed``,
``to_global_embed``, ``preprocess_conv``, ``postprocess_conv``, ``transformer.{project_in,
project_out, rotary_pos_emb, layers}``.

Tokens are ``[global tokens; frame tokens]``. A global token carries timestep (+ timing) and is
prepended, as Stable Audio does; here a sequence may hold several (one per packed target block).
Frame inputs are ``io_channels`` noisy latents concatenated with ``input_concat_dim`` conditioning
channels (for LMDMs: the clean context latents and a context mask — inpainting-style conditioning).

:meth:`DiT.forward` is Stable Audio's bidirectional forward (one global token at position 0, frames
at 1..T); :meth:`DiT.forward_tokens` is the general one every engine and loss builds on: explicit
rotary positions, an attention mask from :mod:`lmdm.models.block_mask`, per-token text groups, and
a :class:`~lmdm.models.kv_cache.CacheIO` plan for cached streaming passes.

Plain PyTorch that ``torch.compile`` traces whole; device-specific speed-ups live in
:mod:`lmdm.runtime` and bind to a model from outside (they replace :meth:`DiT.run_layers`' loop).

Legend: B batch, C channels, T frames, G global tokens, S = G + T tokens, D width, L text tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from lmdm.models.attention import TransformerBlock
from lmdm.models.kv_cache import CacheIO, LayerCache
from lmdm.models.rotary import RotaryEmbedding

__all__ = ["Block", "DiT", "DiTArgs", "TextKV", "run_blocks"]

TIMESTEP_FEATURES = 256

# Per layer, the text keys and values, each (B, Hkv, L, Dh).
TextKV = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class DiTArgs:
    """Sizes of a :class:`DiT` (flat, typed; builders make these from config or an SAO config)."""

    io_channels: int
    width: int
    depth: int
    head_dim: int = 64
    cond_token_dim: int = 0  # text token width; 0 = no cross-attention
    project_cond_tokens: bool = False  # Stable Audio: project text tokens to `width` first
    global_cond_dim: int = 0  # timing/global conditioning vector width; 0 = none
    input_concat_dim: int = 0  # extra input channels (clean context + mask for LMDMs)


class Block(Protocol):
    """One layer of the stack as :func:`run_blocks` calls it (a :class:`TransformerBlock`, or a runtime's own
    implementation of the same maths)."""

    def __call__(
        self,
        x: Tensor,
        freqs: Tensor,
        mask: Tensor | BlockMask | None,
        text_kv: tuple[Tensor, Tensor] | None,
        text_mask: Tensor | None,
        cache: LayerCache | None,
        outputs_from: int,
    ) -> Tensor: ...

    def keys_values(self, x: Tensor, freqs: Tensor, cache: LayerCache | None = None) -> tuple[Tensor, Tensor]: ...


def run_blocks(
    blocks: Sequence[Block],
    h: Tensor,
    freqs: Tensor,
    mask: Tensor | BlockMask | None,
    text_kv: TextKV | None,
    text_mask: Tensor | None = None,
    cache: CacheIO | None = None,
    outputs_from: int = 0,
) -> Tensor:
    """The layer loop of :meth:`DiT.run_layers` over any blocks (the arguments are documented there).

    Raises:
        ValueError: ``outputs_from`` outside ``[0, S]``.
    """
    if not 0 <= outputs_from <= h.shape[1]:
        raise ValueError(f"outputs_from must be in [0, {h.shape[1]}] for {h.shape[1]} tokens, got {outputs_from}")
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        text = text_kv[i] if text_kv is not None else None
        layer_cache = cache.layer(i) if cache is not None else None
        keep = outputs_from if i == last else 0
        if keep == h.shape[1]:  # the last layer of a keys/values-only pass
            block.keys_values(h, freqs, layer_cache)
            return h[:, keep:]
        h = block(h, freqs, mask, text, text_mask, layer_cache, keep)
    return h


class _FourierFeatures(nn.Module):
    """``f = 2π · t · Wᵀ``; features ``cat(cos f, sin f)`` (Stable Audio's FourierFeatures)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features // 2, 1))

    def forward(self, t: Tensor) -> Tensor:
        f = 2 * math.pi * t[..., None] @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)


class _Transformer(nn.Module):
    def __init__(self, args: DiTArgs, context_dim: int | None) -> None:
        super().__init__()
        self.project_in = nn.Linear(args.io_channels + args.input_concat_dim, args.width, bias=False)
        self.project_out = nn.Linear(args.width, args.io_channels, bias=False)
        self.rotary_pos_emb = RotaryEmbedding(args.head_dim)
        self.layers = nn.ModuleList([TransformerBlock(args.width, args.head_dim, context_dim) for _ in range(args.depth)])


class DiT(nn.Module):
    """The diffusion transformer. See the module docstring for the token layout."""

    def __init__(self, args: DiTArgs) -> None:
        super().__init__()
        self.args = args
        D = args.width
        self.timestep_features = _FourierFeatures(TIMESTEP_FEATURES)
        self.to_timestep_embed = nn.Sequential(nn.Linear(TIMESTEP_FEATURES, D), nn.SiLU(), nn.Linear(D, D))
        context_dim: int | None = None
        if args.cond_token_dim > 0:
            context_dim = D if args.project_cond_tokens else args.cond_token_dim
            self.to_cond_embed = nn.Sequential(
                nn.Linear(args.cond_token_dim, context_dim, bias=False), nn.SiLU(), nn.Linear(context_dim, context_dim, bias=False)
            )
        if args.global_cond_dim > 0:
            self.to_global_embed = nn.Sequential(nn.Linear(args.global_cond_dim, D, bias=False), nn.SiLU(), nn.Linear(D, D, bias=False))
        dim_in = args.io_channels + args.input_concat_dim
        self.preprocess_conv = nn.Conv1d(dim_in, dim_in, 1, bias=False)
        self.postprocess_conv = nn.Conv1d(args.io_channels, args.io_channels, 1, bias=False)
        nn.init.zeros_(self.preprocess_conv.weight)
        nn.init.zeros_(self.postprocess_conv.weight)
        self.transformer = _Transformer(args, context_dim)

    @property
    def layers(self) -> Sequence[TransformerBlock]:
        return self.transformer.layers  # type: ignore[return-value]

    # ---- embeddings -------------------------------------------------------------------------

    def global_tokens(self, t: Tensor, global_cond: Tensor | None = None) -> Tensor:
        """Global tokens from timesteps (and optional timing conditioning).

        Args:
            t: ``(B,)`` or ``(B, G)`` diffusion times.
            global_cond: ``(B, global_cond_dim)`` shared by every global token, or ``None``.

        Returns:
            ``(B, G, D)`` (``G = 1`` for ``(B,)`` input).
        """
        t = t[:, None] if t.ndim == 1 else t
        tokens: Tensor = self.to_timestep_embed(self.timestep_features(t.to(self.timestep_features.weight.dtype)))
        if global_cond is not None:
            if self.args.global_cond_dim == 0:
                raise ValueError("global_cond given, but the model has no global conditioning (global_cond_dim=0)")
            tokens = tokens + self.to_global_embed(global_cond)[:, None]
        return tokens

    def text_kv(self, text: Tensor) -> TextKV:
        """Per-layer cross-attention keys/values of text tokens ``(B, L, cond_token_dim)`` (cache per prompt)."""
        if self.args.cond_token_dim == 0:
            raise ValueError("this model has no text conditioning (cond_token_dim=0)")
        context = self.to_cond_embed(text)
        return [layer.cross_attn.kv(context) for layer in self.layers]

    def embed_frames(self, x: Tensor) -> Tensor:
        """Input channels ``(B, C_in, T)`` → frame tokens ``(B, T, D)`` (1×1 conv residual, project_in)."""
        x = self.preprocess_conv(x) + x
        h: Tensor = self.transformer.project_in(rearrange(x, "b c t -> b t c"))
        return h

    def unembed_frames(self, h: Tensor) -> Tensor:
        """Frame tokens ``(B, T, D)`` → output ``(B, io_channels, T)`` (project_out, 1×1 conv residual)."""
        out = rearrange(self.transformer.project_out(h), "b t c -> b c t")
        y: Tensor = self.postprocess_conv(out) + out
        return y

    def freqs(self, positions: Tensor) -> Tensor:
        """Rotary table (cos, sin) for token positions ``(S,)`` or ``(B, S)``: ``(2, [B,] S, R/2)``."""
        f: Tensor = self.transformer.rotary_pos_emb(positions)
        return f

    # ---- forwards -----------------------------------------------------------------------------

    def run_layers(
        self,
        h: Tensor,
        freqs: Tensor,
        mask: Tensor | BlockMask | None,
        text_kv: TextKV | None,
        text_mask: Tensor | None = None,
        cache: CacheIO | None = None,
        outputs_from: int = 0,
    ) -> Tensor:
        """Run every block on tokens ``h`` ``(B, S, D)``.

        Args:
            h: tokens ``(B, S, D)``.
            freqs: their rotary table (:meth:`freqs`).
            mask: self-attention mask (bool, True = attend, or additive float) over the keys: the tokens
                themselves, or the cache region ``cache`` reads; ``None`` = every key.
            text_kv, text_mask: per-layer text keys/values and which text keys each token sees.
            cache: where every layer writes the tokens' keys/values and what it attends over (streaming).
            outputs_from: only tokens from this index on are returned, ``(B, S − outputs_from, D)``; the last
                layer computes the earlier tokens' keys/values only (their outputs would feed no later layer).
                ``outputs_from = S``: a pass run for its keys/values (a context encoding), whose last layer
                projects keys/values and returns no tokens.

        Raises:
            ValueError: ``outputs_from`` outside ``[0, S]``.
        """
        return run_blocks(self.layers, h, freqs, mask, text_kv, text_mask, cache, outputs_from)

    def forward_tokens(
        self,
        frames: Tensor,
        frame_pos: Tensor,
        globals_: Tensor,
        global_pos: Tensor,
        mask: Tensor | BlockMask | None,
        text_kv: TextKV | None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """General forward over ``[globals; frames]``.

        Args:
            frames: ``(B, C_in, T)`` input channels of the frame tokens.
            frame_pos, global_pos: rotary positions ``(T,)`` and ``(G,)`` (or batched ``(B, ·)``).
            globals_: ``(B, G, D)`` from :meth:`global_tokens`.
            mask: ``(S, S)`` bool (True = attend), or ``(B, 1, S, S)``.
            text_kv, text_mask: see :meth:`text_kv`; ``text_mask`` ``(S, L)`` selects each token's prompt.

        Returns:
            ``(B, io_channels, T)`` outputs for the frame tokens.
        """
        G = globals_.shape[1]
        h = torch.cat([globals_, self.embed_frames(frames)], dim=1)
        freqs = self.freqs(torch.cat([global_pos, frame_pos], dim=-1))
        h = self.run_layers(h, freqs, mask, text_kv, text_mask)
        return self.unembed_frames(h[:, G:])

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        cross_attn_cond: Tensor | None = None,
        global_embed: Tensor | None = None,
        input_concat_cond: Tensor | None = None,
    ) -> Tensor:
        """Stable Audio's bidirectional forward: one global token at position 0, frames at 1..T.

        Args:
            x: ``(B, io_channels, T)`` noisy latents.
            t: ``(B,)`` times.
            cross_attn_cond: ``(B, L, cond_token_dim)`` text tokens.
            global_embed: ``(B, global_cond_dim)`` timing conditioning.
            input_concat_cond: ``(B, input_concat_dim, T)``.

        Returns:
            ``(B, io_channels, T)`` in the objective's parameterisation.
        """
        if input_concat_cond is not None:
            x = torch.cat([x, input_concat_cond], dim=1)
        elif self.args.input_concat_dim:
            raise ValueError(f"this model expects input_concat_cond with {self.args.input_concat_dim} channels")
        T = x.shape[-1]
        positions = torch.arange(T + 1, device=x.device)
        text_kv = self.text_kv(cross_attn_cond) if cross_attn_cond is not None else None
        return self.forward_tokens(x, positions[1:], self.global_tokens(t, global_embed), positions[:1], None, text_kv)
