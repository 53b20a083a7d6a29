"""Readers report every input they could not use (path and reason) and never crash the run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf

from lmdm.audio.io import AudioReadError, load_audio
from lmdm.data.readers import CaptionsError, ReadReport, iter_audio_folder, iter_hf_dataset, read_captions


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([x] * channels, axis=1).astype(np.float32)


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    root = tmp_path / "audio"
    (root / "sub").mkdir(parents=True)
    sf.write(root / "good.wav", tone(2.0, 44100, channels=2), 44100)
    sf.write(root / "sub" / "good.flac", tone(1.5, 16000), 16000)
    sf.write(root / "short.wav", tone(0.2, 16000), 16000)
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x10\x00\x00WAVEfmt garbage" + bytes(range(200)))
    (root / "empty.flac").write_bytes(b"")
    (root / "notes.txt").write_text("not audio, not considered")
    return root


def test_folder_yields_good_clips_and_reports_bad_ones(messy_folder: Path) -> None:
    captions = messy_folder.parent / "captions.csv"
    captions.write_text("file_name,caption\ngood.wav,a tone\nsub/good.flac,another tone\nmissing.wav,ghost\n")
    report = ReadReport()
    clips = list(iter_audio_folder(messy_folder, 16000, 1, report, captions=captions, min_seconds=1.0))
    assert [Path(c.source).name for c in clips] == ["good.wav", "good.flac"]
    assert clips[0].audio.shape == (1, 32000)  # 44.1 kHz stereo -> 16 kHz mono
    assert [c.caption for c in clips] == ["a tone", "another tone"]
    reasons = {Path(s.source).name: s.reason for s in report.skipped}
    assert set(reasons) == {"corrupt.wav", "empty.flac", "short.wav", "missing.wav"}
    assert reasons["corrupt.wav"].startswith("unreadable audio")
    assert reasons["empty.flac"] == "empty: the file is 0 bytes"
    assert reasons["short.wav"] == "too short: 0.20 s < min_seconds 1 s"
    assert "no such audio file" in reasons["missing.wav"]
    assert report.read == 2 and report.seconds == pytest.approx(3.5)
    assert json.loads(json.dumps(report.to_dict()))["skipped"][0]["reason"]


def test_resampling_keeps_pitch(messy_folder: Path) -> None:
    audio = load_audio(messy_folder / "good.wav", 16000, 1)[0]
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.fft.rfftfreq(audio.size, 1 / 16000)[spectrum.argmax()] == pytest.approx(440.0, abs=1.0)
    stereo = load_audio(messy_folder / "sub" / "good.flac", 22050, 2)
    assert stereo.shape == (2, int(1.5 * 22050))
    np.testing.assert_array_equal(stereo[0], stereo[1])


def test_zero_sample_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(AudioReadError, match="empty: the file holds no samples"):
        load_audio(path, 16000, 1)


def test_captions_jsonl_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "c.jsonl"
    good.write_text('{"file_name": "a.wav", "text": "x"}\n\n{"path": "b/c.wav", "caption": "y"}\n')
    assert read_captions(good) == {"a.wav": "x", "b/c.wav": "y"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file_name": "a.wav", "text": "x"}\n{oops\n')
    with pytest.raises(CaptionsError, match=r"bad.jsonl:2: not valid JSON"):
        read_captions(bad)
    cols = tmp_path / "cols.csv"
    cols.write_text("name,words\na.wav,x\n")
    with pytest.raises(CaptionsError, match=r"cols.csv:2: needs a file column .*found \['name', 'words'\]"):
        read_captions(cols)
    with pytest.raises(CaptionsError, match=r"must be \.csv or \.jsonl"):
        read_captions(tmp_path / "c.txt")


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_audio_folder(tmp_path / "nope", 16000, 1, ReadReport()))


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="WAV")
    return buffer.getvalue()


def test_hf_dataset_on_disk(tmp_path: Path) -> None:
    features = datasets.Features(
        {"audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}, "text": datasets.Value("string")}
    )
    rows = {
        "audio": [
            {"bytes": wav_bytes(tone(1.2, 22050), 22050), "path": "a.wav"},
            {"bytes": b"not audio at all", "path": "b.wav"},
            {"bytes": wav_bytes(tone(2.0, 16000), 16000), "path": "c.wav"},
        ],
        "text": ["first", "broken", "third"],
    }
    ds = datasets.Dataset.from_dict(rows, features=features).cast_column("audio", datasets.Audio(decode=False))
    ds.save_to_disk(str(tmp_path / "ds"))
    report = ReadReport()
    clips = list(iter_hf_dataset(tmp_path / "ds", 16000, 1, report, min_seconds=1.0))
    assert [c.caption for c in clips] == ["first", "third"]
    assert clips[0].audio.shape == (1, int(1.2 * 16000))
    assert [(s.source.endswith("[1]"), s.reason.startswith("unreadable audio")) for s in report.skipped] == [(True, True)]
    with pytest.raises(KeyError, match=r"no audio column 'sound'; columns are \['audio', 'text'\]"):
        list(iter_hf_dataset(tmp_path / "ds", 16000, 1, ReadReport(), audio_column="sound"))


def test_hf_dataset_with_arrays_and_paths(tmp_path: Path, messy_folder: Path) -> None:
    ds = datasets.Dataset.from_dict(
        {
            "audio": [
                {"array": tone(1.0, 8000)[:, 0].tolist(), "sampling_rate": 8000, "path": None},
                {"array": None, "sampling_rate": None, "path": str(messy_folder / "good.wav")},
            ],
            "caption": ["array", "path"],
        }
    )
    ds.save_to_disk(str(tmp_path / "ds2"))
    report = ReadReport()
    clips = list(iter_hf_dataset(tmp_path / "ds2", 16000, 1, report))
    assert [c.audio.shape for c in clips] == [(1, 16000), (1, 32000)]
    assert [c.caption for c in clips] == ["array", "path"]
