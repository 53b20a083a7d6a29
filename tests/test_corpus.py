"""The built-in corpus: deterministic, resumable, and its captions and curves tell the truth."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
from music21 import converter

from conftest import tiny_config
from lmdm.audio.features import loudness_db, spectral_centroid
from lmdm.audio.io import load_audio
from lmdm.config import Config
from lmdm.data.corpus import (
    CorpusExistsError,
    CorpusSummary,
    build_corpus,
    load_corpus_dataset,
    make_clip,
    read_corpus_metadata,
    score_f0,
)


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "corpus.json"}


def test_same_seed_same_bytes_any_worker_count(tmp_path: Path, tiny_corpus: tuple[Config, CorpusSummary]) -> None:
    cfg, summary = tiny_corpus
    corpus = cfg.data.corpus.model_copy(update={"workers": 2})
    again = build_corpus(tmp_path / "again", corpus, cfg.audio, cfg.data.frame_rate)
    assert not again.reused
    first, second = folder_bytes(summary.root), folder_bytes(again.root)
    assert sorted(first) == sorted(second)
    assert len([k for k in first if k.startswith("audio/")]) == 6
    assert first == second


def test_different_seeds_differ() -> None:
    cfg = tiny_config()
    a = make_clip(0, cfg.data.corpus, cfg.audio, cfg.data.frame_rate)
    b = make_clip(0, cfg.data.corpus.model_copy(update={"seed": 1}), cfg.audio, cfg.data.frame_rate)
    assert a.metadata["caption"] != b.metadata["caption"]
    assert not np.array_equal(a.audio, b.audio)


def test_clip_shapes_and_stereo() -> None:
    cfg = tiny_config("audio.channels=2", "audio.sample_rate=22050", "data.frame_rate=25")
    clip = make_clip(1, cfg.data.corpus, cfg.audio, cfg.data.frame_rate)
    assert clip.audio.shape == (2, 6 * 22050)
    assert clip.audio.dtype == np.float32
    assert 0.4 < np.abs(clip.audio).max() <= 0.9 + 1e-6
    frames = 6 * 22050 // (22050 // 25) + 1
    assert all(len(clip.metadata[k]) == frames for k in ("f0_hz", "loudness_db", "brightness_hz"))


def test_captions_state_true_facts(tiny_corpus: tuple[Config, CorpusSummary]) -> None:
    _cfg, summary = tiny_corpus
    rows = read_corpus_metadata(summary.root)
    assert any(r["solo"] for r in rows) and any(not r["solo"] for r in rows)
    for row in rows:
        midi_bytes = (summary.root / "midi" / f"{row['clip_id']}.mid").read_bytes()
        midi = pretty_midi.PrettyMIDI(io.BytesIO(midi_bytes))
        text = row["caption"]
        # Instruments: the MIDI's programs, top voice first, named in the caption.
        names = [pretty_midi.program_to_instrument_name(i.program).lower() for i in midi.instruments]
        assert names == row["instruments"]
        for name in set(names):
            assert name in text
        # Tempo: the MIDI tempo, as BPM in the caption.
        _, tempi = midi.get_tempo_changes()
        assert tempi.tolist() == pytest.approx([row["tempo_bpm"]], rel=1e-5)  # MIDI stores microseconds per beat
        assert f"at {row['tempo_bpm']} BPM" in text
        # Key: music21's own Krumhansl–Schmuckler analysis of the rendered MIDI agrees.
        key = converter.parse(io.BytesIO(midi_bytes).getvalue(), format="midi").analyze("krumhansl")
        tonic, mode = row["key"].split()
        assert mode == key.mode
        assert pretty_midi.note_name_to_number(tonic.replace("-flat", "b").replace("-sharp", "#") + "4") % 12 == key.tonic.pitchClass
        assert f"in {row['key']}." in text
        # Piece: the title is the corpus file's.
        assert text.startswith(row["title"])
        stem = row["piece_id"].split("/")[1].rsplit(".", 1)[0].removeprefix("bwv").removeprefix("madrigal.")
        assert stem.replace("_", " ") in row["title"]
        # Solo clips have one voice, ensembles several.
        if row["solo"]:
            assert len(midi.instruments) == 1
        assert all(inst.notes for inst in midi.instruments)


def test_f0_curve_is_the_top_sounding_note_of_the_midi(tiny_corpus: tuple[Config, CorpusSummary]) -> None:
    _cfg, summary = tiny_corpus
    for row in read_corpus_metadata(summary.root):
        midi = pretty_midi.PrettyMIDI(str(summary.root / "midi" / f"{row['clip_id']}.mid"))
        times = np.arange(len(row["f0_hz"])) / row["frame_rate"]
        expected = np.zeros_like(times)
        for inst in midi.instruments:
            for note in inst.notes:
                on = (times >= note.start - 1e-6) & (times < note.end - 1e-6)
                expected[on] = np.maximum(expected[on], pretty_midi.note_number_to_hz(note.pitch))
        np.testing.assert_allclose(row["f0_hz"], expected, rtol=1e-4, atol=1e-2)
        assert (np.array(row["f0_hz"]) > 0).mean() > 0.5


def test_score_f0_unit() -> None:
    times = np.arange(10) / 10.0
    voices = [np.array([[0.0, 0.3, 69.0], [0.5, 0.7, 81.0]]), np.array([[0.2, 0.6, 72.0]])]
    f0 = score_f0(voices, times)
    c5 = 440 * 2 ** (3 / 12)
    np.testing.assert_allclose(f0, [440, 440, c5, c5, c5, 880, 880, 0, 0, 0], rtol=1e-6)


def test_curves_match_recomputation_from_written_audio(tiny_corpus: tuple[Config, CorpusSummary]) -> None:
    cfg, summary = tiny_corpus
    for row in read_corpus_metadata(summary.root):
        audio = load_audio(summary.root / row["file_name"], cfg.audio.sample_rate, cfg.audio.channels)
        assert audio.shape[1] == int(row["seconds"] * row["sample_rate"])
        loud = loudness_db(audio, row["sample_rate"], row["frame_rate"])
        bright = spectral_centroid(audio, row["sample_rate"], row["frame_rate"])
        stored_loud, stored_bright = np.array(row["loudness_db"]), np.array(row["brightness_hz"])
        audible = stored_loud > -70  # 16-bit FLAC quantisation noise sits near -100 dB
        assert audible.mean() > 0.3
        np.testing.assert_allclose(loud[audible], stored_loud[audible], atol=0.05)
        loud_enough = stored_loud > -40
        np.testing.assert_allclose(bright[loud_enough], stored_bright[loud_enough], rtol=0.02, atol=1.0)


def test_existing_corpus_is_reused_or_refused(tmp_path: Path, tiny_corpus: tuple[Config, CorpusSummary]) -> None:
    cfg, summary = tiny_corpus
    calls: list[tuple[int, int]] = []
    again = build_corpus(summary.root, cfg.data.corpus, cfg.audio, cfg.data.frame_rate, progress=lambda d, t: calls.append((d, t)))
    assert again.reused and again.num_clips == 6
    assert calls == [(6, 6)]  # a reused corpus shows a full progress bar, not 0/6
    other = cfg.data.corpus.model_copy(update={"seed": 5})
    with pytest.raises(CorpusExistsError, match=r"built with other settings.*--force"):
        build_corpus(summary.root, other, cfg.audio, cfg.data.frame_rate)


def test_interrupted_build_resumes_to_the_same_bytes(tmp_path: Path, tiny_corpus: tuple[Config, CorpusSummary]) -> None:
    cfg, summary = tiny_corpus
    root = tmp_path / "corpus"

    class Stop(Exception):
        pass

    def stop_after_three(done: int, total: int) -> None:
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        build_corpus(root, cfg.data.corpus, cfg.audio, cfg.data.frame_rate, progress=stop_after_three)
    assert not root.exists()
    partial = root.with_name("corpus.partial")
    assert len(list((partial / "rows").glob("*.json"))) == 3
    seen: list[int] = []
    resumed = build_corpus(root, cfg.data.corpus, cfg.audio, cfg.data.frame_rate, progress=lambda d, t: seen.append(d))
    assert seen[0] == 3 and seen[-1] == 6  # only the missing clips were rendered
    assert not partial.exists()
    assert folder_bytes(resumed.root) == folder_bytes(summary.root)


def test_datasets_loads_the_corpus(tiny_corpus: tuple[Config, CorpusSummary]) -> None:
    _, summary = tiny_corpus
    ds = load_corpus_dataset(summary.root)
    assert ds.num_rows == 6
    assert {"caption", "f0_hz", "loudness_db", "brightness_hz", "audio_path"} <= set(ds.column_names)
    assert Path(ds[0]["audio_path"]).is_file()
    meta = json.loads((summary.root / "corpus.json").read_text())
    assert meta["num_clips"] == 6


def test_caption_sentence() -> None:
    from lmdm.data.captions import caption, key_name, tempo_word

    assert [tempo_word(b) for b in (60, 66, 67, 88, 100, 132, 133)] == [
        "adagio",
        "adagio",
        "andante",
        "andante",
        "moderato",
        "allegro",
        "presto",
    ]
    assert key_name(10, "major") == "B-flat major" and key_name(8, "minor") == "G-sharp minor"
    text = caption("Bach chorale BWV 358", "plucked", ["orchestral harp", "acoustic bass"], 103, "B minor", solo=False)
    assert text == "Bach chorale BWV 358, for plucked strings (orchestral harp, acoustic bass), moderato at 103 BPM, in B minor."
    solo = caption("Bach chorale BWV 358", "strings", ["violin"], 103, "B minor", solo=True)
    assert solo == "Bach chorale BWV 358, melody alone on violin, moderato at 103 BPM, in B minor."
