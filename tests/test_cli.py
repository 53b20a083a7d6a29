"""The ``lmdm`` command line, run in-process with typer's runner and as the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmdm.pipelines.cli import app

runner = CliRunner()
TINY = ["data.corpus.num_clips=3", "data.corpus.clip_seconds=4", "data.corpus.workers=1"]


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("quickstart", "config", "data"):
        assert command in result.output


def test_config_show_prints_resolved_yaml() -> None:
    result = runner.invoke(app, ["config", "show", "quickstart", "train.steps=12"])
    assert result.exit_code == 0, result.output
    assert "steps: 12" in result.output
    assert "sample_rate: 16000" in result.output


def test_config_error_exit_code_and_message() -> None:
    result = runner.invoke(app, ["config", "show", "quickstart", "audio.channels=5"])
    assert result.exit_code == 2
    assert "override 'audio.channels=5': audio.channels: got 5: Input should be 1 or 2" in result.output


def test_data_build_and_scan(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    result = runner.invoke(app, ["data", "build", *TINY, f"data.root={root}"])
    assert result.exit_code == 0, result.output
    assert "clips" in result.output and len(list((root / "audio").glob("*.flac"))) == 3
    again = runner.invoke(app, ["data", "build", *TINY, f"data.root={root}", "data.corpus.seed=3"])
    assert again.exit_code == 1 and "built with other settings" in again.output
    (root / "audio" / "broken.wav").write_bytes(b"junk")
    report = tmp_path / "report.json"
    scan = runner.invoke(app, ["data", "scan", str(root / "audio"), "--json", str(report)])
    assert scan.exit_code == 0, scan.output
    data = json.loads(report.read_text())
    assert data["read"] == 3 and data["skipped"][0]["source"].endswith("broken.wav")


@pytest.mark.slow
def test_console_script(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).parent / "lmdm")  # the script installed beside this interpreter
    assert Path(exe).is_file(), f"the lmdm console script is not installed at {exe}"
    out = subprocess.run([exe, "config", "show", "quick"], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert "name: quick" in out.stdout
    scan = subprocess.run([exe, "data", "scan", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert "read 0 clips" in scan.stdout
