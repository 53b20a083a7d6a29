"""``lmdm quickstart``: the whole chain on the embedded default, on local Ray with a local MLflow store.

corpus → autoencoder (Ray Train) → precompute (Ray Data) → base DiT → LMDM fine-tune → a streamed
WAV + spectrogram from the trained LMDM, and likeness figures (pitch classes, loudness, brightness)
against the corpus beside the same figures for an untrained model. One MLflow parent run, a nested
run per stage; stage wall times are printed and logged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lmdm.config import Config

__all__ = ["check_pair_fits", "precompute_into_own_folder", "pretrained_pair", "run_quickstart"]


def stream_audio(cfg: Config, dit: Any, vae: Any, text: Any, seconds: float, seed: int, variant: str = "block_causal") -> Any:
    """A stream of ``seconds`` under ``text`` tokens (or none), peak-normalised to 0.9: ``(C, S)``; ``dit`` streamed as
    ``variant`` (a block-causal LMDM, or an LMM's kind)."""
    import torch

    from lmdm.builders import build_engine
    from lmdm.streaming.engines import Condition
    from lmdm.streaming.stream import Stream

    latent_rate = cfg.audio.sample_rate / vae.downsampling_ratio
    blocks = max(1, int(-(-seconds * latent_rate // cfg.stream.block_frames)))
    stream = Stream(
        build_engine(cfg, dit.eval(), variant), vae.eval(), Condition(text, "prompt"), generator=torch.Generator().manual_seed(seed)
    )
    with torch.inference_mode():
        audio = torch.cat(list(stream.chunks(blocks)), dim=-1)[0, :, : int(seconds * cfg.audio.sample_rate)]
    peak = float(audio.abs().max())
    return (audio / max(peak, 1e-6) * 0.9).numpy()


def held_out_reference_indices(cfg: Config) -> list[int]:
    """The corpus's held-out clip indices, or a clear error where it has none (too few clips)."""
    from lmdm.data.split import SPLIT_RULE, held_out_indices

    indices = held_out_indices(cfg.data.corpus.seed, cfg.data.corpus.num_clips)
    if not indices:
        first = next(i for i in range(1 << 20) if held_out_indices(cfg.data.corpus.seed, i + 1))
        raise ValueError(
            f"corpus seed {cfg.data.corpus.seed} holds out none of its first {cfg.data.corpus.num_clips} clips "
            f"({SPLIT_RULE}), so there is no reference to score against: use data.corpus.num_clips >= {first + 1}"
        )
    return indices


def _score_streams(
    cfg: Config, trained: Any, untrained: Any, caption: str, reference: Any, reference_stats: Any, vae: Any, reference_frames: Any
) -> dict[str, Any]:
    """`lmdm score` of the trained stream (CREPE FAD with both floors; the built-in embedder's CLAP score where
    it is shipped), and the untrained stream's FAD at the same N."""
    from lmdm.checkpoints.builtin import builtin_names
    from lmdm.eval.crepe import CrepeEmbedder
    from lmdm.eval.embedders import TextAudioEmbedder, load_embedder
    from lmdm.eval.score import AudioSet, reconstructed, score_sets, training_clips

    stream = AudioSet("LMDM stream", [trained], [caption], cfg.audio.sample_rate, ["stream.wav"])
    floor = training_clips(cfg, stream.seconds)
    crepe = CrepeEmbedder()
    text = load_embedder("builtin:embedder") if "embedder" in builtin_names() else None
    assert text is None or isinstance(text, TextAudioEmbedder)
    scores = score_sets(
        stream,
        reference,
        [floor, reconstructed(floor, vae)],
        crepe,
        text,
        cfg.eval.seed,
        reference_stats,
        reference_frames=reference_frames,
    )
    baseline = AudioSet("untrained stream", [untrained], [caption], cfg.audio.sample_rate, ["stream-untrained.wav"])
    again = score_sets(baseline, reference, [], crepe, None, cfg.eval.seed, reference_frames=reference_frames, with_likeness=False)
    scores["untrained_fad"] = again["fad"]["evaluated"]  # the same N: both streams are stream_seconds long
    return scores


def pretrained_pair(spec: str) -> tuple[Path, Path]:
    """``(autoencoder, base)`` checkpoint folders of a pretrained pair: ``builtin:<name>`` (hashes verified) or
    the ``pretrained/`` folder ``lmdm pretrain`` writes.

    Raises:
        CheckpointError: an unknown built-in name, a damaged shipped file, or a folder without both parts.
    """
    from lmdm.checkpoints.builtin import PREFIX, builtin_path
    from lmdm.checkpoints.errors import CheckpointError

    if spec.startswith(PREFIX):
        return builtin_path(f"{spec}/autoencoder"), builtin_path(f"{spec}/base")
    folder = Path(spec)
    missing = [part for part in ("autoencoder", "base") if not (folder / part / "config.json").is_file()]
    if missing:
        raise CheckpointError(
            f"quickstart.base={spec}: not a pretrained pair (no {' or '.join(f'{folder / m}/config.json' for m in missing)}); "
            "give builtin:<name> or the pretrained/ folder of `lmdm pretrain`, or run --from-scratch"
        )
    return folder / "autoencoder", folder / "base"


def check_pair_fits(cfg: Config, autoencoder: Path, base: Path) -> None:
    """Before any work: the pair's base DiT is the model this config fine-tunes, and was trained on this autoencoder's
    latents (else a :class:`CheckpointError` saying which settings differ)."""
    from lmdm.builders import dit_args
    from lmdm.checkpoints.compat import check_init
    from lmdm.checkpoints.format import file_sha256, read_checkpoint_info

    check_init(
        read_checkpoint_info(base, "dit"),
        stage="lmdm",
        args=dit_args(cfg),
        objective=cfg.dit.objective,
        autoencoder=file_sha256(read_checkpoint_info(autoencoder, "autoencoder").folder / "model.safetensors"),
        text_encoder=None,
    )


def _listening_material(cfg: Config, reference: Any, vae: Any, stream: Any, path: Path) -> Path:
    """Spectrograms of the first held-out clip, of its reconstruction through the autoencoder, and of the LMDM
    stream made under that clip's caption, one above another (the README's listening material)."""
    from lmdm.eval.plots import plot_spectrograms
    from lmdm.eval.reconstruction import reconstruct

    clip, caption = reference.clips[0], str(reference.prompts[0])
    return plot_spectrograms(
        [
            (f"held-out clip {Path(reference.files[0]).stem}: {caption}", clip),
            ("its reconstruction through the autoencoder", reconstruct(vae, clip)),
            (f"LMDM stream ({stream.shape[-1] / cfg.audio.sample_rate:g} s) under that caption", stream),
        ],
        cfg.audio.sample_rate,
        f"lmdm quickstart ({cfg.name}{', from ' + cfg.quickstart.base if cfg.quickstart.base else ', from scratch'})",
        path,
    )


def precompute_into_own_folder(cfg: Config, autoencoder: Path, console: Console) -> Any:
    """``run_precompute`` into the quickstart's own latents folder; latents there from another request (an
    older format, another autoencoder) are the quickstart's own too, so they are re-encoded, not an error."""
    import shutil

    from lmdm.pipelines.precompute import PrecomputeMismatchError, run_precompute

    try:
        return run_precompute(cfg, autoencoder)  # Ray Data draws its own progress bars
    except PrecomputeMismatchError:
        console.print(f"[dim]{cfg.precompute.out} holds latents from an earlier request: encoding them again[/]")
        shutil.rmtree(cfg.precompute.out)
        return run_precompute(cfg, autoencoder)


def _train_lmm(cfg: Config, out: Path, autoencoder: Path, console: Console) -> Path:
    """The LMM baseline's two stages on the quickstart's latents: the RVQ tokenizer (``runs/<name>/rvq``, with its
    per-depth figures decoded by ``autoencoder``), then the flat LMM from scratch on its codes (``runs/<name>/lmm-flat``),
    each a nested MLflow run; returns the LMM's folder."""
    from lmdm.builders import build_dit, build_lmm
    from lmdm.checkpoints.format import copy_checkpoint, load_checkpoint
    from lmdm.eval.rvq_report import log_rvq_report, rvq_depth_figures
    from lmdm.eval.tracking import mlflow_run
    from lmdm.pipelines.progress import training_progress
    from lmdm.pipelines.train import run_train

    q = cfg.quickstart
    lmdm_params = sum(p.numel() for p in build_dit(cfg).parameters())
    lmm_params = build_lmm(cfg, "flat").parameter_count()
    console.print(
        f"parameters: LMDM {lmdm_params / 1e6:.2f}M, flat LMM {lmm_params / 1e6:.2f}M ({lmm_params / lmdm_params - 1:+.1%})", style="dim"
    )
    with mlflow_run(cfg, "rvq", nested=True, params=False) as run:
        rvq_cfg = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"steps": q.rvq_steps, "checkpoint_every": q.rvq_steps, "init": None})}
        )
        with training_progress("RVQ", console) as progress:
            rvq = run_train(rvq_cfg, "rvq", out / "latents", mlflow_run_id=run.info.run_id, progress=progress)
        assert rvq.checkpoint is not None
        tokenizer = copy_checkpoint(rvq.checkpoint / "model", out / "rvq")
        report = rvq_depth_figures(cfg, load_checkpoint(tokenizer, "rvq")[0], load_checkpoint(autoencoder)[0])
        log_rvq_report(report, run.info.run_id, cfg.tracking.tracking_uri)
    console.print(
        f"RVQ on {report['clips']} held-out clips, depths {report['depths']}: latent MSE "
        + ", ".join(f"{m:.3f}" for m in report["latent_mse"])
        + "; mel L1 "
        + ", ".join(f"{m:.1f}" for m in report["figures"]["mel_l1_db"])
        + f" dB (the autoencoder alone: {report['autoencoder']['mel_l1_db']:.1f} dB)",
        style="dim",
    )
    with mlflow_run(cfg, "lmm", nested=True, params=False) as run:
        lmm_cfg = cfg.model_copy(
            update={
                "train": cfg.train.model_copy(update={"steps": q.lmm_steps, "checkpoint_every": q.lmm_steps, "init": None}),
                "lmm": cfg.lmm.model_copy(update={"kind": "flat", "tokenizer": tokenizer.resolve()}),
            }
        )
        with training_progress("flat LMM", console) as progress:
            lmm = run_train(lmm_cfg, "lmm", out / "latents", mlflow_run_id=run.info.run_id, progress=progress)
    assert lmm.checkpoint is not None
    return copy_checkpoint(lmm.checkpoint / "model", out / "lmm-flat")


def _arc_force(cfg: Config, out: Path, autoencoder: Path, lmdm_dir: Path, console: Console) -> Path:
    """ARC-Force the quickstart's LMDM (``runs/<name>/arc``, a nested MLflow run) for ``quickstart.arc_steps`` steps,
    on latents with chunks of one ARC example (``runs/<name>/latents-arc``; the chain's own where they are long enough)."""
    from lmdm.checkpoints.format import copy_checkpoint
    from lmdm.eval.tracking import mlflow_run
    from lmdm.pipelines.arc import arc_window_frames
    from lmdm.pipelines.progress import training_progress
    from lmdm.pipelines.train import run_train

    need = arc_window_frames(cfg)
    latents = out / "latents"
    if cfg.precompute.chunk_frames < need:
        latents = out / "latents-arc"
        pre = {"out": latents, "chunk_frames": need, "max_inputs": cfg.quickstart.arc_clips}
        pre_cfg = cfg.model_copy(update={"precompute": cfg.precompute.model_copy(update=pre)})
        with mlflow_run(pre_cfg, "precompute-arc", nested=True):
            pre = precompute_into_own_folder(pre_cfg, autoencoder, console)
        console.print(
            f"ARC latents: {pre.chunks} chunks of {need} frames ({cfg.stream.context_blocks} + {cfg.arc.blocks} blocks)", style="dim"
        )
    q = cfg.quickstart
    train = cfg.train.model_copy(
        update={"steps": q.arc_steps, "checkpoint_every": q.arc_steps, "init": lmdm_dir.resolve(), "batch_size": q.arc_batch_size}
    )
    arc = cfg.arc.model_copy(update={"autoencoder": autoencoder.resolve()})
    with mlflow_run(cfg, "arc", nested=True, params=False) as run, training_progress("ARC-Forcing", console) as progress:
        result = run_train(
            cfg.model_copy(update={"train": train, "arc": arc}), "arc", latents, mlflow_run_id=run.info.run_id, progress=progress
        )
    assert result.checkpoint is not None
    return copy_checkpoint(result.checkpoint / "model", out / "arc")


def run_quickstart(cfg: Config, console: Console, build_corpus: Callable[[Config], Any]) -> dict[str, Any]:
    """Run every stage; returns the figures (also written to ``runs/<name>/quickstart.json``)."""
    import mlflow
    import torch

    from lmdm.audio.io import write_audio
    from lmdm.builders import build_dit
    from lmdm.checkpoints.format import copy_checkpoint, load_checkpoint
    from lmdm.config import EvalEngine
    from lmdm.eval.crepe import CrepeEmbedder
    from lmdm.eval.likeness import FIGURES, TIE, audio_stats, compare, likeness
    from lmdm.eval.plots import plot_clip
    from lmdm.eval.score import embed_frames, held_out_reference
    from lmdm.eval.tracking import mlflow_run
    from lmdm.pipelines.cli import eval_table, score_table
    from lmdm.pipelines.evaluate import run_eval
    from lmdm.pipelines.progress import training_progress
    from lmdm.pipelines.train import run_train
    from lmdm.text.encoders import build_text_encoder

    out = Path("runs") / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    q = cfg.quickstart

    def stage(name: str) -> float:
        console.rule(f"[bold]{name}")
        return time.perf_counter()

    with mlflow_run(cfg, "quickstart") as parent:
        start = stage("corpus")
        build_corpus(cfg)
        held_out_reference_indices(cfg)  # before any training: the chain ends by scoring against them
        times["corpus"] = time.perf_counter() - start

        if q.base is not None:  # the pretrained pair: its autoencoder encodes, its base DiT is fine-tuned
            autoencoder, pair_base = pretrained_pair(q.base)
            console.print(f"fine-tuning the pretrained pair {q.base}: autoencoder {autoencoder}, base DiT {pair_base}", style="dim")
        else:
            start = stage("autoencoder (Ray Train)")
            with mlflow_run(cfg, "autoencoder", nested=True, params=False) as run:
                ae_cfg = cfg.model_copy(
                    update={
                        "train": cfg.train.model_copy(
                            update={"steps": q.autoencoder_steps, "checkpoint_every": q.autoencoder_steps, "lr": q.autoencoder_lr}
                        )
                    }
                )
                with training_progress("autoencoder", console) as progress:
                    ae = run_train(ae_cfg, "autoencoder", None, mlflow_run_id=run.info.run_id, progress=progress)
            assert ae.checkpoint is not None
            autoencoder = copy_checkpoint(ae.checkpoint / "model", out / "autoencoder")
            times["autoencoder"] = time.perf_counter() - start

        start = stage("precompute (Ray Data)")
        pre_cfg = cfg.model_copy(update={"precompute": cfg.precompute.model_copy(update={"out": out / "latents"})})
        with mlflow_run(pre_cfg, "precompute", nested=True):  # the training stages log theirs in run_train
            pre = precompute_into_own_folder(pre_cfg, autoencoder, console)
            mlflow.log_metrics({"precompute/chunks": pre.chunks, "precompute/skipped": len(pre.skipped)})
        times["precompute"] = time.perf_counter() - start

        if q.base is not None:
            base_dir = pair_base
        else:
            start = stage("base DiT (Ray Train)")
            with mlflow_run(cfg, "base", nested=True, params=False) as run:
                base_cfg = cfg.model_copy(
                    update={"train": cfg.train.model_copy(update={"steps": q.base_steps, "checkpoint_every": q.base_steps})}
                )
                with training_progress("base DiT", console) as progress:
                    base = run_train(base_cfg, "base", out / "latents", mlflow_run_id=run.info.run_id, progress=progress)
            assert base.checkpoint is not None
            base_dir = copy_checkpoint(base.checkpoint / "model", out / "base")
            times["base"] = time.perf_counter() - start

        start = stage("LMDM fine-tune (Ray Train)")
        with mlflow_run(cfg, "lmdm", nested=True, params=False) as run:
            lm_train = cfg.train.model_copy(
                update={
                    "steps": q.lmdm_steps,
                    "checkpoint_every": q.lmdm_steps,
                    "init": base_dir.resolve(),
                    "lr": q.lmdm_lr or cfg.train.lr,
                }
            )
            with training_progress("LMDM", console) as progress:
                lm = run_train(
                    cfg.model_copy(update={"train": lm_train}), "lmdm", out / "latents", mlflow_run_id=run.info.run_id, progress=progress
                )
        assert lm.checkpoint is not None
        lmdm_dir = copy_checkpoint(lm.checkpoint / "model", out / "lmdm")
        times["lmdm"] = time.perf_counter() - start

        arc_dir: Path | None = None
        if q.arc:
            start = stage("ARC-Forcing (Ray Data precompute of longer chunks, Ray Train)")
            arc_dir = _arc_force(cfg, out, autoencoder, lmdm_dir, console)
            times["arc"] = time.perf_counter() - start

        lmm_dir: Path | None = None
        if q.lmm:
            start = stage(f"LMM baseline: RVQ tokenizer ({cfg.rvq.levels}×{cfg.rvq.codes}) and the flat LMM (Ray Train)")
            lmm_dir = _train_lmm(cfg, out, autoencoder, console)
            times["lmm"] = time.perf_counter() - start

        start = stage(f"stream {q.stream_seconds:g} s, scored against the held-out reference")
        reference = held_out_reference(cfg, cfg.eval.reference_clips, lambda what: console.print(what, style="dim"))
        caption = str(reference.prompts[0])  # a held-out clip's caption: the model never trained on its audio
        text = build_text_encoder(cfg).encode([caption]).tokens if cfg.dit.cond_token_dim else None
        vae = load_checkpoint(autoencoder)[0]
        trained = stream_audio(cfg, load_checkpoint(lmdm_dir)[0], vae, text, q.stream_seconds, cfg.train.seed)
        if lmm_dir is not None:  # the baseline, beside the LMDM: the same prompt, seed and autoencoder
            lmm_audio = stream_audio(cfg, load_checkpoint(lmm_dir)[0], vae, text, q.lmm_stream_seconds, cfg.train.seed, "flat")
            write_audio(out / "stream-lmm-flat.wav", lmm_audio, cfg.audio.sample_rate)
        torch.manual_seed(cfg.train.seed)
        untrained = stream_audio(cfg, build_dit(cfg), vae, text, q.stream_seconds, cfg.train.seed)
        wav = out / "stream.wav"
        write_audio(wav, trained, cfg.audio.sample_rate)
        write_audio(out / "stream-untrained.wav", untrained, cfg.audio.sample_rate)
        reference_stats = audio_stats(
            reference.clips[: q.likeness_clips], cfg.audio.sample_rate, cfg.data.frame_rate
        )  # pyin: the slow part
        figures = {
            "trained": likeness(audio_stats([trained], cfg.audio.sample_rate, cfg.data.frame_rate), reference_stats),
            "untrained": likeness(audio_stats([untrained], cfg.audio.sample_rate, cfg.data.frame_rate), reference_stats),
        }
        figures["verdict"] = compare(figures["trained"], figures["untrained"])
        from lmdm.audio.features import f0_pyin, loudness_db, spectral_centroid

        fr = cfg.data.frame_rate
        curves = {
            "f0_hz": f0_pyin(trained, cfg.audio.sample_rate, fr),
            "loudness_db": loudness_db(trained, cfg.audio.sample_rate, fr),
            "brightness_hz": spectral_centroid(trained, cfg.audio.sample_rate, fr),
        }
        png = plot_clip(
            trained, cfg.audio.sample_rate, fr, curves, f"LMDM stream ({q.stream_seconds:g} s), prompt: {caption}", out / "stream.png"
        )
        listening = _listening_material(cfg, reference, vae, trained, out / "listening.png")
        reference_frames = embed_frames(CrepeEmbedder(), reference)  # the stream's score and the eval's FAD share them
        scores = _score_streams(
            cfg, trained, untrained, caption, reference, reference_stats, load_checkpoint(autoencoder)[0], reference_frames
        )
        times["stream"] = time.perf_counter() - start

        evaluation: dict[str, Any] | None = None
        if q.eval:
            e = cfg.eval
            engines = [
                EvalEngine(name="outpainting", variant="outpainting", dit=str(base_dir.resolve())),
                EvalEngine(name="lmdm", variant=cfg.stream.variant, dit=str(lmdm_dir.resolve())),
            ]
            if arc_dir is not None:
                engines.append(EvalEngine(name="arc", variant=cfg.stream.variant, dit=str(arc_dir.resolve()), steps=cfg.arc.steps))
            names = " vs ".join(x.name for x in engines)
            start = stage(f"eval: {names}, {e.rollouts} rollouts of {e.rollout_seconds:g} s each (Ray actors)")
            eval_cfg = cfg.model_copy(update={"eval": e.model_copy(update={"engines": engines, "autoencoder": str(autoencoder.resolve())})})
            crepe_frames = reference_frames if e.fad_embedder in ("crepe", "crepe-tiny") else None
            shared_stats = (
                reference_stats if q.likeness_clips == e.likeness_clips and cfg.data.frame_rate == 50 else None
            )  # audio_stats at 50 Hz
            evaluation = run_eval(eval_cfg, console, nested=True, reference=(reference, crepe_frames, shared_stats))
            times["eval"] = time.perf_counter() - start
        result = {
            "base": q.base,
            "times_s": times,
            "likeness": figures,
            "fad": {
                "embedder": scores["fad"]["embedder"],
                "frames": scores["fad"]["frames"],
                "stream": scores["fad"]["evaluated"],
                "untrained": scores["untrained_fad"],
                "floor_training": scores["fad"]["floor_training"],
                "floor_reconstructed": scores["fad"]["floor_reconstructed"],
            },
            "clap": scores.get("clap"),
            "score": scores,
            "reference": {
                "clips": len(reference.clips),
                "likeness_clips": min(q.likeness_clips, len(reference.clips)),
                "seconds": reference.seconds,
                "split_rule": scores["reference"]["split_rule"],
                **reference_stats.__dict__,
            },
            "caption": caption,
            "wav": str(wav),
            "lmm_wav": str(out / "stream-lmm-flat.wav") if lmm_dir is not None else None,
            "png": str(png),
            "listening_png": str(listening),
            "eval": None
            if evaluation is None
            else {
                "report": evaluation["report"],
                "mlflow_link": evaluation["mlflow_link"],
                "engines": {
                    name: {
                        "speed": f["speed"],
                        "drift": {
                            m: {
                                k: d[k]
                                for k in (
                                    "curve",
                                    "last_over_first",
                                    "last_over_first_ci",
                                    "last_minus_first",
                                    "last_minus_first_ci",
                                    "verdict",
                                )
                            }
                            for m, d in f["drift"].items()
                        },
                    }
                    for name, f in evaluation["engines"].items()
                },
            },
        }
        (out / "quickstart.json").write_text(json.dumps(result, indent=2))
        mlflow.log_artifact(str(wav), "stream")
        mlflow.log_artifact(str(png), "stream")
        mlflow.log_artifact(str(out / "quickstart.json"))
        mlflow.log_metrics({f"time/{k}": v for k, v in times.items()})
        for who in ("trained", "untrained"):
            mlflow.log_metrics({f"likeness/{who}/{k}": v for k, v in figures[who].items() if isinstance(v, float)})
        mlflow.log_metric("likeness/trained_closer_figures", len(figures["verdict"]["closer"]))
        mlflow.log_metrics({f"fad/{k}": v for k, v in result["fad"].items() if isinstance(v, float)})
        result["mlflow_run_id"] = parent.info.run_id
    console.print(score_table(scores))
    table = Table(title=f"likeness to the held-out reference ({len(reference.clips)} clips; lower is closer)")
    table.add_column("figure")
    table.add_column("trained LMDM", justify="right")
    table.add_column("untrained", justify="right")
    table.add_column("closer", justify="center")
    verdict = figures["verdict"]
    for key in FIGURES:
        mark = "trained" if key in verdict["closer"] else "untrained" if key in verdict["farther"] else "tie"
        table.add_row(key, f"{figures['trained'][key]:.3f}", f"{figures['untrained'][key]:.3f}", mark)
    table.caption = (
        f"trained closer on {len(verdict['closer'])} of {len(FIGURES)} figures, untrained on {len(verdict['farther'])}, "
        f"{len(verdict['tied'])} tied (within {TIE:.0%})"
    )
    console.print(table)
    timing = Table(title="wall time per stage")
    timing.add_column("stage")
    timing.add_column("seconds", justify="right")
    for key, value in times.items():
        timing.add_row(key, f"{value:.1f}")
    timing.add_row("total", f"{sum(times.values()):.1f}")
    console.print(timing)
    if evaluation is not None:
        console.print(eval_table(evaluation))
    console.print(f"stream: {wav} · spectrogram: {png}")
    if evaluation is not None:
        console.print(f"eval report: {evaluation['report']['html']} · MLflow charts (after `mlflow ui`): {evaluation['mlflow_link']}")
    return result
