"""How well the LMM baseline's RVQ tokenizer keeps what the autoencoder's latents hold, depth by depth.

For held-out clips: the latents' MSE after the first ``k`` levels, and the audio decoded from them
(``autoencoder.decode(rvq.decode(rvq.encode(latents, k)))``) scored against the clip with the
reconstruction figures of :mod:`lmdm.eval.reconstruction` (mel L1, pitch-class accuracy, voicing, loudness
and brightness errors), beside the autoencoder's own reconstruction (no quantisation: the ceiling). Logged
to MLflow with ``step`` = depth, so each figure is a curve over depth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lmdm.config import Config
from lmdm.eval.reconstruction import FIGURE_KEYS, reconstruction_figures

__all__ = ["log_rvq_report", "report_depths", "rvq_depth_figures"]


def report_depths(levels: int) -> list[int]:
    """The depths reported: powers of two up to ``levels``, and ``levels`` itself."""
    depths = [d for d in (1, 2, 4, 8, 16, 32, 64) if d < levels]
    return [*depths, levels]


@torch.inference_mode()
def rvq_depth_figures(
    cfg: Config, rvq: Any, vae: Any, clips: int = 2, seconds: float = 4.0, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Per reported depth, the latent MSE and the decoded audio's reconstruction figures (means over ``clips``
    held-out clips of ``seconds``), and the autoencoder's own figures.

    Returns:
        ``{"depths": [k...], "latent_mse": [...], "figures": {figure: [...]}, "autoencoder": {figure: value},
        "clips": n, "clip_seconds": s}``.
    """
    from lmdm.eval.score import held_out_reference

    reference = held_out_reference(cfg, clips, progress)
    n = int(seconds * cfg.audio.sample_rate)
    ratio = int(vae.downsampling_ratio)
    depths = report_depths(rvq.levels)
    per_depth: list[list[dict[str, float]]] = [[] for _ in depths]
    mse: list[list[float]] = [[] for _ in depths]
    own: list[dict[str, float]] = []
    for clip in reference.clips[:clips]:
        original = clip[:, :n]
        x = torch.nn.functional.pad(torch.from_numpy(np.ascontiguousarray(original, dtype=np.float32))[None], (0, -n % ratio))
        latents = vae.encode(x).mean  # (1, C, T)
        own.append(reconstruction_figures(original, vae.decode(latents)[0, :, :n].numpy(), cfg.audio.sample_rate, cfg.data.frame_rate))
        for i, k in enumerate(depths):
            quantised = rvq.decode(rvq.encode(latents, k)).to(latents.dtype)
            mse[i].append(float((quantised - latents).pow(2).mean()))
            audio = vae.decode(quantised)[0, :, :n].numpy()
            per_depth[i].append(reconstruction_figures(original, audio, cfg.audio.sample_rate, cfg.data.frame_rate))
    mean = lambda rows, key: float(np.nanmean([r[key] for r in rows]))  # noqa: E731
    return {
        "depths": depths,
        "latent_mse": [float(np.mean(m)) for m in mse],
        "figures": {key: [mean(rows, key) for rows in per_depth] for key in FIGURE_KEYS},
        "autoencoder": {key: mean(own, key) for key in FIGURE_KEYS},
        "clips": min(clips, len(reference.clips)),
        "clip_seconds": seconds,
    }


def log_rvq_report(report: dict[str, Any], run_id: str, tracking_uri: str) -> None:
    """``rvq/latent_mse`` and ``rvq/<figure>`` with ``step`` = depth, and ``rvq/autoencoder/<figure>``, in one batch."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    stamp = int(time.time() * 1000)
    metrics = [Metric("rvq/latent_mse", v, stamp, k) for k, v in zip(report["depths"], report["latent_mse"], strict=True)]
    for key, values in report["figures"].items():
        metrics += [Metric(f"rvq/{key}", v, stamp, k) for k, v in zip(report["depths"], values, strict=True) if v == v]
    metrics += [Metric(f"rvq/autoencoder/{key}", v, stamp, 0) for key, v in report["autoencoder"].items() if v == v]
    MlflowClient(tracking_uri=tracking_uri).log_batch(run_id, metrics=metrics)
