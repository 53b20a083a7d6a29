"""``lmdm bench train``: DDP vs DeepSpeed ZeRO-2 on the same stage, data and workers, in one run.

Each strategy trains the ``base`` stage for ``train.steps`` steps with ``train.workers`` Ray Train
workers. Figures: samples/s (global, after the first step), and per worker the bytes of parameters,
gradients and optimizer state measured from the tensors themselves
(:func:`lmdm.pipelines.train.training_state_bytes`). ZeRO-2 partitions optimizer state and gradients
over the N workers, so its optimizer-state bytes per worker are expected near 1/N of DDP's; its
parameters grow by the fp32 master partition (1/N) the ZeRO optimizer steps.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from lmdm.config import Config

__all__ = ["run_train_bench"]


def run_train_bench(cfg: Config, latents: Path) -> dict[str, Any]:
    """Train ``base`` with DDP and with ZeRO-2 on ``latents``; return the figures (also the ratios)."""
    from lmdm.pipelines.train import run_train

    results: dict[str, Any] = {"workers": cfg.train.workers, "steps": cfg.train.steps, "batch_size_per_worker": cfg.train.batch_size}
    with tempfile.TemporaryDirectory(prefix="lmdm-bench-train-") as tmp:
        for strategy in ("ddp", "deepspeed"):
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.train.strategy, run_cfg.train.zero_stage = strategy, 2
            run_cfg.train.storage_path = Path(tmp) / strategy
            run_cfg.train.checkpoint_every = run_cfg.train.steps  # one checkpoint, at the end
            out = run_train(run_cfg, "base", latents, measure=True)
            per_worker = out.metrics["state_bytes_per_worker"]
            worst = max(per_worker, key=lambda w: w["total"])
            results["ddp" if strategy == "ddp" else "zero2"] = {
                "engine": out.metrics["engine"],
                "samples_per_s": out.metrics["samples_per_s"],
                "final_loss": out.metrics["train/loss"],
                "state_bytes_per_worker": per_worker,
                "worst_worker": worst,  # the worker with the most training state
                "max_optimizer_bytes": max(w["optimizer"] for w in per_worker),
                "max_total_bytes": worst["total"],
            }
    ddp, zero2 = results["ddp"], results["zero2"]
    results["train"] = {
        # Optimizer state (the optimizer's own tensors): about 1/N expected with N workers.
        "zero2_vs_ddp_state_memory_ratio": zero2["max_optimizer_bytes"] / ddp["max_optimizer_bytes"],
        # Parameters + gradients + optimizer state.
        "zero2_vs_ddp_total_state_ratio": zero2["max_total_bytes"] / ddp["max_total_bytes"],
        "zero2_vs_ddp_samples_per_s_ratio": zero2["samples_per_s"] / ddp["samples_per_s"],
        "expected_optimizer_ratio": 1 / cfg.train.workers,
    }
    return results
