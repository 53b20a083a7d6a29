"""Residual vector quantisation (RVQ) of autoencoder latents: the tokenizer of the LMM baseline.

Level ``k`` quantises what levels ``0..k-1`` left over (the residual) to the nearest of its ``V`` codes;
the latent is the sum of the chosen codes. LMM and LMDM therefore share one autoencoder: an LMM's codes
decode to latents, and the autoencoder decodes those to audio.

Training (``lmdm train --stage rvq``) has no gradients: codebooks are exponential moving averages of the
residuals assigned to each code (:meth:`ResidualVQ.update`), initialised by k-means on the first batch,
with codes that fall out of use (EMA count below ``dead_threshold``) restarted on residuals from the
current batch. Statistics are summed over workers through a ``reduce`` callable (an all-reduce), so every
worker holds the same codebooks.

Legend: B batch, C latent channels, T frames, N vectors (B·T), K levels, V codes per level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

__all__ = ["ResidualVQ", "kmeans"]

Reduce = Callable[[Tensor], Tensor]  # sums a tensor over workers (identity on one)
Broadcast = Callable[[Tensor], Tensor]  # the tensor as worker 0 holds it


def _same(x: Tensor) -> Tensor:
    return x


def _nearest(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Index ``(N,)`` of the nearest code ``(V, C)`` to each vector ``(N, C)`` (squared Euclidean)."""
    distance = codebook.pow(2).sum(1)[None] - 2 * vectors @ codebook.T  # |v|² is the same for every code
    return distance.argmin(1)


def kmeans(vectors: Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> Tensor:
    """``k`` centroids ``(k, C)`` of ``vectors`` ``(N, C)`` by Lloyd's algorithm from ``k`` random vectors (drawn
    with replacement when ``N < k``; duplicates stay until a dead-code restart moves them)."""
    N = vectors.shape[0]
    pick = (
        torch.randperm(N, generator=generator, device=vectors.device)[:k]
        if N >= k
        else torch.randint(0, N, (k,), generator=generator, device=vectors.device)
    )
    centroids = vectors[pick].clone()
    for _ in range(iters):
        assign = _nearest(vectors, centroids)
        counts = torch.bincount(assign, minlength=k).to(vectors.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, vectors)
        used = counts > 0
        centroids[used] = sums[used] / counts[used, None]
    return centroids


class ResidualVQ(nn.Module):
    """``levels`` codebooks of ``codes`` vectors of ``dim`` channels (buffers, not parameters).

    Args:
        dim: latent channels ``C``.
        levels: depth ``K``.
        codes: codes per level ``V``.
        decay: EMA decay of the codebook statistics.
        dead_threshold: a code whose EMA count (assignments per batch, smoothed) falls below this is restarted.
        kmeans_iters: Lloyd iterations of the initialisation.
    """

    codebooks: Tensor  # (K, V, C)
    ema_count: Tensor  # (K, V)
    ema_sum: Tensor  # (K, V, C)
    initialised: Tensor  # () bool

    def __init__(
        self, dim: int, levels: int = 16, codes: int = 1024, decay: float = 0.99, dead_threshold: float = 0.5, kmeans_iters: int = 10
    ) -> None:
        super().__init__()
        if levels < 1 or codes < 2 or dim < 1:
            raise ValueError(f"an RVQ needs dim >= 1, levels >= 1 and codes >= 2; got dim={dim}, levels={levels}, codes={codes}")
        self.dim, self.levels, self.codes = dim, levels, codes
        self.decay, self.dead_threshold, self.kmeans_iters = decay, dead_threshold, kmeans_iters
        self.register_buffer("codebooks", torch.zeros(levels, codes, dim))
        self.register_buffer("ema_count", torch.ones(levels, codes))
        self.register_buffer("ema_sum", torch.zeros(levels, codes, dim))
        self.register_buffer("initialised", torch.tensor(False))

    def init_args(self) -> dict[str, Any]:
        return {"dim": self.dim, "levels": self.levels, "codes": self.codes, "decay": self.decay,
                "dead_threshold": self.dead_threshold, "kmeans_iters": self.kmeans_iters}  # fmt: skip

    # ---- inference ----------------------------------------------------------------------------

    def _check(self, latents: Tensor) -> None:
        if latents.ndim != 3 or latents.shape[1] != self.dim:
            raise ValueError(f"RVQ latents must be (batch, {self.dim}, frames), got {tuple(latents.shape)}")

    def encode(self, latents: Tensor, levels: int | None = None) -> Tensor:
        """Codes ``(B, K', T)`` of latents ``(B, C, T)`` from the first ``levels`` levels (default all)."""
        self._check(latents)
        B, _, T = latents.shape
        residual = rearrange(latents, "b c t -> (b t) c").to(self.codebooks.dtype)
        codes = []
        for k in range(levels or self.levels):
            index = _nearest(residual, self.codebooks[k])
            residual = residual - self.codebooks[k][index]
            codes.append(index)
        return rearrange(torch.stack(codes, 1), "(b t) k -> b k t", b=B, t=T)

    def decode(self, codes: Tensor) -> Tensor:
        """Latents ``(B, C, T)``: the sum of each level's code for codes ``(B, K', T)``, ``K' <= K``.

        Raises:
            ValueError: codes of another shape, or more levels than the RVQ has.
        """
        if codes.ndim != 3 or codes.shape[1] > self.levels:
            raise ValueError(f"RVQ codes must be (batch, <= {self.levels} levels, frames), got {tuple(codes.shape)}")
        K = codes.shape[1]
        vectors = self.codebooks[torch.arange(K, device=codes.device)[None, :, None], codes]  # (B, K', T, C)
        return rearrange(vectors.sum(1), "b t c -> b c t")

    def depth_errors(self, latents: Tensor) -> Tensor:
        """Mean squared error ``(K,)`` of the reconstruction from the first ``k + 1`` levels, per ``k``."""
        self._check(latents)
        residual = rearrange(latents, "b c t -> (b t) c").to(self.codebooks.dtype)
        errors = []
        for k in range(self.levels):
            residual = residual - self.codebooks[k][_nearest(residual, self.codebooks[k])]
            errors.append(residual.pow(2).mean())
        return torch.stack(errors)

    # ---- training -----------------------------------------------------------------------------

    @torch.no_grad()
    def update(
        self, latents: Tensor, generator: torch.Generator | None = None, reduce: Reduce = _same, broadcast: Broadcast = _same
    ) -> dict[str, float]:
        """One training step on latents ``(B, C, T)``: k-means initialisation (first call), EMA codebook
        update, dead-code restarts; every level on the residual the levels before it leave.

        Args:
            generator: draws the k-means seeds and the restarted codes' residuals.
            reduce: sums a tensor over workers (counts and sums of the EMA statistics).
            broadcast: worker 0's copy of a tensor (the initial codebooks and restarted codes, so every
                worker keeps the same codebooks).

        Returns:
            ``{"mse": latent MSE after every level (this update's codebooks), "restarted": codes restarted,
            "used": share of codes chosen at least once in this batch, over levels}``.
        """
        self._check(latents)
        residual = rearrange(latents, "b c t -> (b t) c").to(self.codebooks.dtype)
        fresh = not bool(self.initialised)
        restarted, used = 0, 0.0
        for k in range(self.levels):
            if fresh:
                self.codebooks[k] = broadcast(kmeans(residual, self.codes, self.kmeans_iters, generator))
                self.ema_sum[k] = self.codebooks[k] * self.ema_count[k][:, None]
            index = _nearest(residual, self.codebooks[k])
            counts = reduce(torch.bincount(index, minlength=self.codes).to(residual.dtype))
            sums = reduce(torch.zeros_like(self.codebooks[k]).index_add_(0, index, residual))
            used += float((counts > 0).float().mean())
            self.ema_count[k].lerp_(counts, 1 - self.decay)
            self.ema_sum[k].lerp_(sums, 1 - self.decay)
            n = self.ema_count[k].sum()
            smoothed = (self.ema_count[k] + 1e-5) / (n + self.codes * 1e-5) * n  # Laplace smoothing: no division by 0
            self.codebooks[k] = self.ema_sum[k] / smoothed[:, None]
            restarted += self._restart_dead(k, residual, generator, broadcast)
            residual = residual - self.codebooks[k][_nearest(residual, self.codebooks[k])]
        self.initialised.fill_(True)
        squared = reduce(torch.stack([residual.pow(2).sum(), torch.tensor(float(residual.numel()), device=residual.device)]))
        return {"mse": float(squared[0] / squared[1]), "restarted": float(restarted), "used": used / self.levels}

    def _restart_dead(self, k: int, residual: Tensor, generator: torch.Generator | None, broadcast: Broadcast) -> int:
        """Move level ``k``'s codes with an EMA count below ``dead_threshold`` onto random residuals of the batch."""
        dead = self.ema_count[k] < self.dead_threshold
        n = int(dead.sum())
        if n == 0:
            return 0
        pick = torch.randint(0, residual.shape[0], (n,), generator=generator, device=residual.device)
        vectors = broadcast(residual[pick].clone())
        self.codebooks[k][dead] = vectors
        self.ema_sum[k][dead] = vectors
        self.ema_count[k][dead] = 1.0
        return n
