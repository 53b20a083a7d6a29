"""The ``lmdm`` command line.

Every command takes a config (``--config``: a YAML path or a shipped config name, default
``quickstart``) and ``a.b=value`` overrides, validated before any work starts.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

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
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


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
    force: Annotated[bool, typer.Option(help="Rebuild the corpus even if one with other settings exists.")] = False,
    overrides: Overrides = None,
) -> None:
    """Run the embedded default chain. Today: build the corpus, print its summary and plot one clip."""
    from lmdm.audio.io import load_audio
    from lmdm.data.corpus import read_corpus_metadata
    from lmdm.eval.plots import plot_clip

    started = time.perf_counter()
    cfg = _load(config, overrides)
    console.rule(f"[bold]lmdm quickstart[/] · config {cfg.name}")
    summary = _build_corpus(cfg, force)
    console.print(_corpus_table(summary))
    row = read_corpus_metadata(summary.root)[0]
    audio = load_audio(summary.root / row["file_name"], cfg.audio.sample_rate, cfg.audio.channels)
    curves = {k: row[k] for k in ("f0_hz", "loudness_db", "brightness_hz")}
    png = plot_clip(audio, cfg.audio.sample_rate, cfg.data.frame_rate, curves, row["caption"], Path("runs") / cfg.name / "corpus_clip.png")
    console.print(f"plot of {row['clip_id']}: {png}")
    console.print(f"done in {time.perf_counter() - started:.1f} s")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
