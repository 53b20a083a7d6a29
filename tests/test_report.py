"""The eval report: written from drift figures, and opened in real headless Chromium (Debian's package, installed
by .ci/run) to check that its plots, tables and audio players render. Without a browser the browser test skips,
saying so, except where LMDM_REQUIRE_BROWSER=1 (.ci/run sets it): there it fails."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import tiny_config
from lmdm.audio.io import write_audio
from lmdm.eval.drift import drift, mean_metric
from lmdm.eval.likeness import FIGURES
from lmdm.eval.report import render_check, write_report

SR = 16000


def _result(out: Path) -> dict[str, Any]:
    """An eval's figures for two fake engines (one drifting), with their sample windows written as WAVs."""
    rng = np.random.default_rng(0)
    engines = {}
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("outpainting", "lmdm")):
        curves = {}
        for metric in ("fad", "clap", *FIGURES):
            values = 1.0 + 0.05 * rng.standard_normal((4, 6)) + (0.1 * np.arange(6) if i == 0 else 0.0)
            curves[metric] = drift(metric, mean_metric(values), 4, 6, 10.0, "lower" if metric == "clap" else "higher", 100).to_dict()
        speed = {"ms_per_block": 140.0 + 300 * (i == 0), "ms_per_block_p90": 150.0, "dit_ms_per_block": 100.0}
        speed |= {"decode_ms_per_block": 40.0, "rtf": 14.0, "runtime": "packed", "torch_threads": 1}
        engines[name] = {"drift": curves, "speed": speed, "rollouts": 4, "windows": 6}
        t = np.arange(2 * SR) / SR
        for label, freq in (("first", 440.0), ("last", 660.0)):
            write_audio(out / "samples" / f"{name}-{label}.wav", (0.3 * np.sin(2 * math.pi * freq * t))[None].astype(np.float32), SR)
    return {
        "engines": engines,
        "engine_specs": {n: {"name": n, "variant": n if n == "outpainting" else "block_causal", "dit": f"/ckpt/{n}"} for n in engines},
        "autoencoder": "/ckpt/autoencoder",
        "reference": {"clips": 3, "seconds": 48.0, "frames": 2400},
        "seconds": 12.0,
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("eval")
    return write_report(_result(out), tiny_config("eval.rollouts=4", "eval.window_seconds=10"), out)


def test_report_has_every_part(report: dict[str, Path]) -> None:
    page = report["html"].read_text()
    assert page.count("<img") == 3 and page.count("<audio") == 4 and "data:audio/wav;base64," in page
    assert 'src="plots/' not in page and "http" not in page.split("<pre>")[0]  # self-contained: nothing fetched
    md = report["md"].read_text()
    assert "![FAD and CLAP score against stream position](plots/quality.png)" in md
    assert "| outpainting | fad |" in md and "drifts" in md and "holds" in md
    assert (report["md"].parent / "plots" / "likeness.png").stat().st_size > 10_000


def test_report_renders_in_headless_chromium(report: dict[str, Path]) -> None:
    from lmdm.eval.browser import find_chromium

    if find_chromium() is None:
        message = "no Chromium on PATH (Debian: apt-get install chromium; .ci/run installs it): the report's browser test did not run"
        if os.environ.get("LMDM_REQUIRE_BROWSER") == "1":
            pytest.fail(message + ", and LMDM_REQUIRE_BROWSER=1 requires it")
        pytest.skip(message)
    found = render_check(report["html"])
    assert found["title"].startswith("lmdm eval")
    assert [i["id"] for i in found["images"]] == ["quality", "likeness", "quality-speed"]
    assert all(i["complete"] and i["width"] >= 600 and i["height"] >= 300 for i in found["images"]), found["images"]
    tables = {t["name"]: t["rows"] for t in found["tables"]}
    assert tables["drift"] == 2 * (2 + len(FIGURES)) and tables["speed"] == 2 and tables["versions"] >= 5
    assert len(found["audio"]) == 4
    assert all(a["error"] is None and a["duration"] == pytest.approx(2.0, abs=0.01) for a in found["audio"]), found["audio"]


def test_quality_speed_plot_takes_a_curve_whose_mean_is_outside_its_ends(tmp_path: Path) -> None:
    """A FAD curve that peaks mid-stream (mean above both the first and the last window) once made the error bar
    negative and the whole report fail."""
    from lmdm.eval.report import plot_quality_speed

    result = {"engines": {"a": {"drift": {"fad": {"curve": [1.0, 3.0, 1.0]}}, "speed": {"rtf": 2.0}}}}
    assert plot_quality_speed(result, tmp_path / "q.png", "t").read_bytes()[:4] == b"\x89PNG"
