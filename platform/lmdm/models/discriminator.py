"""ARC-Forcing's discriminator (DESIGN §5): a copy of the base DiT cut at a middle layer, with a small
ConvNeXt-style head on that layer's hidden states.

It reads one window of ``Ctx`` real context blocks and ``K`` continuation blocks, bidirectionally: the
context as clean context frames ``[0, clean, 1]`` (the LMDM's own conditioning), the continuation noised
to ``x_t`` as target frames ``[x_t, 0, 0]``, the global token carrying ``t``, every token cross-attending
to the prompt. The head scores each continuation frame; a window's score is their mean, so real and
generated continuations of the same context are compared over the continuation only.

The copy keeps the layers it runs (the first ``layer``) and the embeddings; the output projection and the
later layers are dropped, since no score depends on them (DDP would otherwise wait for their gradients).

Legend: B batch, C latent channels, Kc context frames, T continuation frames, D width, L text tokens.
"""

from __future__ import annotations

import copy

import torch
from einops import rearrange
from torch import Tensor, nn

from lmdm.models.dit import DiT
from lmdm.streaming.sequences import context_inputs, target_inputs

__all__ = ["ConvNeXtHead", "Discriminator"]


class ConvNeXtHead(nn.Module):
    """Hidden states ``(B, T, D)`` → one score per frame ``(B, T)``: a ConvNeXt block (depthwise conv along
    time, LayerNorm, an inverted-bottleneck MLP, residual), then a LayerNorm and a linear read-out."""

    def __init__(self, width: int, hidden: int, kernel: int = 7) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"the head's kernel must be odd (a centred window), got {kernel}")
        self.dwconv = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 1)

    def forward(self, h: Tensor) -> Tensor:
        x = rearrange(self.dwconv(rearrange(h, "b t d -> b d t")), "b d t -> b t d")
        h = h + self.mlp(self.norm(x))
        score: Tensor = self.out(self.out_norm(h))
        return score[..., 0]


class Discriminator(nn.Module):
    """Scores ``[real context | noised continuation]`` windows under a prompt (higher = more real).

    Args:
        dit: the base DiT to copy (an LMDM: ``input_concat_dim = io_channels + 1``); it is not modified.
        layer: how many of its layers run; their output feeds the head (``1 … depth``).
        head_width: the head's MLP width.
        head_kernel: the head's depthwise kernel (frames, odd).

    Raises:
        ValueError: a layer outside ``1 … depth``, or a DiT without context inputs.
    """

    def __init__(self, dit: DiT, layer: int, head_width: int = 256, head_kernel: int = 7) -> None:
        super().__init__()
        depth = len(dit.layers)
        if not 1 <= layer <= depth:
            raise ValueError(f"arc.disc_layer must be in 1 … {depth} (the base DiT's depth), got {layer}")
        if dit.args.input_concat_dim != dit.args.io_channels + 1:
            raise ValueError(
                "the discriminator reads [context | continuation] as an LMDM does: it needs an LMDM's DiT (input_concat_dim = io_channels + 1)"
            )
        self.layer = layer
        self.dit = copy.deepcopy(dit)
        self.dit.transformer.layers = nn.ModuleList(list(self.dit.transformer.layers)[:layer])
        self.dit.transformer.project_out = None  # type: ignore[assignment]
        self.dit.postprocess_conv = None  # type: ignore[assignment]
        self.dit.requires_grad_(True)
        if dit.args.global_cond_dim:
            self.dit.to_global_embed.requires_grad_(False)  # no timing conditioning is fed
        self.head = ConvNeXtHead(dit.args.width, head_width, head_kernel)

    def frame_scores(self, context: Tensor, x_t: Tensor, t: Tensor, text: Tensor | None) -> Tensor:
        """Per-frame scores ``(B, T)`` of the noised continuation ``x_t`` ``(B, C, T)`` at ``t`` ``(B,)`` after
        the clean ``context`` ``(B, C, Kc)``, under ``text`` ``(B, L, Dc)`` (``None``: no prompt)."""
        Kc = context.shape[-1]
        frames = torch.cat([context_inputs(context), target_inputs(x_t)], dim=-1)
        positions = torch.arange(frames.shape[-1] + 1, device=frames.device)
        text_kv = self.dit.text_kv(text) if text is not None else None
        h = torch.cat([self.dit.global_tokens(t), self.dit.embed_frames(frames)], dim=1)
        h = self.dit.run_layers(h, self.dit.freqs(positions), None, text_kv)
        scores: Tensor = self.head(h[:, 1 + Kc :])
        return scores

    def forward(self, context: Tensor, x_t: Tensor, t: Tensor, text: Tensor | None) -> Tensor:
        """One score per window ``(B,)``: the mean of :meth:`frame_scores` over the continuation."""
        return self.frame_scores(context, x_t, t, text).mean(dim=-1)
