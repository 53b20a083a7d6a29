"""Quality metrics that accumulate: FAD and CLAP score as ``torchmetrics.Metric`` subclasses.

Both keep float64 sums, never the embeddings themselves, in the shape torchmetrics' own FID takes
(``sum`` and ``outer-product`` states reduced with ``"sum"``): rollout actors on several processes
update their own copy and ``compute()`` gathers the sums, so the result equals one pass over all the
rows. The plain functions (:func:`lmdm.eval.fad.frechet_distance`, :func:`clap_scores`,
:func:`per_clip_fad`) are what the metrics call.

Legend: N embedding rows (audio frames or clips), D embedding width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from lmdm.eval.fad import distance_from_stats, gaussian_stats

__all__ = ["ClapScore", "FrechetAudioDistance", "clap_scores", "per_clip_fad"]


def _stats_from_sums(total: Tensor, outer: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance from a row sum ``(D,)``, the sum of outer products ``(D, D)`` and N."""
    n = float(count)
    mean = total / n
    return mean, (outer - n * torch.outer(mean, mean)) / (n - 1)


class FrechetAudioDistance(Metric):
    """FAD between the rows given as ``real`` (the reference) and the others, accumulated in float64.

    ``update(embeddings, real)`` takes ``(N, D)`` rows; ``compute()`` returns the distance as a 0-d
    float64 tensor. ``reset_real_features=False`` keeps the reference across ``reset()``, as
    torchmetrics' FID does, so one reference serves many evaluated sets.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    real_sum: Tensor
    real_outer: Tensor
    real_count: Tensor
    fake_sum: Tensor
    fake_outer: Tensor
    fake_count: Tensor

    def __init__(self, dim: int, reset_real_features: bool = True, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if dim < 1:
            raise ValueError(f"embedding width must be >= 1, got {dim}")
        self.dim = dim
        self.reset_real_features = reset_real_features
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, embeddings: Tensor, real: bool) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"expected (N, {self.dim}) embeddings, got shape {tuple(embeddings.shape)}")
        rows = embeddings.detach().to(self.real_sum.device, torch.float64)
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + rows.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + rows.T @ rows)
        setattr(self, f"{side}_count", getattr(self, f"{side}_count") + rows.shape[0])

    def compute(self) -> Tensor:
        if int(self.real_count) < 2 or int(self.fake_count) < 2:
            raise RuntimeError(
                f"FAD needs at least 2 rows on each side, got {int(self.real_count)} reference and "
                f"{int(self.fake_count)} evaluated rows: call update() with real=True and real=False first"
            )
        mu_r, sigma_r = _stats_from_sums(self.real_sum, self.real_outer, self.real_count)
        mu_f, sigma_f = _stats_from_sums(self.fake_sum, self.fake_outer, self.fake_count)
        return torch.tensor(distance_from_stats(mu_f, sigma_f, mu_r, sigma_r), dtype=torch.float64)

    def reset(self) -> None:
        if self.reset_real_features:
            super().reset()
            return
        kept = (self.real_sum, self.real_outer, self.real_count)
        super().reset()
        self.real_sum, self.real_outer, self.real_count = kept


def per_clip_fad(clips: Sequence[Tensor], reference: Tensor) -> list[float]:
    """FAD of each clip's frames ``(N_i, D)`` against the whole reference ``(M, D)`` (fadtk's per-song FAD):
    which clips of a set are least like the reference.

    Raises:
        ValueError: a clip with fewer than 2 frames, or another width.
    """
    mu_r, sigma_r = gaussian_stats(reference)
    scores = []
    for i, clip in enumerate(clips):
        if clip.ndim != 2 or clip.shape[1] != reference.shape[1] or clip.shape[0] < 2:
            raise ValueError(f"clip {i}: expected (N >= 2, {reference.shape[1]}) frames, got shape {tuple(clip.shape)}")
        mu, sigma = gaussian_stats(clip)
        scores.append(distance_from_stats(mu, sigma, mu_r, sigma_r))
    return scores


def clap_scores(audio: Tensor, text: Tensor) -> Tensor:
    """Cosine similarity of each audio embedding ``(B, D)`` to its prompt's ``(B, D)`` (or one prompt's ``(D,)``),
    float64 ``(B,)``: the CLAP score of each clip."""
    if text.ndim == 1:
        text = text.expand_as(audio)
    if audio.shape != text.shape or audio.ndim != 2:
        raise ValueError(f"expected (B, D) audio and text embeddings of one shape, got {tuple(audio.shape)} and {tuple(text.shape)}")
    return torch.nn.functional.cosine_similarity(audio.double(), text.double(), dim=-1)


class ClapScore(Metric):
    """The mean audio–prompt cosine (:func:`clap_scores`) over every clip given, accumulated in float64."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    total: Tensor
    count: Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, audio: Tensor, text: Tensor) -> None:
        scores = clap_scores(audio.detach(), text.detach()).to(self.total.device)
        self.total = self.total + scores.sum()
        self.count = self.count + scores.numel()

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            raise RuntimeError("CLAP score of no clips: call update() first")
        return self.total / self.count
