"""The ``lmdm`` command line.

Every command takes a config (``--config``: a YAML path or a shipped config name, default
``quickstart``) and ``a.b=value`` overrides, validated before any work starts.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

import lmdm
from lmdm.config import Config, ConfigError, dump_config, load_config

if TYPE_CHECKING:
    from lmdm.data.corpus import CorpusSummary
    from lmdm.data.readers import ReadReport

app = typer.Typer(
    name="lmdm",
    help="Live Music Diffusion Models: build data, train, evaluate and serve streaming music generators.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
data_app = typer.Typer(help="Build the built-in corpus, inspect user audio.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: print figures and ratios measured in one run.", no_args_is_help=True)


class _DefaultRunGroup(TyperGroup):
    """A command group whose ``run`` command is the default: ``lmdm eval --engine ...`` is ``lmdm eval run --engine ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # only options and overrides go to `run`: a misspelt command name stays a "no such command" error
        if not args or (args[0] not in ("--help", "-h") and (args[0].startswith("-") or "=" in args[0])):
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=_DefaultRunGroup,
    help="Long-stream evaluation (`lmdm eval`, the same as `lmdm eval run`), and evaluations of embedders and autoencoders.",
)
app.add_typer(config_app, name="config")
app.add_typer(eval_app, name="eval")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

ConfigOption = Annotated[str, typer.Option("--config", "-c", help="YAML config path or shipped config name.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="KEY=VALUE overrides, e.g. data.corpus.num_clips=50", show_default=False)]


def _load(config: str, overrides: list[str] | None) -> Config:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        raise typer.Exit(2) from None


@config_app.command("show")
def config_show(
    config: Annotated[str, typer.Argument(help="YAML config path or shipped config name.")],
    overrides: Overrides = None,
) -> None:
    """Print the validated, resolved config (defaults filled in, overrides applied) as YAML."""
    cfg = _load(config, overrides)
    console.print(dump_config(cfg), end="", highlight=False, markup=False)


def _progress_bar(description: str):  # type: ignore[no-untyped-def]
    from lmdm.pipelines.progress import progress_bar

    return progress_bar(description, console)


def _build_corpus(cfg: Config, force: bool) -> CorpusSummary:
    from lmdm.data.corpus import CorpusExistsError, build_corpus

    with _progress_bar("rendering corpus") as bar:
        task = bar.add_task("corpus", total=cfg.data.corpus.num_clips)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            return build_corpus(cfg.data.root, cfg.data.corpus, cfg.audio, cfg.data.frame_rate, force=force, progress=progress)
        except CorpusExistsError as exc:
            err_console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(1) from None


def _corpus_table(summary: CorpusSummary) -> Table:
    from lmdm.data.corpus import read_corpus_metadata

    rows = read_corpus_metadata(summary.root)
    table = Table(title=f"built-in corpus: {summary.root}", show_header=True)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("clips", str(summary.num_clips))
    table.add_row("audio", f"{summary.seconds / 60:.1f} min ({rows[0]['sample_rate']} Hz, {rows[0]['channels']} ch)")
    table.add_row("build time", "reused (already built)" if summary.reused else f"{summary.build_seconds:.1f} s")
    sources = collections.Counter(r["piece_id"].split("/")[0] for r in rows)
    table.add_row("sources", ", ".join(f"{k} {v}" for k, v in sources.most_common()))
    table.add_row("distinct pieces", str(len({r["piece_id"] for r in rows})))
    ensembles = collections.Counter("solo" if r["solo"] else r["ensemble"] for r in rows)
    table.add_row("ensembles", ", ".join(f"{k} {v}" for k, v in ensembles.most_common()))
    tempi = [r["tempo_bpm"] for r in rows]
    table.add_row("tempo", f"{min(tempi)}–{max(tempi)} BPM")
    table.add_row("keys", str(len({r["key"] for r in rows})))
    table.add_row("example caption", rows[0]["caption"])
    return table


@data_app.command("build")
def data_build(
    config: ConfigOption = "quickstart",
    force: Annotated[bool, typer.Option(help="Rebuild even if the folder holds a corpus with other settings.")] = False,
    overrides: Overrides = None,
) -> None:
    """Render the built-in corpus (music21 scores through a General MIDI SoundFont) to data.root."""
    cfg = _load(config, overrides)
    summary = _build_corpus(cfg, force)
    console.print(_corpus_table(summary))


def _report_table(report: ReadReport, title: str) -> Table:
    table = Table(title=title)
    table.add_column("input", overflow="fold")
    table.add_column("skipped because", overflow="fold")
    for item in report.skipped:
        table.add_row(item.source, item.reason)
    return table


@data_app.command("scan")
def data_scan(
    path: Annotated[Path, typer.Argument(help="Audio folder, or a `datasets` dataset saved to disk (--hf).")],
    captions: Annotated[Path | None, typer.Option(help="CSV or JSONL captions file for a folder.")] = None,
    hf: Annotated[bool, typer.Option("--hf", help="PATH is a dataset saved with datasets' save_to_disk.")] = False,
    config: ConfigOption = "quickstart",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
) -> None:
    """Read user audio as training would, and report what is usable and what is not (and why)."""
    from lmdm.data.readers import CaptionsError, ReadReport, iter_audio_folder, iter_hf_dataset

    cfg = _load(config, [])
    report = ReadReport()
    try:
        if hf:
            clips = iter_hf_dataset(path, cfg.audio.sample_rate, cfg.audio.channels, report, min_seconds=cfg.data.min_seconds)
        else:
            clips = iter_audio_folder(path, cfg.audio.sample_rate, cfg.audio.channels, report, captions, cfg.data.min_seconds)
        for _ in clips:
            pass
    except (FileNotFoundError, KeyError, CaptionsError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(
        f"read {report.read} clips ({report.seconds:.1f} s); {len(report.uncaptioned)} without caption; {len(report.skipped)} skipped"
    )
    if report.skipped:
        console.print(_report_table(report, f"skipped inputs under {path}"))
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))


@app.command()
def quickstart(
    config: ConfigOption = "quickstart",
    quick: Annotated[bool, typer.Option("--quick", help="The few-minute profile (configs/quick.yaml); CI runs it.")] = False,
    force: Annotated[bool, typer.Option(help="Rebuild the corpus even if one with other settings exists.")] = False,
    from_scratch: Annotated[
        bool, typer.Option("--from-scratch", help="Train every model in the run (autoencoder and base too) instead of quickstart.base.")
    ] = False,
    overrides: Overrides = None,
) -> None:
    """Run the whole chain on the embedded default: corpus → precompute with the pretrained autoencoder → LMDM fine-tune
    of the pretrained base → a 30-s stream (WAV + spectrogram) scored (FAD, likeness) against the held-out reference,
    beside an untrained model. --from-scratch trains the autoencoder and base DiT in the run too."""
    from lmdm.eval.tracking import ui_command
    from lmdm.pipelines.quickstart import check_pair_fits, held_out_reference_indices, pretrained_pair, run_quickstart

    started = time.perf_counter()
    cfg = _load("quick" if quick else config, overrides)
    if from_scratch:
        cfg.quickstart.base = None
    try:
        held_out_reference_indices(cfg)
        if cfg.quickstart.base is not None:
            check_pair_fits(cfg, *pretrained_pair(cfg.quickstart.base))
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    console.rule(f"[bold]lmdm quickstart[/] · config {cfg.name}")

    def corpus(c: Config) -> CorpusSummary:  # the chain's corpus stage: built (or reused) once, then summarised
        summary = _build_corpus(c, force)
        console.print(_corpus_table(summary))
        return summary

    run_quickstart(cfg, console, corpus)
    console.print(f"done in {time.perf_counter() - started:.1f} s · MLflow: {ui_command(cfg)}")


@app.command()
def pretrain(
    config: ConfigOption = "corpus-base",
    force: Annotated[bool, typer.Option(help="Rebuild the corpus even if one with other settings exists.")] = False,
    overrides: Overrides = None,
) -> None:
    """Pretrain the corpus base: corpus → autoencoder → reconstruction figures → precompute → bidirectional base DiT,
    written with a model card to runs/<name>/pretrained (rerun with more steps to continue; `lmdm ship --pair` ships it)."""
    from lmdm.checkpoints.errors import CheckpointError
    from lmdm.eval.tracking import ui_command
    from lmdm.pipelines.pretrain import run_pretrain
    from lmdm.pipelines.quickstart import held_out_reference_indices

    started = time.perf_counter()
    cfg = _load(config, overrides)
    try:
        held_out_reference_indices(cfg)
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    console.rule(f"[bold]lmdm pretrain[/] · config {cfg.name}")

    def corpus(c: Config) -> CorpusSummary:
        summary = _build_corpus(c, force)
        console.print(_corpus_table(summary))
        return summary

    try:
        run_pretrain(cfg, console, corpus, " ".join(["lmdm pretrain --config", config, *(overrides or [])]))
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    console.print(f"done in {time.perf_counter() - started:.1f} s · MLflow: {ui_command(cfg)}")


@app.command()
def precompute(
    autoencoder: Annotated[
        Path, typer.Option("--autoencoder", help="Autoencoder checkpoint folder (our format), or builtin:NAME/autoencoder.")
    ],
    config: ConfigOption = "quickstart",
    overrides: Overrides = None,
) -> None:
    """Encode the configured data into latent shards with Ray Data (resumable; see precompute.out)."""
    from lmdm.checkpoints.builtin import resolve_checkpoint
    from lmdm.checkpoints.errors import CheckpointError
    from lmdm.pipelines.precompute import PrecomputeMismatchError, run_precompute

    cfg = _load(config, overrides)
    said: list[int] = []

    def say_inputs_to_encode(done: int, total: int) -> None:  # once, before encoding: what earlier runs left
        if not said:
            said.append(done)
            console.print(f"precompute: {total - done} of {total} inputs to encode ({done} in shards already written)", style="dim")

    try:  # Ray Data draws its own progress bars (one per operator) on a terminal
        summary = run_precompute(cfg, resolve_checkpoint(autoencoder), progress=say_inputs_to_encode)
    except (PrecomputeMismatchError, CheckpointError, FileNotFoundError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    console.print(
        f"{summary.out}: {summary.inputs} inputs → {summary.chunks} chunks in {summary.seconds:.1f} s "
        f"({summary.shards_written} shards written, {summary.shards_reused} reused); {len(summary.skipped)} skipped"
    )
    for item in summary.skipped:
        console.print(f"  skipped {item['input_id']}: {item['reason']}")


@app.command()
def train(
    stage: Annotated[str, typer.Option("--stage", help="autoencoder | base | lmdm | embedder | rvq | lmm | arc (also `lmdm arc`).")],
    latents: Annotated[Path | None, typer.Option("--latents", help="Output folder of `lmdm precompute` (base, lmdm, rvq, lmm).")] = None,
    autoencoder: Annotated[
        str | None, typer.Option("--autoencoder", help="rvq: the latents' autoencoder; decoded figures per depth go to MLflow.")
    ] = None,
    config: ConfigOption = "quickstart",
    overrides: Overrides = None,
) -> None:
    """Train a stage with Ray Train + Accelerate (strategy ddp or deepspeed), logging to MLflow."""
    import mlflow

    from lmdm.eval.tracking import mlflow_run, ui_command
    from lmdm.pipelines.progress import training_progress
    from lmdm.pipelines.train import run_train

    cfg = _load(config, overrides)
    # Which code runs matters on a cluster (the job's wheel, or an image's older install): say it.
    console.print(f"lmdm {lmdm.__version__} imported from {Path(lmdm.__file__).parent}", style="dim", soft_wrap=True)
    with mlflow_run(cfg, "train"), mlflow_run(cfg, stage, nested=True, params=False) as run:
        try:
            with training_progress(f"training {stage}", console) as progress:
                result = run_train(cfg, stage, latents, mlflow_run_id=run.info.run_id, progress=progress)
        except (ValueError, FileNotFoundError) as exc:
            err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(1) from None
        if result.checkpoint is not None:
            mlflow.log_artifacts(str(result.checkpoint / "model"), "model")
        if stage == "rvq" and autoencoder and result.checkpoint is not None:  # reconstruction per depth, decoded
            from lmdm.checkpoints.builtin import resolve_checkpoint
            from lmdm.checkpoints.format import load_checkpoint
            from lmdm.eval.rvq_report import log_rvq_report, rvq_depth_figures

            rvq, _ = load_checkpoint(result.checkpoint / "model", "rvq")
            report = rvq_depth_figures(cfg, rvq, load_checkpoint(resolve_checkpoint(autoencoder), "autoencoder")[0])
            log_rvq_report(report, run.info.run_id, cfg.tracking.tracking_uri)
            console.print(
                f"RVQ at depths {report['depths']}: latent MSE {report['latent_mse']}, mel L1 {report['figures']['mel_l1_db']} dB"
            )
    console.print(
        f"{stage}: step {result.metrics.get('step')}, loss {result.metrics.get('train/loss'):.4f}; checkpoint {result.checkpoint}"
    )
    console.print(f"MLflow: {ui_command(cfg)}")


@app.command()
def arc(
    latents: Annotated[
        Path, typer.Option("--latents", help="`lmdm precompute` output with chunks of (context + arc.blocks) blocks or more.")
    ],
    init: Annotated[
        Path | None, typer.Option("--init", help="The teacher-forced LMDM to post-train (train.init); default runs/<name>/lmdm.")
    ] = None,
    autoencoder: Annotated[
        str | None,
        typer.Option("--autoencoder", help="Decodes the sample rollouts logged to MLflow (arc.autoencoder); default the LMDM's."),
    ] = None,
    config: ConfigOption = "quickstart",
    overrides: Overrides = None,
) -> None:
    """ARC-Forcing: post-train an LMDM on its own multi-block rollouts (adversarial relativistic + contrastive) with
    Ray Train + Accelerate, logging G/D losses, D accuracies and sample rollouts to MLflow. Stream the result with
    stream.steps=arc.steps."""
    import mlflow

    from lmdm.checkpoints.builtin import resolve_checkpoint
    from lmdm.eval.tracking import mlflow_run, ui_command
    from lmdm.pipelines.arc import default_arc_inputs
    from lmdm.pipelines.progress import training_progress
    from lmdm.pipelines.train import run_train

    cfg = _load(config, overrides)
    cfg.train.init = init or cfg.train.init
    if autoencoder is not None:
        cfg.arc.autoencoder = resolve_checkpoint(autoencoder)
    cfg = default_arc_inputs(cfg)
    console.print(f"lmdm {lmdm.__version__} imported from {Path(lmdm.__file__).parent}", style="dim", soft_wrap=True)
    console.print(f"ARC-Forcing {cfg.train.init} on {latents}: {cfg.arc.blocks} blocks per rollout, {cfg.arc.steps} steps", style="dim")
    with mlflow_run(cfg, "arc"), mlflow_run(cfg, "arc", nested=True, params=False) as run:
        try:
            with training_progress("ARC-Forcing", console) as progress:
                result = run_train(cfg, "arc", latents, mlflow_run_id=run.info.run_id, progress=progress)
        except (ValueError, FileNotFoundError) as exc:
            err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(1) from None
        if result.checkpoint is not None:
            mlflow.log_artifacts(str(result.checkpoint / "model"), "model")
    m = result.metrics
    console.print(
        f"arc: step {m.get('step')}, generator loss {m.get('train/loss', float('nan')):.4f}; checkpoint {result.checkpoint} "
        f"(stream it with stream.steps={cfg.arc.steps})"
    )
    console.print(f"MLflow: {ui_command(cfg)}")


@app.command("import-sao")
def import_sao_command(
    source: Annotated[Path, typer.Argument(help="Stable Audio folder (model_config.json + model.safetensors) or its config.")],
    out: Annotated[Path, typer.Argument(help="Output folder: dit/, conditioners/, autoencoder/ in our format.")],
) -> None:
    """Convert a Stable Audio Open / Open Small checkpoint into our format (safetensors only)."""
    from lmdm.checkpoints.errors import CheckpointError
    from lmdm.checkpoints.sao_dit import import_sao

    try:
        written = import_sao(source, out)
    except CheckpointError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    for component, folder in written.items():
        console.print(f"{component}: {folder}")


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="WAV file to write.")] = Path("runs/generate.wav"),
    seconds: Annotated[float, typer.Option(help="Length of audio to stream.", min=0.1, max=3600)] = 10.0,
    prompt: Annotated[str | None, typer.Option(help="Text prompt for the whole stream.")] = None,
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts", help="Prompts by time: lines 'SECONDS PROMPT' (first at 0), for prompt changes mid-stream.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps per block (default: stream.steps).", min=1, max=1000)] = None,
    cfg_scale: Annotated[
        float | None, typer.Option("--cfg", help="Classifier-free guidance scale (default: stream.cfg_scale; 1 = off).")
    ] = None,
    runtime: Annotated[str | None, typer.Option(help="auto | eager | packed | compile (default: stream.runtime).")] = None,
    dit_path: Annotated[
        Path | None,
        typer.Option("--dit", help="DiT checkpoint folder (our format); default: the quickstart's LMDM if trained, else random init."),
    ] = None,
    autoencoder_path: Annotated[
        Path | None,
        typer.Option(
            "--autoencoder",
            help="Autoencoder checkpoint folder (or builtin:NAME/autoencoder); default: the one the quickstart's LMDM was trained on, else random init.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    config: ConfigOption = "quickstart",
    overrides: Overrides = None,
) -> None:
    """Stream audio from a DiT and an autoencoder to a WAV file, under a prompt (or prompts that change by time)."""
    from lmdm.checkpoints.errors import CheckpointError
    from lmdm.pipelines.generate import run_generate
    from lmdm.streaming.prompts import PromptChange, PromptsError, read_prompts
    from lmdm.text.encoders import TextEncoderError

    if prompt is not None and prompts_file is not None:
        err_console.print("[bold red]error:[/] give --prompt or --prompts, not both")
        raise typer.Exit(2)
    if prompt is not None and not prompt.strip():
        err_console.print("[bold red]error:[/] --prompt is empty; leave it out to stream without a prompt")
        raise typer.Exit(2)
    extra = [f"stream.steps={steps}"] if steps is not None else []
    extra += [f"stream.cfg_scale={cfg_scale}"] if cfg_scale is not None else []
    extra += [f"stream.runtime={runtime}"] if runtime is not None else []
    cfg = _load(config, [*(overrides or []), *extra])
    try:
        prompts = read_prompts(prompts_file) if prompts_file else [PromptChange(0.0, prompt)] if prompt is not None else None
        with _progress_bar("streaming blocks") as bar:
            task = bar.add_task("blocks", total=None)
            result = run_generate(
                cfg,
                out,
                seconds,
                prompts,
                _resolve(dit_path),
                _resolve(autoencoder_path),
                seed,
                on_block=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except (CheckpointError, PromptsError, TextEncoderError, ValueError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    console.print(f"DiT: {result.dit} · autoencoder: {result.autoencoder} · runtime: {result.runtime}", highlight=False)
    if "random init" in (result.dit, result.autoencoder):
        console.print("[yellow]random-init models make noise: run `lmdm quickstart` (or pass --dit/--autoencoder) for trained ones[/]")
    console.print(f"wrote {out} ({result.seconds:.1f} s, {result.blocks} blocks of {cfg.stream.block_frames} latent frames)")


@app.command("serve")
def serve_command(
    dit_path: Annotated[
        Path | None, typer.Option("--dit", help="Streaming DiT checkpoint folder; default: serve.dit, else the quickstart's LMDM.")
    ] = None,
    autoencoder_path: Annotated[
        Path | None,
        typer.Option(
            "--autoencoder", help="Its autoencoder folder (or builtin:NAME/autoencoder); default: serve.autoencoder, else the quickstart's."
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default serve.host, 127.0.0.1: loopback only).")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP/WebSocket port (default serve.port).", min=0, max=65535)] = None,
    token: Annotated[
        str | None, typer.Option(help="Bearer token clients must send (default serve.token; none).", envvar="LMDM_SERVE_TOKEN")
    ] = None,
    config: ConfigOption = "quickstart",
    overrides: Overrides = None,
) -> None:
    """Serve live streams: WS /v1/stream, POST /v1/generate, GET /v1/stats, and the browser instrument at /."""
    from lmdm.pipelines.serving import resolve_checkpoints, start_server

    extra = [f"serve.host={host}"] if host is not None else []
    extra += [f"serve.port={port}"] if port is not None else []
    extra += [f"serve.dit={_resolve(dit_path)}"] if dit_path is not None else []
    extra += [f"serve.autoencoder={_resolve(autoencoder_path)}"] if autoencoder_path is not None else []
    cfg = resolve_checkpoints(_load(config, [*(overrides or []), *extra]))
    if token:
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"token": token})})
    if cfg.serve.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            f"[yellow]serving on {cfg.serve.host}: reachable from other machines{'' if cfg.serve.token else ' and without a token (set --token)'}[/]"
        )
    with console.status("starting Ray Serve: loading and warming up the model ..."):
        try:
            handle = start_server(cfg)
        except Exception as exc:  # Serve wraps a replica's failure; its message names the cause
            err_console.print(f"[bold red]error:[/] the server did not start: {exc}", markup=True, highlight=False)
            raise typer.Exit(1) from None
    console.print(f"DiT: {handle.dit} · autoencoder: {handle.autoencoder}", highlight=False)
    if "random init" in (handle.dit, handle.autoencoder):
        console.print("[yellow]random-init models make noise: run `lmdm quickstart` (or pass --dit/--autoencoder) for trained ones[/]")
    console.print(f"instrument: {handle.url}   stream: {handle.ws_url}   stats: {handle.url}v1/stats", highlight=False)
    console.print(
        f"listen: lmdm listen --url {handle.ws_url} --seconds 20 --out runs/listen.wav   (Ctrl-C stops the server)", highlight=False
    )
    import signal

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # `kill` (and a background job's SIGINT, ignored there) stops it cleanly too
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        console.print("stopping ...")
        serve.shutdown()


@app.command()
def listen(
    url: Annotated[str, typer.Option(help="The server's stream endpoint.")] = "ws://127.0.0.1:8000/v1/stream",
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt, 'TEXT' or 'TEXT @ WEIGHT'; repeat to blend several.")] = None,
    seconds: Annotated[float, typer.Option(help="Seconds of audio to receive.", min=0.1, max=86400)] = 20.0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="WAV file to write (16-bit).")] = Path("runs/listen.wav"),
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Denoising steps per block (default: the server's).", min=1)] = None,
    cfg_scale: Annotated[float | None, typer.Option("--cfg", help="CFG scale (default: the server's).")] = None,
    token: Annotated[str | None, typer.Option(help="Bearer token.", envvar="LMDM_SERVE_TOKEN")] = None,
    play: Annotated[bool, typer.Option(help="Play on the default sound device too (needs the sounddevice package).")] = False,
    measure_latency: Annotated[
        bool, typer.Option("--measure-latency", help="Switch prompts every --change-every seconds and report the control latency.")
    ] = False,
    change_to: Annotated[list[str] | None, typer.Option(help="The prompt(s) to switch to ('TEXT @ WEIGHT').")] = None,
    change_every: Annotated[float, typer.Option(help="Seconds of audio between prompt switches.", min=0.5)] = 8.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON.")] = None,
) -> None:
    """Stream from a running `lmdm serve` to a WAV (or the sound device); report underruns and control latency."""
    from lmdm.serve.client import ClientError
    from lmdm.serve.listen import parse_prompt, run_listen, sound_output

    try:
        prompts = [parse_prompt(p) for p in prompt or ["Bach chorale, for organ, moderato"]]
        target = [parse_prompt(p) for p in change_to or (["Monteverdi madrigal, for strings, allegro"] if measure_latency else [])]
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    with _progress_bar("receiving audio") as bar:
        task = bar.add_task("seconds", total=seconds)
        try:
            result = run_listen(
                url=url, prompts=prompts, seconds=seconds, out=out, seed=seed, steps=steps, cfg=cfg_scale, token=token,
                change_to=target or None, change_every=change_every, player=sound_output if play else None,
                on_progress=lambda done, total: bar.update(task, completed=done),
            )  # fmt: skip
        except (ClientError, OSError) as exc:
            err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(1) from None
    figures = result.summary()
    console.print(
        f"received {figures['seconds']:.1f} s in {figures['blocks']} blocks · first audio {figures['first_audio_s'] * 1000:.0f} ms after start"
        f" · underruns {figures['underruns']} · reconnects {figures['reconnects']}" + (f" · wrote {out}" if out else ""),
        highlight=False,
    )
    if target:
        lat, bounds = figures["control_latency_s"], figures["arithmetic_s"]
        if lat["n"]:
            console.print(
                f"control latency over {lat['n']} prompt changes: mean {lat['mean'] * 1000:.0f} ms (min {lat['min'] * 1000:.0f}, max {lat['max'] * 1000:.0f})",
                highlight=False,
            )
        else:
            console.print("[yellow]no prompt change was heard within the stream: listen longer than --change-every[/]")
        console.print(
            f"arithmetic: blocks_ahead {figures['blocks_ahead']:g} × block {figures['block_seconds']:.3f} s + decoder lookahead "
            f"{figures['lookahead_seconds']:.3f} s → {bounds['min_s'] * 1000:.0f}–{bounds['max_s'] * 1000:.0f} ms, mean {bounds['mean_s'] * 1000:.0f} ms"
            f" (one block's compute, {figures['block_compute_s']} s, hides inside blocks_ahead)",
            highlight=False,
        )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(figures, indent=2))


def score_table(result: dict[str, Any]) -> Table:
    """The figures of `lmdm score` beside their floors."""
    fad, like = result["fad"], result["likeness"]
    columns = [k for k in ("evaluated", "floor_training", "floor_reconstructed") if k in fad]
    table = Table(title=f"{result['evaluated']['name']} vs the held-out reference ({result['reference']['clips']} clips)")
    table.add_column("figure")
    for key in columns:
        table.add_column(key.replace("_", " "), justify="right")
    table.add_row(f"FAD ({fad['embedder']}, {fad['frames']} frames)", *(f"{fad[k]:.3f}" for k in columns))
    if fad.get("fad_inf"):
        table.add_row("FAD∞ (evaluated)", f"{fad['fad_inf']['score']:.3f} (R² {fad['fad_inf']['r2']:.2f})", *([""] * (len(columns) - 1)))
    clap = result.get("clap")
    if clap and clap.get("evaluated") is not None:
        table.add_row(f"CLAP score ({clap['embedder']})", f"{clap['evaluated']:.3f}", *([""] * (len(columns) - 1)))
        table.add_row("CLAP score of the reference", f"{clap['reference']:.3f}", *([""] * (len(columns) - 1)))
    for figure in ("pitch_class_l1", "loudness_mean_diff_db", "brightness_mean_diff_hz", "onset_rate_ratio", "pitch_change_rate_ratio"):
        table.add_row(figure, *(f"{like[k][figure]:.3f}" for k in columns))
    table.caption = "FAD and the likeness distances: lower is closer; rate ratios: 1 is the reference's; CLAP score: higher is closer"
    return table


@app.command()
def score(
    audio: Annotated[
        Path | None, typer.Option("--audio", help="Folder of audio to score (prompts: --prompt, or its metadata.jsonl).")
    ] = None,
    dit_path: Annotated[
        Path | None, typer.Option("--dit", help="Score this DiT's streams instead (eval.num_streams × eval.stream_seconds).")
    ] = None,
    autoencoder_path: Annotated[
        Path | None,
        typer.Option(
            "--autoencoder",
            help="Autoencoder (a folder or builtin:NAME/autoencoder): decodes --dit's streams, and gives the reconstructed floor.",
        ),
    ] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="One prompt for every clip (CLAP score).")] = None,
    fad_embedder: Annotated[str, typer.Option("--fad-embedder", help="crepe | crepe-full | a CLAP folder or LAION .pt.")] = "crepe",
    text_embedder: Annotated[
        str, typer.Option("--text-embedder", help="builtin:embedder | a CLAP folder or .pt | none.")
    ] = "builtin:embedder",
    clap_tokenizer: Annotated[Path | None, typer.Option("--clap-tokenizer", help="RoBERTa tokenizer folder for a LAION .pt.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every figure as JSON here.")] = None,
    config: ConfigOption = "quickstart",
    overrides: Overrides = None,
) -> None:
    """FAD (FAD∞), CLAP score and likeness of audio against the corpus's held-out reference, with the floors
    (training clips, and reconstructed training clips given --autoencoder) at the same size."""
    from lmdm.checkpoints.errors import CheckpointError
    from lmdm.checkpoints.format import load_checkpoint
    from lmdm.eval.embedders import EmbedderError
    from lmdm.eval.score import audio_folder, run_score

    cfg = _load(config, overrides)
    if (audio is None) == (dit_path is None):
        err_console.print("[bold red]error:[/] give --audio FOLDER or --dit CHECKPOINT (one of them)")
        raise typer.Exit(2)
    try:
        dit_path, autoencoder_path = _resolve(dit_path), _resolve(autoencoder_path)
        vae = load_checkpoint(autoencoder_path, kind="autoencoder")[0] if autoencoder_path else None
        evaluated = audio_folder(audio, cfg, prompt) if audio is not None else _dit_streams(cfg, dit_path, autoencoder_path, prompt)
        with console.status("scoring") as status:
            result = run_score(
                cfg, evaluated, vae, fad_embedder, None if text_embedder == "none" else text_embedder, clap_tokenizer,
                progress=lambda what: status.update(what),
            )  # fmt: skip
    except (CheckpointError, EmbedderError, ValueError, FileNotFoundError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    console.print(score_table(result))
    _write_figures(json_out, result)


def _resolve(spec: Path | None) -> Path | None:
    """A checkpoint option's folder: ``builtin:<name>[/<part>]`` resolved (hashes verified), a path as given."""
    from lmdm.checkpoints.builtin import resolve_checkpoint

    return None if spec is None else resolve_checkpoint(spec)


def _dit_streams(cfg: Config, dit_path: Path | None, autoencoder_path: Path | None, prompt: str | None) -> Any:
    """``eval.num_streams`` streams of ``eval.stream_seconds`` from a DiT (checked as `lmdm generate` checks it),
    each under a held-out caption in turn (or ``prompt``)."""
    from lmdm.builders import load_stream_models
    from lmdm.eval.score import AudioSet, held_out_reference
    from lmdm.pipelines.quickstart import stream_audio
    from lmdm.text.encoders import build_text_encoder

    if autoencoder_path is None:
        raise ValueError("--dit needs --autoencoder (the one its latents came from) to decode the streams")
    encoder = build_text_encoder(cfg) if cfg.dit.cond_token_dim else None
    dit, vae = load_stream_models(cfg, dit_path, autoencoder_path, encoder)
    captions = held_out_reference(cfg).prompts
    prompts = [prompt or captions[i % len(captions)] for i in range(cfg.eval.num_streams)]
    clips = []
    with _progress_bar("streaming") as bar:
        task = bar.add_task("streams", total=len(prompts))
        for i, text in enumerate(prompts):
            tokens = encoder.encode([str(text)]).tokens if encoder is not None else None
            clips.append(stream_audio(cfg, dit, vae, tokens, cfg.eval.stream_seconds, cfg.eval.seed + i))
            bar.update(task, completed=i + 1)
    return AudioSet(
        f"{dit_path.name if dit_path else 'DiT'} streams",
        clips,
        list(prompts),
        cfg.audio.sample_rate,
        [f"stream-{i}" for i in range(len(clips))],
    )


def _engine_option(spec: str) -> dict[str, Any]:
    """``NAME=VARIANT[@STEPS]:CHECKPOINT`` → an ``eval.engines`` entry (the checkpoint may itself hold a colon: builtin:...)."""
    name, sep, rest = spec.partition("=")
    variant, sep2, dit = rest.partition(":")
    variant, at, steps = variant.partition("@")
    if not sep or not sep2 or not name or not dit or (at and not steps.isdigit()):
        raise typer.BadParameter(
            f"{spec!r}: expected NAME=VARIANT[@STEPS]:CHECKPOINT, e.g. lmdm=block_causal:runs/quickstart/lmdm or "
            "arc=block_causal@4:runs/quickstart/arc"
        )
    return {"name": name, "variant": variant, "dit": dit, **({"steps": int(steps)} if at else {})}


@eval_app.command("run")
def eval_run(
    engine: Annotated[
        list[str] | None,
        typer.Option(
            "--engine",
            help="NAME=VARIANT:CHECKPOINT, repeatable (variant outpainting for a base DiT, block_causal or encdec for an LMDM, "
            "flat or framewise for an LMM); "
            "default: the quickstart's base (outpainting) and LMDM.",
        ),
    ] = None,
    autoencoder: Annotated[
        str | None, typer.Option("--autoencoder", help="The autoencoder the DiTs' latents came from (default: the quickstart's).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="The eval's folder (default runs/<config name>/eval); reruns resume.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here too.")] = None,
    config: ConfigOption = "quickstart",
    overrides: Overrides = None,
) -> None:
    """Long rollouts of every engine on a Ray actor pool: FAD, CLAP score and likeness per stream position, drift with
    bootstrap intervals, speed; MLflow runs (a child per engine) and report.html / report.md. Resumable."""
    from lmdm.checkpoints.errors import CheckpointError
    from lmdm.eval.embedders import EmbedderError
    from lmdm.eval.tracking import ui_command
    from lmdm.pipelines.evaluate import run_eval

    extra = [f"eval.out={out}"] if out is not None else []
    if autoencoder is not None:
        extra.append(f"eval.autoencoder={autoencoder}")
    if engine:
        extra.append("eval.engines=" + json.dumps([_engine_option(e) for e in engine]))
    cfg = _load(config, [*(overrides or []), *extra])
    try:
        result = run_eval(cfg, console)
    except (CheckpointError, EmbedderError, ValueError, FileNotFoundError, RuntimeError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    console.print(eval_table(result))
    console.print(f"report: {result['report']['html']} (and report.md) · MLflow: {ui_command(cfg)}, then open {result['mlflow_link']}")
    _write_figures(json_out, result)


def eval_table(result: dict[str, Any]) -> Table:
    """Per engine: each metric's first and last window, last/first ratio with its interval, and the verdict; speed."""
    table = Table(title=f"lmdm eval: {result['eval']['rollouts']} rollouts × {result['eval']['rollout_seconds']:g} s per engine")
    for column in ("engine", "metric", "first", "last", "last − first [95% CI]", "verdict"):
        table.add_column(column, justify="left" if column in ("engine", "metric", "verdict") else "right")
    for name, figures in result["engines"].items():
        for metric in ("fad", "clap", "pitch_class_l1", "onset_rate_log_ratio"):
            d = figures["drift"].get(metric)
            if d is None:
                continue
            low, high = d["last_minus_first_ci"]
            colour = {"drifts": "red", "improves": "green"}.get(d["verdict"], "default")
            table.add_row(
                name, metric, f"{d['curve'][0]:.3f}", f"{d['curve'][-1]:.3f}", f"{d['last_minus_first']:+.3f} [{low:+.3f}, {high:+.3f}]",
                f"[{colour}]{d['verdict']}[/]",
            )  # fmt: skip
        s = figures["speed"]
        table.add_row(name, "speed", "", "", f"{s['ms_per_block']:.0f} ms/block", f"{s['rtf']:.1f}x real time", end_section=True)
    table.caption = "every metric, the curves and the likeness figures: report.html"
    return table


@eval_app.command("retrieval")
def eval_retrieval(
    embedder: Annotated[
        str, typer.Option("--embedder", help="builtin:embedder, an embedder checkpoint folder, or a CLAP folder / .pt.")
    ] = ("builtin:embedder"),
    clap_tokenizer: Annotated[Path | None, typer.Option("--clap-tokenizer", help="RoBERTa tokenizer folder for a LAION .pt.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here.")] = None,
    config: ConfigOption = "quickstart",
    overrides: Overrides = None,
) -> None:
    """Text–audio retrieval on the corpus's held-out clips: is each clip nearest its own caption?"""
    from lmdm.checkpoints.errors import CheckpointError
    from lmdm.eval.embedders import EmbedderError, TextAudioEmbedder, load_embedder
    from lmdm.eval.retrieval import retrieval
    from lmdm.eval.score import held_out_reference

    cfg = _load(config, overrides)
    try:
        model = load_embedder(embedder, clap_tokenizer)
        if not isinstance(model, TextAudioEmbedder):
            raise EmbedderError(f"{embedder} has no text side")
        figures = retrieval(model, held_out_reference(cfg))
    except (CheckpointError, EmbedderError, ValueError, FileNotFoundError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    table = Table(title=f"{figures['embedder']}: retrieval on {figures['clips']} held-out clips of {cfg.data.root}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("chance", justify="right")
    table.add_row("true caption above another clip's", f"{figures['pairwise_accuracy']:.3f}", "0.500")
    table.add_row("true caption nearest (top-1)", f"{figures['top1']:.3f}", f"{figures['top1_chance']:.3f}")
    table.add_row("median rank of the true caption", f"{figures['median_rank']:.1f}", f"{(figures['clips'] + 1) / 2:.1f}")
    console.print(table)
    _write_figures(json_out, figures)


@eval_app.command("reconstruction")
def eval_reconstruction(
    autoencoder: Annotated[str, typer.Option("--autoencoder", help="An autoencoder checkpoint folder, or builtin:<name>/autoencoder.")],
    clips: Annotated[int, typer.Option("--clips", min=1, max=1000, help="Held-out clips.")] = 4,
    seconds: Annotated[float, typer.Option("--seconds", min=0.5, max=600.0, help="Seconds of each clip (from its start).")] = 8.0,
    plots: Annotated[Path | None, typer.Option("--plots", help="Write a spectrogram PNG (clip over reconstruction) per clip here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here.")] = None,
    config: ConfigOption = "quickstart",
    overrides: Overrides = None,
) -> None:
    """How well an autoencoder reconstructs held-out corpus clips: mel L1, pitch-class accuracy, voicing, loudness, brightness."""
    from lmdm.checkpoints.builtin import resolve_checkpoint
    from lmdm.checkpoints.errors import CheckpointError
    from lmdm.checkpoints.format import load_checkpoint
    from lmdm.eval.plots import plot_spectrograms
    from lmdm.eval.reconstruction import FIGURE_KEYS, run_reconstruction

    cfg = _load(config, overrides)
    try:
        vae, _ = load_checkpoint(resolve_checkpoint(autoencoder), "autoencoder")
        with _progress_bar("reconstructing held-out clips") as bar:
            task = bar.add_task("reconstructing", total=clips)
            result = run_reconstruction(
                cfg,
                vae,
                clips,
                seconds,
                progress=lambda done, _: bar.update(task, completed=done),
                say=lambda text: bar.console.print(text),
            )
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    table = Table(title=f"{autoencoder}: {len(result['clips'])} held-out clips of {cfg.data.root}, {seconds:g} s each")
    table.add_column("clip")
    for key in FIGURE_KEYS:
        table.add_column(key.replace("_", " "), justify="right")
    for row in [*result["clips"], {"file": "mean", **result["mean"]}]:
        table.add_row(
            Path(row["file"]).name, *(f"{row[k]:.3f}" if "db" not in k and "hz" not in k else f"{row[k]:.1f}" for k in FIGURE_KEYS)
        )
    console.print(table)
    if plots:
        for row, (original, recon) in zip(result["clips"], result["audio"], strict=True):
            name = Path(row["file"]).stem
            path = plot_spectrograms(
                [
                    (f"held-out clip {name}", original),
                    (f"reconstruction: mel L1 {row['mel_l1_db']:.1f} dB, pitch-class accuracy {row['pitch_class_accuracy']:.2f}", recon),
                ],
                cfg.audio.sample_rate,
                f"{autoencoder}",
                plots / f"{name}.png",
            )
            console.print(f"spectrograms: {path}")
    _write_figures(json_out, {k: v for k, v in result.items() if k != "audio"} | {"autoencoder": autoencoder})


@app.command()
def ship(
    name: Annotated[str, typer.Argument(help="The built-in name (builtin:<name>), e.g. embedder.")],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="A checkpoint folder (model.safetensors + config.json).")] = None,
    card: Annotated[Path | None, typer.Option("--card", help="Its model card (Markdown).")] = None,
    pair: Annotated[
        Path | None, typer.Option("--pair", help="Instead: the pretrained/ folder of `lmdm pretrain` (autoencoder/, base/, MODEL_CARD.md).")
    ] = None,
) -> None:
    """Copy a trained checkpoint (or a pretrained pair) into the package as builtin:<name>, with its model card; record its hashes."""
    from lmdm.checkpoints.builtin import WEIGHTS
    from lmdm.checkpoints.builtin import ship as ship_weights
    from lmdm.checkpoints.errors import CheckpointError

    if (pair is None) == (checkpoint is None) or (checkpoint is not None and card is None):
        err_console.print("[bold red]error:[/] give --checkpoint with --card, or --pair (its MODEL_CARD.md is the card)", markup=True)
        raise typer.Exit(2)
    try:
        if pair is not None:
            hashes = ship_weights(pair, name, (pair / "MODEL_CARD.md").read_text(), parts=["autoencoder", "base"])
        else:
            assert checkpoint is not None and card is not None
            hashes = ship_weights(checkpoint, name, card.read_text())
    except (CheckpointError, FileNotFoundError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    for file, digest in hashes.items():
        console.print(f"{WEIGHTS / name / file}  sha256 {digest}", highlight=False)


# The small corpus `bench precompute --quick` and `bench train` run on (built once, then reused).
_BENCH_CORPUS = [
    "data.corpus.num_clips=24",
    "data.corpus.clip_seconds=8",
    "data.root=runs/data/corpus-bench-quick",
    "precompute.chunk_frames=120",
]


def _write_figures(json_out: Path | None, results: dict[str, Any]) -> None:
    """``--json FILE`` of every benchmark: its figures, machine-readable."""
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2))
        console.print(f"figures: {json_out}")


@bench_app.command("compare")
def bench_compare(
    quick: Annotated[bool, typer.Option("--quick", help="The quickstart shape only, 3 timed blocks (a few minutes on 2 cores).")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="The bar chart PNG (default: runs/bench-compare.png).")] = None,
    repeats: Annotated[int | None, typer.Option(help="Timed blocks per method (default 5; quick 3).")] = None,
    runtime: Annotated[str, typer.Option(help="The runtime every method runs on: auto | eager | packed | compile.")] = "auto",
    rvq: Annotated[
        Path | None,
        typer.Option(
            "--rvq", help="A trained RVQ whose per-depth error prints beside the ratios (default: runs/<config>/rvq, the quickstart's)."
        ),
    ] = None,
    config: ConfigOption = "quickstart",
    overrides: Overrides = None,
) -> None:
    """LMDM (block-causal) vs outpainting vs the flat and framewise LMMs at matched parameter count, batch 1, the same
    block and context seconds and runtime: sequential passes, FLOPs (analytical and counted), latency, time to first
    audio, real-time factor and cache memory per second of audio, with the ratios, from one run; a PNG bar chart."""
    from lmdm.eval.bench_compare import compare_report, paper_shape, plot_compare, quickstart_shape, run_compare_bench

    cfg = _load(config, overrides)
    shapes = [quickstart_shape(cfg)] if quick else [paper_shape(cfg.rvq.levels, cfg.rvq.codes), quickstart_shape(cfg)]
    default_rvq = Path("runs") / cfg.name / "rvq"
    console.print(f"comparing on {__import__('torch').get_num_threads()} threads: " + ", ".join(s.name for s in shapes) + " ...")
    try:
        results = run_compare_bench(
            shapes, runtime, repeats or (3 if quick else 5), rvq=rvq or (default_rvq if default_rvq.is_dir() else None),
            progress=lambda line: console.print(f"[dim]{line}[/]"),
        )  # fmt: skip
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    for table in compare_report(results):
        console.print(table)
    png = plot_compare(results, plot or Path("runs") / "bench-compare.png")
    console.print(f"chart: {png}")
    _write_figures(json_out, results)


@bench_app.command("stream")
def bench_stream(
    quick: Annotated[bool, typer.Option("--quick", help="A small shape (under a minute on 2 cores).")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here.")] = None,
    width: Annotated[int | None, typer.Option(help="DiT width (default 512; quick 256).")] = None,
    depth: Annotated[int | None, typer.Option(help="DiT depth (default 8; quick 4).")] = None,
    block_frames: Annotated[int | None, typer.Option(help="Latent frames per block (default 48).")] = None,
    context_blocks: Annotated[int | None, typer.Option(help="Context blocks (default 4).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps per block (default 8).")] = None,
    batch: Annotated[int | None, typer.Option(help="Streams per batch (default 1).")] = None,
    cfg_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance scale (1 = off).")] = None,
    repeats: Annotated[int | None, typer.Option(help="Timed blocks per method.")] = None,
    matmul_precision: Annotated[
        str, typer.Option(help="float32 matmul precision for every method: highest (fp32) | high | medium (oneDNN bf16 dot products).")
    ] = "highest",
    runtime: Annotated[
        list[str] | None,
        typer.Option(help="Runtime(s) to measure, repeatable: eager | packed | compile | auto (default: all three, one run)."),
    ] = None,
    device: Annotated[str, typer.Option(help="Device of the bench model: cpu | cuda | cuda:N.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Dtype of the bench model: float32 | bfloat16 | float16.")] = "float32",
    config: ConfigOption = "quickstart",
) -> None:
    """Per-block latency of outpainting vs LMDM (encdec, block-causal) on every runtime, speedup vs the
    analytical ratio, MFU, KV-cache bytes and real-time factor — all from one run. Also the quickstart
    model's real-time factor (on CPU)."""
    import torch

    from lmdm.eval.bench_stream import BenchShape, run_stream_bench, stream_report
    from lmdm.runtime import RUNTIMES, resolve_runtime

    if matmul_precision not in ("highest", "high", "medium"):
        err_console.print(f"[bold red]error:[/] --matmul-precision must be highest, high or medium, got {matmul_precision!r}")
        raise typer.Exit(2)
    if dtype not in ("float32", "bfloat16", "float16"):
        err_console.print(f"[bold red]error:[/] --dtype must be float32, bfloat16 or float16, got {dtype!r}")
        raise typer.Exit(2)
    try:
        dev = torch.device(device)
        runtimes = tuple(dict.fromkeys(resolve_runtime(r, dev) for r in (runtime or RUNTIMES)))
    except (RuntimeError, ValueError) as exc:
        err_console.print(f"[bold red]error:[/] --runtime/--device: {exc}")
        raise typer.Exit(2) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        err_console.print(f"[bold red]error:[/] --device {device}: no CUDA device here (torch {torch.__version__})")
        raise typer.Exit(2)
    if dev.type == "cpu" and dtype == "float16":
        err_console.print("[bold red]error:[/] --dtype float16 is for GPUs; use float32 or bfloat16 on CPU")
        raise typer.Exit(2)
    torch.set_float32_matmul_precision(matmul_precision)
    cfg = _load(config, [])
    base = BenchShape(width=256, depth=4, repeats=5) if quick else BenchShape()
    given = {
        "width": width,
        "depth": depth,
        "block_frames": block_frames,
        "context_blocks": context_blocks,
        "steps": steps,
        "batch": batch,
        "cfg_scale": cfg_scale,
        "repeats": repeats,
        "runtimes": runtimes,
        "device": device,
        "dtype": dtype,
    }
    shape = BenchShape(**{**base.__dict__, **{k: v for k, v in given.items() if v is not None}})
    console.print(f"benchmarking {shape} on {__import__('torch').get_num_threads()} threads ...")
    try:
        results = run_stream_bench(shape, quickstart=cfg, progress=lambda line: console.print(f"[dim]{line}[/]"))
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    console.print(stream_report(results))
    _write_figures(json_out, results)


@bench_app.command("precompute")
def bench_precompute(
    quick: Annotated[bool, typer.Option("--quick", help="24 short clips (about a minute on 2 cores).")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here.")] = None,
    config: ConfigOption = "quickstart",
    overrides: Overrides = None,
) -> None:
    """Precompute throughput with 1 vs 2 Ray workers (same torch threads per worker), ratio printed."""
    from lmdm.pipelines.bench_precompute import run_precompute_bench

    cfg = _load(config, [*(_BENCH_CORPUS if quick else []), *(overrides or [])])
    summary = _build_corpus(cfg, force=False)
    results = run_precompute_bench(cfg, summary.root)
    w1, w2 = results["workers_1"], results["workers_2"]
    console.print(
        f"precompute {w1['chunks']} chunks: 1 worker {w1['chunks_per_second']:.2f} chunks/s, 2 workers {w2['chunks_per_second']:.2f} chunks/s "
        f"→ scaling 2 vs 1 = {results['precompute']['scaling_2_vs_1']:.2f}x (torch threads per worker: {results['torch_threads_per_worker']})"
    )
    _write_figures(json_out, results)


@bench_app.command("train")
def bench_train(
    quick: Annotated[bool, typer.Option("--quick", help="A small DiT, 6 steps (a few minutes on 2 cores).")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here.")] = None,
    config: ConfigOption = "quickstart",
    overrides: Overrides = None,
) -> None:
    """DDP vs DeepSpeed ZeRO-2: samples/s and per-worker training-state bytes, ratios printed."""
    import tempfile

    import torch

    from lmdm.builders import build_autoencoder_from
    from lmdm.checkpoints.format import save_checkpoint
    from lmdm.pipelines.bench_train import run_train_bench
    from lmdm.pipelines.precompute import run_precompute

    model = ["dit.width=128", "dit.depth=2", "dit.project_cond_tokens=true", "train.steps=6"] if quick else ["train.steps=20"]
    cfg = _load(config, [*_BENCH_CORPUS, *model, *(overrides or [])])
    summary = _build_corpus(cfg, force=False)
    with tempfile.TemporaryDirectory(prefix="lmdm-bench-train-data-") as tmp:
        # Latents of a random-init autoencoder: throughput and memory do not depend on what they encode.
        torch.manual_seed(0)
        ae = save_checkpoint(Path(tmp) / "autoencoder", build_autoencoder_from(cfg))
        cfg.data.root, cfg.precompute.out = summary.root, Path(tmp) / "latents"
        run_precompute(cfg, ae)
        results = run_train_bench(cfg, Path(tmp) / "latents")
    table = Table(title=f"base stage, {cfg.train.workers} workers × batch {cfg.train.batch_size}, {cfg.train.steps} steps; MB per worker")
    for column in ("strategy", "samples/s", "params", "grads", "optimizer", "total"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for name in ("ddp", "zero2"):
        r = results[name]
        table.add_row(
            name, f"{r['samples_per_s']:.2f}", *(f"{r['worst_worker'][k] / 1e6:.2f}" for k in ("params", "grads", "optimizer", "total"))
        )
    console.print(table)
    t = results["train"]
    console.print(
        f"ZeRO-2 / DDP per worker: optimizer state {t['zero2_vs_ddp_state_memory_ratio']:.3f} (1/N = {t['expected_optimizer_ratio']:.3f}), "
        f"total training state {t['zero2_vs_ddp_total_state_ratio']:.3f}, samples/s {t['zero2_vs_ddp_samples_per_s_ratio']:.2f}"
    )
    _write_figures(json_out, results)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
