"""The discrete autoregressive Live Music Model (LMM) baseline: decoder-only transformers over RVQ codes.

Both designs read the autoencoder's latents through the same :class:`~lmdm.models.rvq.ResidualVQ` (held
inside the model, frozen), so an LMM's codes decode to the latents the LMDM's autoencoder decodes, and are
text-conditioned by cross-attention to the same text encoder's tokens (K/V cached per prompt):

- ``flat`` (Magenta RealTime v1 style): every RVQ level of every frame is one sequential step. Token
  ``n = t·K + k`` is code ``c[t, k]``; the input at ``n`` is the previous token's embedding (a learned
  ``bos`` at 0) plus the embedding of level ``k``, the output the logits of ``c[t, k]``.
- ``framewise`` (Magenta RealTime 2 style): one temporal step per frame (input: the previous frame's
  codes, summed embeddings), then a small depth transformer emits the frame's ``K`` levels one after
  the other (input 0: the temporal output; input ``k``: the code of level ``k − 1``).

Self-attention is causal over a sliding window of ``window_frames`` frames (``K`` tokens each for
``flat``), the same seconds as the LMDM's window: a token sees the tokens at ``q − W < k ≤ q``.
:meth:`LMM.logits` is the teacher-forced forward (training, and the reference of the cached decode in
:mod:`lmdm.streaming.lmm_engine`); :class:`TokenStack` is a layer stack a runtime can bind, as it binds
a DiT's (:mod:`lmdm.runtime`).

Legend: B batch, C latent channels, T frames, K levels, V codes per level, N tokens (T·K flat, T
framewise), D width, Dd depth-transformer width, E code-embedding width, L text tokens, Dc text width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from lmdm.models.attention import LayerNorm, TransformerBlock
from lmdm.models.block_mask import additive_mask, sliding_window_mask
from lmdm.models.dit import DiT, TextKV, run_blocks
from lmdm.models.kv_cache import CacheIO
from lmdm.models.rotary import RotaryEmbedding, apply_rotary
from lmdm.models.rvq import ResidualVQ

__all__ = ["LMM", "LMMArgs", "LMMKind", "LayerStack", "TokenStack"]

LMMKind = Literal["flat", "framewise"]


@dataclass(frozen=True)
class LMMArgs:
    """Sizes of an :class:`LMM` (flat, typed; builders make these from config)."""

    kind: str  # "flat" or "framewise"
    latent_channels: int
    levels: int  # RVQ depth K
    codes: int  # codes per level V
    width: int
    depth: int
    window_frames: int  # attention window, in frames (the LMDM's context + block)
    head_dim: int = 64
    cond_token_dim: int = 0  # text token width; 0 = no text
    embed_dim: int = 64  # E: per-level code embeddings and output tables
    depth_width: int = 256  # framewise: the depth transformer
    depth_layers: int = 2


class TokenStack(nn.Module):
    """A stack of :class:`~lmdm.models.attention.TransformerBlock` with its rotary table (what a runtime binds)."""

    def __init__(self, width: int, depth: int, head_dim: int, context_dim: int | None) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(head_dim)
        self.blocks = nn.ModuleList([TransformerBlock(width, head_dim, context_dim) for _ in range(depth)])
        self.heads, self.head_dim = width // head_dim, head_dim

    @property
    def layers(self) -> Sequence[TransformerBlock]:
        return self.blocks  # type: ignore[return-value]

    def freqs(self, positions: Tensor) -> Tensor:
        out: Tensor = self.rotary(positions)
        return out

    def rotate(self, keys: Tensor, positions: Tensor) -> Tensor:
        """Un-rotated keys ``(..., H, S, Dh)`` rotated at ``positions`` ``(S,)``."""
        return apply_rotary(keys, self.freqs(positions))

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
        """Every block on tokens ``h`` ``(B, S, D)`` (the arguments of :meth:`lmdm.models.dit.DiT.run_layers`)."""
        return run_blocks(self.layers, h, freqs, mask, text_kv, text_mask, cache, outputs_from)


LayerStack = DiT | TokenStack  # what a runtime binds (lmdm.runtime): a layer stack with `layers` and `run_layers`


class _CodeHead(nn.Module):
    """Logits over each level's ``V`` codes: ``(…, D) → (…, E)`` shared, then one ``(V, E)`` table per level."""

    def __init__(self, width: int, levels: int, codes: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.table = nn.Parameter(torch.randn(levels, codes, embed_dim) * embed_dim**-0.5)
        self.bias = nn.Parameter(torch.zeros(levels, codes))

    def level(self, h: Tensor, k: int) -> Tensor:
        """``(B, S, D)`` → logits ``(B, S, V)`` of level ``k``."""
        return self.proj(self.norm(h)) @ self.table[k].T + self.bias[k]

    def all_levels(self, h: Tensor) -> Tensor:
        """``(B, T, K, D)`` (one hidden per level) → logits ``(B, T, K, V)``."""
        return torch.einsum("btke,kve->btkv", self.proj(self.norm(h)), self.table) + self.bias


class LMM(nn.Module):
    """A ``flat`` or ``framewise`` LMM (see the module docstring) with its frozen RVQ tokenizer ``rvq``.

    Raises:
        ValueError: an unknown kind, or sizes that do not fit (width vs head_dim, window < 1).
    """

    def __init__(self, args: LMMArgs) -> None:
        super().__init__()
        if args.kind not in ("flat", "framewise"):
            raise ValueError(f"LMM kind must be 'flat' or 'framewise', got {args.kind!r}")
        if args.window_frames < 1:
            raise ValueError(f"LMM window_frames must be >= 1, got {args.window_frames}")
        self.args = args
        K, V, E, D = args.levels, args.codes, args.embed_dim, args.width
        self.rvq = ResidualVQ(args.latent_channels, K, V)
        context_dim = D if args.cond_token_dim else None  # text tokens projected to the width (any text encoder fits)
        if args.cond_token_dim:
            self.to_cond_embed = nn.Sequential(nn.Linear(args.cond_token_dim, D, bias=False), nn.SiLU(), nn.Linear(D, D, bias=False))
        self.bos = nn.Parameter(torch.randn(D) * 0.02)
        self.codes_in = nn.Embedding(K * V, E)  # level k, code c → row k·V + c
        self.project_in = nn.Linear(E, D, bias=False)
        self.temporal = TokenStack(D, args.depth, args.head_dim, context_dim)
        if args.kind == "flat":
            self.level_in = nn.Embedding(K, D)
            self.head = _CodeHead(D, K, V, E)
        else:
            Dd = args.depth_width
            self.depth_from_temporal = nn.Linear(D, Dd, bias=False)
            self.depth_codes_in = nn.Embedding(K * V, E)
            self.depth_project_in = nn.Linear(E, Dd, bias=False)
            self.depth_position = nn.Embedding(K, Dd)
            self.depth = TokenStack(Dd, args.depth_layers, args.head_dim, None)
            self.head = _CodeHead(Dd, K, V, E)
        self.rvq.requires_grad_(False)

    def init_args(self) -> dict[str, Any]:
        return dataclasses.asdict(self.args)

    @property
    def window_tokens(self) -> int:
        """The attention window in temporal tokens (``window_frames · K`` for ``flat``)."""
        return self.args.window_frames * (self.args.levels if self.args.kind == "flat" else 1)

    def parameter_count(self) -> int:
        """Trained parameters (the RVQ's codebooks are buffers, not counted)."""
        return sum(p.numel() for p in self.parameters())

    # ---- embeddings ---------------------------------------------------------------------------

    def text_kv(self, text: Tensor) -> TextKV:
        """Per-layer cross-attention keys/values of text tokens ``(B, L, Dc)`` (cache per prompt)."""
        if not self.args.cond_token_dim:
            raise ValueError("this LMM has no text conditioning (cond_token_dim=0)")
        context = self.to_cond_embed(text)
        return [layer.cross_attn.kv(context) for layer in self.temporal.layers]

    def embed_token(self, token: Tensor, level: int) -> Tensor:
        """``flat``: code ``(B,)`` of ``level`` → input ``(B, 1, D)`` of the next token (its level embedding not added)."""
        return self.project_in(self.codes_in(token + level * self.args.codes))[:, None]

    def embed_frame(self, codes: Tensor) -> Tensor:
        """``framewise``: a frame's codes ``(B, K)`` → the next temporal input ``(B, 1, D)`` (summed level embeddings)."""
        offsets = torch.arange(self.args.levels, device=codes.device) * self.args.codes
        return self.project_in(self.codes_in(codes + offsets).sum(1))[:, None]

    def depth_input(self, code: Tensor, level: int) -> Tensor:
        """``framewise``: code ``(B,)`` of ``level`` → depth input ``(B, 1, Dd)`` at depth position ``level + 1``."""
        e = self.depth_codes_in(code + level * self.args.codes)
        return (self.depth_project_in(e) + self.depth_position.weight[level + 1])[:, None]

    # ---- the teacher-forced forward -----------------------------------------------------------

    def temporal_inputs(self, codes: Tensor) -> Tensor:
        """Inputs ``(B, N, D)`` of the temporal stack for codes ``(B, K, T)``: ``bos``, then each previous token
        (``flat``; plus the level embedding) or frame (``framewise``)."""
        B, K, T = codes.shape
        V = self.args.codes
        ids = codes + (torch.arange(K, device=codes.device) * V)[None, :, None]  # (B, K, T)
        if self.args.kind == "flat":
            previous = self.project_in(self.codes_in(rearrange(ids, "b k t -> b (t k)")[:, :-1]))
            levels = self.level_in.weight.repeat(T, 1)  # (N, D): level of each token
        else:
            previous = self.project_in(self.codes_in(rearrange(ids, "b k t -> b t k")[:, :-1]).sum(2))
            levels = torch.zeros_like(self.bos)[None]
        return torch.cat([self.bos.expand(B, 1, -1), previous], dim=1) + levels

    def temporal_hidden(
        self,
        codes: Tensor,
        text_kv: TextKV | None = None,
        text_mask: Tensor | None = None,
        start: int = 0,
        keys_values: CacheIO | None = None,
    ) -> Tensor:
        """The temporal stack's outputs ``(B, N, D)`` for codes ``(B, K, T)`` under the sliding-window causal mask.

        Args:
            text_kv, text_mask: per-layer text keys/values; ``text_mask`` ``(N, L)`` selects each token's prompt.
            start: stream position of the first token (rotary angles; the result does not depend on it).
            keys_values: a cache plan that records every token's keys/values (a starting context's prefill).

        Raises:
            ValueError: codes with another number of levels than the model's.
        """
        _B, K, _T = codes.shape
        if K != self.args.levels:
            raise ValueError(f"codes have {K} levels, this LMM {self.args.levels}")
        h = self.temporal_inputs(codes)
        N = h.shape[1]
        positions = torch.arange(start, start + N, device=codes.device)
        mask = additive_mask(sliding_window_mask(positions, positions, self.window_tokens), h.dtype)
        return self.temporal.run_layers(h, self.temporal.freqs(positions), mask, text_kv, text_mask, keys_values)

    def logits(self, codes: Tensor, text_kv: TextKV | None = None, text_mask: Tensor | None = None, start: int = 0) -> Tensor:
        """Teacher-forced logits of codes ``(B, K, T)`` (the arguments of :meth:`temporal_hidden`).

        Returns:
            ``(B, T, K, V)``: the logits of code ``c[t, k]`` given every code before it in the window.
        """
        h = self.temporal_hidden(codes, text_kv, text_mask, start)
        if self.args.kind == "flat":
            return self.head.all_levels(rearrange(h, "b (t k) d -> b t k d", k=self.args.levels))
        return self.head.all_levels(self.depth_forward(h, codes))

    def depth_forward(self, h: Tensor, codes: Tensor) -> Tensor:
        """``framewise``: temporal outputs ``(B, T, D)`` and codes ``(B, K, T)`` → depth outputs ``(B, T, K, Dd)``."""
        B, K, _T = codes.shape
        first = self.depth_from_temporal(h)[:, :, None]  # (B, T, 1, Dd)
        ids = rearrange(codes[:, :-1], "b k t -> b t k") + (torch.arange(K - 1, device=codes.device) * self.args.codes)
        rest = self.depth_project_in(self.depth_codes_in(ids))  # (B, T, K-1, Dd)
        z = torch.cat([first, rest], dim=2) + self.depth_position.weight
        z = rearrange(z, "b t k d -> (b t) k d")
        positions = torch.arange(K, device=codes.device)
        causal = additive_mask(sliding_window_mask(positions, positions, K), z.dtype)
        out = self.depth.run_layers(z, self.depth.freqs(positions), causal, None)
        return rearrange(out, "(b t) k d -> b t k d", b=B)

    def loss(self, codes: Tensor, text_kv: TextKV | None = None) -> Tensor:
        """Mean cross-entropy of every code of ``(B, K, T)`` given the codes before it (teacher forcing)."""
        logits = self.logits(codes, text_kv)
        return F.cross_entropy(rearrange(logits, "b t k v -> (b t k) v"), rearrange(codes, "b k t -> (b t k)"))
