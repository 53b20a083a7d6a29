"""``lmdm eval``: long rollouts of every engine on a Ray actor pool, drift per stream position, MLflow and a report.

Engines (``eval.engines``, or the quickstart's base as outpainting and its LMDM): each gets
``eval.rollouts`` rollouts of ``eval.rollout_seconds``, rollout r under held-out caption r (in turn) from
seed ``eval.seed + r``, the same for every engine. Rollouts run on ``eval.actors`` Ray actors (one model
copy each; an actor that dies is restarted and its rollout retried); each finished rollout is kept under
``<eval.out>/rollouts/<engine>/<r>/`` and never redone (:mod:`lmdm.eval.rollouts`).

Then, per engine and window: FAD against the held-out reference (window w's frames pooled over the
rollouts), CLAP score, likeness distances; drift summaries with bootstrap intervals over rollouts
(:mod:`lmdm.eval.drift`); speed from the rollouts' own block timings. MLflow gets a parent run ``eval``
and a child run per engine with the same metric keys: ``by_window/<metric>`` stepped by window index (the
UI's first chart section), ``drift/<metric>.<summary>``, ``speed/<figure>``;
``<eval.out>/report.html`` and ``report.md`` show it on one page (:mod:`lmdm.eval.report`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from lmdm.config import Config, EvalEngine

__all__ = ["EVAL_ACTOR_PREFIX", "default_engines", "eval_folder", "experiment_link", "run_eval"]

EVAL_ACTOR_PREFIX = "lmdm-eval-rollout"


def eval_folder(cfg: Config) -> Path:
    return Path(cfg.eval.out) if cfg.eval.out is not None else Path("runs") / cfg.name / "eval"


def default_engines(cfg: Config) -> tuple[list[EvalEngine], Path]:
    """``eval.engines`` and ``eval.autoencoder`` resolved (built-in names verified), or, where none is given, the
    quickstart's: its pretrained pair's base DiT (or its own) as outpainting and its trained LMDM, with the
    autoencoder the LMDM learned.

    Raises:
        CheckpointError, ValueError: an engine folder that is missing, or no engine at all.
    """
    from lmdm.checkpoints.builtin import resolve_checkpoint
    from lmdm.checkpoints.errors import CheckpointError
    from lmdm.pipelines.generate import default_checkpoints

    lmdm_dir, quickstart_ae = default_checkpoints(cfg)
    engines = [e.model_copy(update={"dit": str(resolve_checkpoint(e.dit))}) for e in cfg.eval.engines]
    if not engines:
        root = Path("runs") / cfg.name
        base: Path | None = root / "base" if (root / "base" / "config.json").is_file() else None
        if base is None and cfg.quickstart.base is not None:
            from lmdm.pipelines.quickstart import pretrained_pair

            base = pretrained_pair(cfg.quickstart.base)[1]
        if base is not None:
            engines.append(EvalEngine(name="outpainting", variant="outpainting", dit=str(base)))
        if lmdm_dir is not None:
            engines.append(EvalEngine(name="lmdm", variant=cfg.stream.variant, dit=str(lmdm_dir)))
        if (root / "arc" / "config.json").is_file():  # the quickstart's ARC-Forced LMDM, at its own steps
            engines.append(EvalEngine(name="arc", variant=cfg.stream.variant, dit=str(root / "arc"), steps=cfg.arc.steps))
        for kind in ("flat", "framewise"):  # the LMM baselines the quickstart (or `lmdm train --stage lmm`) left there
            lmm = root / f"lmm-{kind}"
            if (lmm / "config.json").is_file():
                engines.append(EvalEngine(name=f"lmm-{kind}", variant=kind, dit=str(lmm)))
        if lmdm_dir is None:
            raise ValueError(
                f"no engine to evaluate: runs/{cfg.name}/lmdm does not exist. Run `lmdm quickstart` first, "
                "or name engines: --engine NAME=VARIANT:CHECKPOINT (or eval.engines in the config)"
            )
    for e in engines:
        if not (Path(e.dit) / "config.json").is_file():
            raise CheckpointError(f"engine {e.name}: {e.dit} is not a checkpoint folder (no config.json)")
    autoencoder = resolve_checkpoint(cfg.eval.autoencoder) if cfg.eval.autoencoder else quickstart_ae
    if autoencoder is None:
        raise ValueError(
            "no autoencoder to decode the rollouts: give --autoencoder (eval.autoencoder), the one the DiTs' latents came from"
        )
    return engines, Path(autoencoder)


def _check_engines(cfg: Config, engines: list[EvalEngine], autoencoder: Path) -> None:
    """Before any rollout: each DiT streams with its variant, this geometry, this autoencoder and text encoder
    (:func:`lmdm.checkpoints.compat.check_streaming`), and makes latents of the autoencoder's width."""
    from lmdm.checkpoints.compat import check_lmm_streaming, check_streaming
    from lmdm.checkpoints.errors import CheckpointError
    from lmdm.checkpoints.format import read_checkpoint_info
    from lmdm.text.encoders import build_text_encoder

    ae = read_checkpoint_info(autoencoder, "autoencoder")
    text = build_text_encoder(cfg).fingerprint() if cfg.dit.cond_token_dim else None
    for engine in engines:
        if engine.variant in ("flat", "framewise"):
            try:
                check_lmm_streaming(
                    read_checkpoint_info(Path(engine.dit)), kind=engine.variant, latent_channels=int(ae.args.get("latent_dim", 0)),
                    autoencoder=_sha256(autoencoder / "model.safetensors"), text_encoder=text,
                )  # fmt: skip
            except CheckpointError as exc:
                raise CheckpointError(f"engine {engine.name}: {exc}") from None
            continue
        info = read_checkpoint_info(Path(engine.dit), "dit")
        s = cfg.stream
        try:
            check_streaming(
                info,
                variant=engine.variant,
                block_frames=s.block_frames,
                context_blocks=s.context_blocks,
                objective=cfg.dit.objective,
                autoencoder=_sha256(autoencoder / "model.safetensors"),
                text_encoder=text,
            )
        except CheckpointError as exc:
            raise CheckpointError(f"engine {engine.name}: {exc}") from None
        channels, latent = info.args.get("io_channels"), ae.args.get("latent_dim")
        if channels is not None and latent is not None and channels != latent:
            raise ValueError(
                f"engine {engine.name}: {engine.dit} makes {channels}-channel latents, the autoencoder {autoencoder} decodes {latent}"
            )


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: Path, mtime_ns: int, size: int) -> str:  # a file rewritten in place is hashed again
    from lmdm.checkpoints.format import file_sha256

    return file_sha256(path)


def _fingerprint(cfg: Config, engine: EvalEngine, autoencoder: Path, prompt: str | None, seed: int) -> str:
    what = {
        "variant": engine.variant,
        "dit": _sha256(Path(engine.dit) / "model.safetensors"),
        "autoencoder": _sha256(autoencoder / "model.safetensors"),
        "stream": {**cfg.stream.model_dump(mode="json", exclude={"runtime", "variant"}), "steps": engine.steps or cfg.stream.steps},
        "audio": cfg.audio.model_dump(mode="json"),
        "text": cfg.text.model_dump(mode="json"),
        "prompt": prompt,
        "seed": seed,
        "seconds": cfg.eval.rollout_seconds,
        "measures": cfg.eval.model_dump(mode="json", include={"window_seconds", "fad_embedder", "text_embedder"}),
        "frame_rate": cfg.data.frame_rate,
    }
    if engine.variant in ("flat", "framewise"):  # how an LMM samples its codes
        what["sampling"] = cfg.lmm.model_dump(mode="json", include={"temperature", "top_k"})
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _tasks(cfg: Config, engines: list[EvalEngine], autoencoder: Path, captions: list[str | None], out: Path) -> list[Any]:
    from lmdm.eval.rollouts import RolloutTask

    tasks = []
    for engine in engines:
        for r in range(cfg.eval.rollouts):
            prompt, seed = captions[r % len(captions)], cfg.eval.seed + r
            tasks.append(
                RolloutTask(
                    engine.name,
                    engine.variant,
                    str(Path(engine.dit).resolve()),
                    str(autoencoder.resolve()),
                    r,
                    prompt,
                    seed,
                    cfg.eval.rollout_seconds,
                    str((out / "rollouts" / engine.name / f"{r:03d}").resolve()),
                    _fingerprint(cfg, engine, autoencoder, prompt, seed),
                    engine.steps,
                )
            )
    return tasks


class _RolloutActor:
    """A Ray actor around :class:`~lmdm.eval.rollouts.RolloutRunner` (one engine's models at a time)."""

    def __init__(self, cfg_json: str, threads: int, name: str) -> None:
        from lmdm.eval.rollouts import RolloutRunner

        self.runner, self.name = RolloutRunner(Config.model_validate_json(cfg_json), threads), name

    def run(self, task: Any) -> Any:
        return self.runner.run(task, self.name)  # the driver writes it: on a cluster this node's disk is not the driver's


def _reference(cfg: Config, out: Path, console: Console, given: tuple[Any, Any, Any] | None) -> tuple[Any, torch.Tensor, Any]:
    """The held-out reference, its FAD frames and its likeness statistics, cached in ``out/reference/`` (keyed by
    its clips and the embedder); ``given``: the reference, and its frames and statistics (each ``None`` where the
    caller has not computed them)."""
    from lmdm.eval.embedders import load_embedder
    from lmdm.eval.likeness import AudioStats, audio_stats
    from lmdm.eval.score import embed_frames, held_out_reference

    reference = (
        given[0] if given is not None else held_out_reference(cfg, cfg.eval.reference_clips, lambda s: console.print(s, style="dim"))
    )
    key = {
        "files": reference.files,
        "embedder": cfg.eval.fad_embedder,
        "likeness_clips": cfg.eval.likeness_clips,
        "frame_rate": cfg.data.frame_rate,
        "sample_rate": cfg.audio.sample_rate,
    }
    folder = out / "reference"
    if (folder / "key.json").is_file() and json.loads((folder / "key.json").read_text()) == key:
        from safetensors.torch import load_file

        frames = load_file(str(folder / "frames.safetensors"))["frames"].double()
        stats = AudioStats(**json.loads((folder / "stats.json").read_text()))
        return reference, frames, stats
    frames, stats = (given[1], given[2]) if given is not None else (None, None)
    if frames is None:
        console.print(f"embedding the held-out reference ({len(reference.clips)} clips, {cfg.eval.fad_embedder})", style="dim")
        frames = embed_frames(load_embedder(cfg.eval.fad_embedder), reference)
    if stats is None:
        console.print(f"likeness statistics of {min(cfg.eval.likeness_clips, len(reference.clips))} reference clips (pyin)", style="dim")
        stats = audio_stats(reference.clips[: cfg.eval.likeness_clips], cfg.audio.sample_rate, cfg.data.frame_rate)
    from dataclasses import asdict

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.json").unlink(missing_ok=True)  # written last: a cache half rewritten is no cache
    save_file({"frames": frames.float().contiguous()}, str(folder / "frames.safetensors"))
    (folder / "stats.json").write_text(json.dumps(asdict(stats)))
    (folder / "key.json").write_text(json.dumps(key))
    return reference, frames, stats


def _run_rollouts(cfg: Config, pending: list[Any], console: Console, on_rollout: Callable[[dict[str, Any]], None] | None) -> int:
    """Run ``pending`` tasks on the actor pool, writing each rollout as it arrives; returns how many ran.

    Actors are named ``lmdm-eval-rollout-<run token>-<i>`` (a record says which ran it)."""
    import uuid

    import ray
    from ray.util import ActorPool

    from lmdm.eval.rollouts import write_rollout
    from lmdm.pipelines.ray_session import ensure_ray

    if not pending:
        return 0
    ensure_ray(cfg)
    actor_cls = ray.remote(num_cpus=cfg.eval.cpus_per_actor, max_restarts=2, max_task_retries=2)(_RolloutActor)
    count = min(cfg.eval.actors, len(pending))
    token = uuid.uuid4().hex[:8]
    names = [f"{EVAL_ACTOR_PREFIX}-{token}-{i}" for i in range(count)]
    actors = [
        actor_cls.options(name=name).remote(cfg.model_dump_json(), cfg.eval.torch_threads, name)  # type: ignore[attr-defined]
        for name in names
    ]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done = 0
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task(f"rollouts on {count} actor(s)", total=len(pending))
            for output in ActorPool(actors).map_unordered(lambda actor, t: actor.run.remote(t), pending):
                record = write_rollout(output, cfg.audio.sample_rate)
                done += 1
                bar.update(task, completed=done, description=f"rollouts ({record['engine']} #{record['index']} done)")
                if on_rollout is not None:
                    on_rollout(record)
    finally:
        for actor in actors:
            ray.kill(actor)
    return done


def _speed(records: list[dict[str, Any]]) -> dict[str, Any]:
    from lmdm.eval.bench_stream import quantiles
    from lmdm.eval.report import SPEED_WARMUP_BLOCKS

    dit = [s for r in records for s in r["dit_s"][SPEED_WARMUP_BLOCKS:]] or [s for r in records for s in r["dit_s"]]
    decode = [s for r in records for s in r["decode_s"][SPEED_WARMUP_BLOCKS:]] or [s for r in records for s in r["decode_s"]]
    block = [a + b for a, b in zip(dit, decode, strict=True)]
    q = quantiles(block)
    block_seconds = records[0]["block_seconds"]
    runtimes = sorted({f"{r['runtime']} · {r['torch_threads']}" for r in records})
    return {
        "ms_per_block": 1000 * q["median_s"],
        "ms_per_block_p90": 1000 * q["p90_s"],
        "dit_ms_per_block": 1000 * statistics.median(dit),
        "decode_ms_per_block": 1000 * statistics.median(decode),
        "rtf": block_seconds / q["median_s"],
        "block_seconds": block_seconds,
        "blocks_timed": len(block),
        "runtime": ", ".join(runtimes),  # "<runtime> · <torch threads>" of every run that made these rollouts
    }


def _engine_figures(cfg: Config, records: list[dict[str, Any]], ref_frames: torch.Tensor, ref_stats: Any) -> dict[str, Any]:
    """Drift of every metric, and speed, for one engine's rollouts (sorted by index)."""
    from lmdm.eval.drift import PooledFad, drift, mean_metric
    from lmdm.eval.likeness import FIGURES, AudioStats, likeness
    from lmdm.eval.rollouts import load_window_frames

    R, W = len(records), min(r["windows"] for r in records)
    e = cfg.eval
    frames = [load_window_frames(Path(r["folder"]))[:W] for r in records]
    curves = {"fad": drift("fad", PooledFad(frames, ref_frames), R, W, e.window_seconds, "higher", e.bootstrap, e.seed)}
    clap = np.array([r["clap"][:W] for r in records], dtype=np.float64)
    if np.isfinite(clap).any():
        curves["clap"] = drift("clap", mean_metric(clap), R, W, e.window_seconds, "lower", e.bootstrap, e.seed)
    figures = [[likeness(AudioStats(**s), ref_stats) for s in r["stats"][:W]] for r in records]
    for name in FIGURES:
        values = np.array([[f[name] for f in row] for row in figures], dtype=np.float64)
        curves[name] = drift(name, mean_metric(values), R, W, e.window_seconds, "higher", e.bootstrap, e.seed)
    return {"drift": {k: v.to_dict() for k, v in curves.items()}, "speed": _speed(records), "rollouts": R, "windows": W}


def experiment_link(cfg: Config, parent_run_id: str) -> str:
    """The MLflow UI page of this eval's engine runs as charts (``mlflow ui`` on its default port).

    The pinned MLflow opens its empty GenAI view otherwise: ``workflowType`` picks the model-training one and
    ``compareRunsMode`` its charts; the filter keeps this eval's engine runs; sorting by name (not by date) makes
    the UI list them flat, where nested under their collapsed parent they would draw no chart.
    """
    import urllib.parse

    import mlflow

    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment or cfg.name)
    assert experiment is not None
    query = urllib.parse.urlencode(
        {
            "workflowType": "machine_learning",
            "compareRunsMode": "CHART",
            "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            "orderByKey": "tags.`mlflow.runName`",
            "orderByAsc": "true",
        },
        quote_via=urllib.parse.quote,
    )
    return f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?{query}"


def _log_mlflow(cfg: Config, result: dict[str, Any], out: Path, nested: bool) -> str:
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from lmdm.eval.tracking import flatten, mlflow_run

    with mlflow_run(cfg, "eval", nested=nested) as parent:
        mlflow.set_tag("lmdm.kind", "eval")
        for name, figures in result["engines"].items():
            with mlflow.start_run(run_name=f"eval/{name}", nested=True) as child:
                mlflow.set_tag("lmdm.kind", "eval-engine")
                engine = result["engine_specs"][name]
                mlflow.log_params(flatten({"engine": engine, **cfg.model_dump(mode="json")}))
                now = int(time.time() * 1000)
                curves = [
                    Metric(f"by_window/{metric}", value, now, w)
                    for metric, d in figures["drift"].items()
                    for w, value in enumerate(d["curve"])
                    if np.isfinite(value)
                ]
                for start in range(0, len(curves), 1000):  # MLflow's cap per batch
                    MlflowClient().log_batch(child.info.run_id, metrics=curves[start : start + 1000])
                for metric, d in figures["drift"].items():
                    summary = {
                        "slope_per_minute": d["slope_per_minute"],
                        "last_over_first": d["last_over_first"],
                        "last_over_first_ci_low": d["last_over_first_ci"][0],
                        "last_over_first_ci_high": d["last_over_first_ci"][1],
                        "last_minus_first": d["last_minus_first"],
                        "last_minus_first_ci_low": d["last_minus_first_ci"][0],
                        "last_minus_first_ci_high": d["last_minus_first_ci"][1],
                        "first_window_outside": -1 if d["first_window_outside"] is None else d["first_window_outside"],
                        "drifts": float(d["verdict"] == "drifts"),
                    }
                    mlflow.log_metrics({f"drift/{metric}.{k}": v for k, v in summary.items() if np.isfinite(v)})
                speed = figures["speed"]
                mlflow.log_metrics({f"speed/{k}": v for k, v in speed.items() if isinstance(v, float | int)})
                for label in ("first", "last"):
                    wav = out / "samples" / f"{name}-{label}.wav"
                    if wav.is_file():
                        mlflow.log_artifact(str(wav), "audio")
        for path in [out / "report.html", out / "report.md", out / "eval.json", *sorted((out / "plots").glob("*.png"))]:
            if path.is_file():
                mlflow.log_artifact(str(path), "report" if path.suffix != ".png" else "plots")
        run_id: str = parent.info.run_id
    return run_id


def run_eval(
    cfg: Config,
    console: Console,
    *,
    nested: bool = False,
    reference: tuple[Any, Any, Any] | None = None,
    on_rollout: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the evaluation (see the module docstring); returns its figures (also ``<eval.out>/eval.json``).

    Args:
        nested: log the MLflow runs under the active run (the quickstart's).
        reference: the held-out reference, its FAD frames and its likeness statistics where the caller has them
            (``None`` for either part it has not).
        on_rollout: called with each rollout's record as it finishes.

    Raises:
        CheckpointError, ValueError: engines or an autoencoder that cannot be used (before any rollout).
    """
    from lmdm.eval.report import write_report
    from lmdm.eval.rollouts import finished_rollout

    started = time.perf_counter()
    out = eval_folder(cfg)
    engines, autoencoder = default_engines(cfg)
    _check_engines(cfg, engines, autoencoder)
    ref_set, ref_frames, ref_stats = _reference(cfg, out, console, reference)
    captions: list[str | None] = list(ref_set.prompts) if cfg.dit.cond_token_dim else [None]
    tasks = _tasks(cfg, engines, autoencoder, captions, out)
    pending = [t for t in tasks if finished_rollout(Path(t.folder), t.fingerprint) is None]
    console.print(
        f"{len(engines)} engine(s) × {cfg.eval.rollouts} rollout(s) of {cfg.eval.rollout_seconds:g} s: "
        f"{len(tasks) - len(pending)} finished earlier, {len(pending)} to run · {out}",
        style="dim",
    )
    ran = _run_rollouts(cfg, pending, console, on_rollout)
    records: dict[str, list[dict[str, Any]]] = {e.name: [] for e in engines}
    for t in tasks:
        record = finished_rollout(Path(t.folder), t.fingerprint)
        if record is None:
            raise RuntimeError(f"rollout {t.index} of {t.engine} did not finish (no {t.folder}/rollout.json): rerun `lmdm eval` to resume")
        records[t.engine].append(record)
    console.print("drift: bootstrap over rollouts", style="dim")
    result: dict[str, Any] = {
        "config": cfg.name,
        "out": str(out),
        "autoencoder": str(autoencoder),
        "engine_specs": {e.name: e.model_dump(mode="json") for e in engines},
        "reference": {"clips": len(ref_set.clips), "seconds": round(ref_set.seconds, 2), "frames": int(ref_frames.shape[0])},
        "eval": cfg.eval.model_dump(mode="json", exclude={"engines"}),
        "engines": {name: _engine_figures(cfg, rs, ref_frames, ref_stats) for name, rs in records.items()},
        "rollouts_run": ran,
        "rollouts_reused": len(tasks) - ran,
    }
    _write_samples(cfg, records, out)
    result["seconds"] = time.perf_counter() - started
    (out / "eval.json").write_text(json.dumps(result, indent=2, default=str))
    paths = write_report(result, cfg, out)
    result["report"] = {k: str(v) for k, v in paths.items()}
    result["mlflow_run_id"] = _log_mlflow(cfg, result, out, nested)
    result["mlflow_link"] = experiment_link(cfg, result["mlflow_run_id"])
    (out / "eval.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _write_samples(cfg: Config, records: dict[str, list[dict[str, Any]]], out: Path) -> None:
    """The first and the last window of each engine's rollout 0, as WAVs (report players, MLflow artifacts)."""
    from lmdm.audio.io import load_audio, write_audio

    sr, n = cfg.audio.sample_rate, round(cfg.eval.window_seconds * cfg.audio.sample_rate)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for name, rs in records.items():
        audio = load_audio(Path(rs[0]["folder"]) / "audio.wav", sr, cfg.audio.channels)
        last = min(r["windows"] for r in rs) - 1
        write_audio(out / "samples" / f"{name}-first.wav", audio[:, :n], sr)
        write_audio(out / "samples" / f"{name}-last.wav", audio[:, last * n : (last + 1) * n], sr)
