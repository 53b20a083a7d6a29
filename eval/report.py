"""The error-accumulation report of ``lmdm eval``: ``report.html`` (one self-contained page: plots and audio
inlined) and ``report.md`` beside it (plots and audio as files next to it).

On the page: FAD, CLAP score and every likeness distance against stream position with every engine on each
plot (the line is all rollouts, the band each window's 95% bootstrap interval over rollouts); the drift
summary table; the speed table; audio players for the first and last window of one rollout per engine;
the config and the versions that made it.
"""

from __future__ import annotations

import base64
import html
import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from lmdm.config import Config, dump_config

__all__ = ["QUALITY", "plot_drift", "render_check", "versions", "write_report"]

QUALITY = ("fad", "clap")  # the first plot; the likeness distances get the second
SPEED_WARMUP_BLOCKS = 2  # a rollout's first blocks pack weights and fill caches: not in its speed figures
_LABELS = {
    "fad": "FAD to the held-out reference (lower is closer)",
    "clap": "CLAP score: audio–prompt cosine (higher is closer)",
    "pitch_class_l1": "pitch-class L1",
    "voiced_diff": "voiced-share difference",
    "loudness_mean_diff_db": "loudness mean diff (dB)",
    "loudness_std_diff_db": "loudness std diff (dB)",
    "brightness_mean_diff_hz": "brightness mean diff (Hz)",
    "brightness_std_diff_hz": "brightness std diff (Hz)",
    "onset_rate_log_ratio": "|ln onset-rate ratio|",
    "pitch_change_rate_log_ratio": "|ln pitch-change-rate ratio|",
}


def versions() -> dict[str, str]:
    """The versions behind the figures: Python, the platform, and the libraries that compute them."""
    found = {"python": sys.version.split()[0], "machine": f"{platform.system()} {platform.machine()}"}
    for package in ("lmdm", "torch", "ray", "mlflow", "numpy", "librosa"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def plot_drift(result: dict[str, Any], metrics: list[str], title: str, path: Path, columns: int = 2) -> Path:
    """One panel per metric: each engine's curve against stream position (s) with its bootstrap band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for i, (name, figures) in enumerate(result["engines"].items()):
            d = figures["drift"].get(metric)
            if d is None:
                continue
            colour = colours[i % len(colours)]
            mark = " (drifts)" if d["verdict"] == "drifts" else ""
            ax.plot(d["positions_s"], d["curve"], marker="o", ms=3, color=colour, label=f"{name}{mark}")
            ax.fill_between(d["positions_s"], d["band_low"], d["band_high"], color=colour, alpha=0.18, lw=0)
        ax.set_title(_LABELS.get(metric, metric), fontsize=10)
        ax.set_xlabel("stream position (s, window centre)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _drift_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, figures in result["engines"].items():
        for metric, d in figures["drift"].items():
            low, high = d["last_over_first_ci"]
            d_low, d_high = d["last_minus_first_ci"]
            outside = d["first_window_outside"]
            rows.append(
                [
                    name,
                    metric,
                    f"{d['curve'][0]:.3f}",
                    f"{d['curve'][-1]:.3f}",
                    f"{d['last_over_first']:.2f} [{low:.2f}, {high:.2f}]",
                    f"{d['last_minus_first']:+.3f} [{d_low:+.3f}, {d_high:+.3f}]",
                    f"{d['slope_per_minute']:+.3f}",
                    "none" if outside is None else f"{outside} ({d['positions_s'][outside]:g} s)",
                    d["verdict"],
                ]
            )
    return rows


_DRIFT_HEAD = [
    "engine",
    "metric",
    "first window",
    "last window",
    "last/first [95% CI]",
    "last − first [95% CI]",
    "slope / min",
    "first window outside",
    "verdict",
]
_SPEED_HEAD = ["engine", "variant", "ms per block (median)", "p90", "DiT ms", "decode ms", "real-time factor", "runtime · threads"]


def _speed_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, figures in result["engines"].items():
        s = figures["speed"]
        rows.append(
            [
                name,
                result["engine_specs"][name]["variant"],
                f"{s['ms_per_block']:.1f}",
                f"{s['ms_per_block_p90']:.1f}",
                f"{s['dit_ms_per_block']:.1f}",
                f"{s['decode_ms_per_block']:.1f}",
                f"{s['rtf']:.2f}x",
                s["runtime"],
            ]
        )
    return rows


def _html_table(head: list[str], rows: list[list[str]], cls: str) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>'


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def plot_quality_speed(result: dict[str, Any], path: Path, title: str) -> Path:
    """Quality against speed, one point per engine: FAD to the held-out reference (mean over windows; the bar spans
    the windows' lowest and highest) against the real-time factor measured in the rollouts (log axis; dashed: real time)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, figures) in enumerate(result["engines"].items()):
        d, rtf = figures["drift"].get("fad"), figures["speed"].get("rtf")
        if d is None or not rtf:
            continue
        curve = [v for v in d["curve"] if v == v]  # NaN-free windows
        mean = sum(curve) / len(curve)
        low, high = min(curve), max(curve)
        colour = colours[i % len(colours)]
        ax.errorbar([rtf], [mean], yerr=[[mean - low], [high - mean]], fmt="o", ms=7, capsize=4, color=colour)
        ax.annotate(f"{name}\n{rtf:.2g}x, FAD {mean:.2f}", (rtf, mean), textcoords="offset points", xytext=(8, 4), fontsize=8, color=colour)
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xscale("log")
    rtfs = [f["speed"]["rtf"] for f in result["engines"].values() if f["speed"].get("rtf")]
    if rtfs:
        ax.set_xlim(min(min(rtfs), 1.0) / 2, max(max(rtfs), 1.0) * 4)  # room for the labels, real time always shown
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("real-time factor in the rollouts (log; right of the dashed line: faster than real time)")
    ax.set_ylabel("FAD to the held-out reference (lower is closer)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: dict[str, Any], cfg: Config, out: Path) -> dict[str, Path]:
    """Plots under ``out/plots/``, then ``out/report.html`` and ``out/report.md`` (samples under ``out/samples/``).

    Returns:
        The paths: ``html``, ``md``, ``quality_png``, ``likeness_png``, ``speed_png``.
    """
    from lmdm.eval.likeness import FIGURES

    e = cfg.eval
    what = (
        f"{e.rollouts} rollouts × {e.rollout_seconds:g} s per engine, {e.window_seconds:g}-s windows, "
        f"bootstrap of {e.bootstrap} resamples over rollouts"
    )
    quality = [m for m in QUALITY if any(m in f["drift"] for f in result["engines"].values())]
    quality_png = plot_drift(result, quality, f"lmdm eval ({cfg.name}): quality along the stream — {what}", out / "plots" / "quality.png")
    likeness_png = plot_drift(
        result, list(FIGURES), "likeness to the held-out reference along the stream (lower is closer)", out / "plots" / "likeness.png", 4
    )
    speed_png = plot_quality_speed(
        result,
        out / "plots" / "quality_speed.png",
        f"lmdm eval ({cfg.name}): FAD ({e.fad_embedder}) against speed, {e.rollouts} rollouts each",
    )
    drift_rows, speed_rows = _drift_rows(result), _speed_rows(result)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    engines = ", ".join(f"{n} ({s['variant']}: {s['dit']})" for n, s in result["engine_specs"].items())
    ref = result["reference"]
    intro = (
        f"Engines: {engines}. Autoencoder: {result['autoencoder']}. {what}. Reference: {ref['clips']} held-out clips "
        f"({ref['seconds']:g} s, {ref['frames']} {e.fad_embedder} frames). Rollout r of every engine runs under held-out "
        f"caption r from seed {e.seed} + r."
    )
    verdict_note = (
        "Verdict: drifts where the last-minus-first difference's 95% interval lies wholly on the worse side of 0 (above for "
        "distances, below for the CLAP score; for a positive metric the same as the last/first ratio's interval against 1), "
        "improves where wholly on the better side, else holds. Intervals resample rollouts. 'First window outside' is the first "
        "window whose value leaves window 0's 95% band; with many windows some leave a 95% band by chance."
    )
    band_note = (
        "Lines: every rollout; bands: each window's 95% bootstrap interval over rollouts. FAD's band sits above its line: "
        "a resample repeats rollouts, and a pool of fewer distinct rollouts is less varied, so farther from the reference."
    )
    speed_note = (
        "Speed is measured inside the rollouts: the DiT step plus the autoencoder's streaming decode of each block, the first "
        f"{SPEED_WARMUP_BLOCKS} blocks of each rollout left out, with its actors sharing the machine (this eval: {e.actors} "
        f"actor(s) of {e.torch_threads} torch thread(s); a rollout reused from an earlier run keeps that run's timings: "
        f"{result.get('rollouts_reused', 0)} of them here)."
    )
    versions_rows = [[k, v] for k, v in versions().items()]
    players = []
    md_players = []
    for name in result["engines"]:
        for label in ("first", "last"):
            wav = out / "samples" / f"{name}-{label}.wav"
            if wav.is_file():
                caption = f"{name}: {label} window of rollout 0"
                players.append(
                    f'<figure><figcaption>{html.escape(caption)}</figcaption><audio controls preload="auto" src="{_data_uri(wav, "audio/wav")}">'
                    "</audio></figure>"
                )
                md_players.append(f"- [{caption}](samples/{wav.name})")
    config_yaml = dump_config(cfg)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmdm eval · {html.escape(cfg.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1280px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, td:nth-child(2) {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #ddd; }} .note {{ color: #555; font-size: 0.9em; max-width: 75em; }}
figure {{ display: inline-block; margin: 0.5em 1.5em 0.5em 0; }} pre {{ background: #f7f7f7; padding: 1em; overflow: auto; font-size: 0.8em; }}
</style></head><body>
<h1>lmdm eval · {html.escape(cfg.name)}</h1>
<p class="note">{html.escape(intro)} Made {stamp} in {result["seconds"]:.0f} s.</p>
<h2>Quality along the stream</h2>
<img id="quality" alt="FAD and CLAP score against stream position" src="{_data_uri(quality_png, "image/png")}">
<p class="note">{html.escape(band_note)}</p>
<h2>Drift summary</h2>
{_html_table(_DRIFT_HEAD, drift_rows, "drift")}
<p class="note">{html.escape(verdict_note)}</p>
<h2>Likeness along the stream</h2>
<img id="likeness" alt="likeness distances against stream position" src="{_data_uri(likeness_png, "image/png")}">
<h2>Speed</h2>
<img id="quality-speed" alt="FAD against real-time factor, one point per engine" src="{_data_uri(speed_png, "image/png")}">
{_html_table(_SPEED_HEAD, speed_rows, "speed")}
<p class="note">{html.escape(speed_note)}</p>
<h2>Listen: the first and the last window</h2>
{"".join(players)}
<h2>Config and versions</h2>
{_html_table(["", "version"], versions_rows, "versions")}
<pre>{html.escape(config_yaml)}</pre>
</body></html>
"""
    html_path = out / "report.html"
    html_path.write_text(page)
    md = "\n\n".join(
        [
            f"# lmdm eval · {cfg.name}",
            f"{intro} Made {stamp} in {result['seconds']:.0f} s.",
            "## Quality along the stream",
            "![FAD and CLAP score against stream position](plots/quality.png)",
            band_note,
            "## Drift summary",
            _md_table(_DRIFT_HEAD, drift_rows),
            verdict_note,
            "## Likeness along the stream",
            "![likeness distances against stream position](plots/likeness.png)",
            "## Speed",
            "![FAD against real-time factor, one point per engine](plots/quality_speed.png)",
            _md_table(_SPEED_HEAD, speed_rows),
            speed_note,
            "## Listen: the first and the last window",
            "\n".join(md_players),
            "## Config and versions",
            _md_table(["", "version"], versions_rows),
            f"```yaml\n{config_yaml}```",
        ]
    )
    md_path = out / "report.md"
    md_path.write_text(md + "\n")
    return {"html": html_path, "md": md_path, "quality_png": quality_png, "likeness_png": likeness_png, "speed_png": speed_png}


# What a person sees when the page opens: every image decoded, the tables filled, every audio player with a duration.
_RENDER_CHECK = """(async () => {
  const wait = (p, ms) => Promise.race([p, new Promise(r => setTimeout(r, ms))]);
  const images = [...document.images];
  await wait(Promise.all(images.map(i => i.decode().catch(() => null))), 20000);
  const audio = [...document.querySelectorAll('audio')];
  await wait(Promise.all(audio.map(a => a.readyState >= 1 ? null : new Promise(r => {
    a.addEventListener('loadedmetadata', r); a.addEventListener('error', r);
  }))), 20000);
  return {
    title: document.title,
    images: images.map(i => ({id: i.id, width: i.naturalWidth, height: i.naturalHeight, complete: i.complete})),
    tables: [...document.querySelectorAll('table')].map(t => ({name: t.className, rows: t.tBodies[0] ? t.tBodies[0].rows.length : 0})),
    audio: audio.map(a => ({duration: a.duration, error: a.error ? a.error.code : null})),
  };
})()"""


def render_check(page: Path, browser: str | None = None) -> dict[str, Any]:
    """Open ``page`` in headless Chromium (:mod:`lmdm.eval.browser`) and report what rendered: each image's decoded
    size, each table's body rows, each audio element's duration (seconds; NaN where it did not load).

    Raises:
        BrowserError: no browser, or it failed to load the page.
    """
    import asyncio

    from lmdm.eval.browser import open_page

    async def check() -> dict[str, Any]:
        async with open_page(browser) as tab:
            await tab.goto(page.resolve().as_uri())
            found: dict[str, Any] = await tab.evaluate(_RENDER_CHECK)
            return found

    return asyncio.run(check())
