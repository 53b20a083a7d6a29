"""``lmdm bench precompute``: latent-precompute throughput with 1 vs 2 Ray workers, in one run.

Both runs use the same inputs, the same autoencoder and the same torch threads per worker (Ray gives
each task/actor one thread by default); only the actor-pool size changes. Ray is started, and its
worker processes warmed by an untimed run, before the clock runs. The figure is chunks (of
``precompute.chunk_frames`` latent frames) per second, end to end (decode, encode, shard writing).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from lmdm.config import Config

__all__ = ["run_precompute_bench"]


def run_precompute_bench(cfg: Config, corpus_root: Path) -> dict[str, Any]:
    """Precompute ``corpus_root`` twice (actors 1 and 2) and return the figures."""
    import torch

    from lmdm.builders import build_autoencoder_from
    from lmdm.checkpoints.format import save_checkpoint
    from lmdm.pipelines.precompute import run_precompute
    from lmdm.pipelines.ray_session import ensure_ray

    ensure_ray(cfg)
    results: dict[str, Any] = {"torch_threads_per_worker": cfg.precompute.torch_threads}
    with tempfile.TemporaryDirectory(prefix="lmdm-bench-precompute-") as tmp:
        torch.manual_seed(0)
        autoencoder = save_checkpoint(Path(tmp) / "autoencoder", build_autoencoder_from(cfg))
        for workers in (2, 1, 2):  # the first run warms Ray's worker processes (imports) and is not reported
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.data.root = corpus_root
            run_cfg.precompute.actors = workers
            run_cfg.precompute.out = Path(tmp) / f"latents-{workers}-{len(results)}"
            start = time.perf_counter()
            summary = run_precompute(run_cfg, autoencoder)
            seconds = time.perf_counter() - start
            if summary.chunks == 0:
                raise ValueError(f"no chunks to encode: every input was skipped ({summary.skipped[:3]} ...); lower precompute.chunk_frames")
            results[f"workers_{workers}"] = {"chunks": summary.chunks, "seconds": seconds, "chunks_per_second": summary.chunks / seconds}
    results["precompute"] = {
        "scaling_2_vs_1": results["workers_2"]["chunks_per_second"] / results["workers_1"]["chunks_per_second"],
    }
    return results
