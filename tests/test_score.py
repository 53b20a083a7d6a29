"""`lmdm score` (lmdm.eval.score): figures against the held-out reference with the floors beside them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_config
from lmdm.audio.io import write_audio
from lmdm.config import Config
from lmdm.data.corpus import build_corpus
from lmdm.eval.crepe import CrepeEmbedder
from lmdm.eval.likeness import audio_stats
from lmdm.eval.score import audio_folder, held_out_reference, score_sets, training_clips

OVERRIDES = (
    "data.corpus.seed=5",
    "data.corpus.num_clips=6",
    "data.corpus.clip_seconds=5",
    "eval.reference_clips=2",
    "eval.likeness_clips=1",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """Seed 5: of clips 0–5, clips 2 and 4 are held out (the reference); 0, 1, 3 and 5 are the training split."""
    root = tmp_path_factory.mktemp("score") / "corpus"
    cfg = tiny_config(*OVERRIDES, f"data.root={root}")
    build_corpus(root, cfg.data.corpus, cfg.audio, cfg.data.frame_rate)
    return cfg


def test_the_floor_is_exact_and_noise_is_far_on_likeness(corpus: Config, tmp_path: Path) -> None:
    """Training clips scored as the evaluated set give exactly the training floor (one N, the same frames);
    noise is far brighter than the reference, the floor is not. (With a 2-clip reference, FAD itself cannot
    rank noise against other music: the note of issue 18 has the figures on a 35-clip reference.)"""
    reference, floor = held_out_reference(corpus), training_clips(corpus, 4.0)
    assert len(reference.clips) == 2 and floor.seconds == pytest.approx(4.0) and not set(floor.files) & set(reference.files)
    rng = np.random.default_rng(0)
    sets = {"same": floor.clips, "noise": [rng.standard_normal((1, 4 * 16000)) * 0.2]}
    for name, clips in sets.items():
        (tmp_path / name).mkdir()
        for i, audio in enumerate(clips):
            write_audio(tmp_path / name / f"{i}.wav", np.asarray(audio, dtype=np.float32), 16000, subtype="FLOAT")
    crepe = CrepeEmbedder(hop_s=0.01)  # 100 frames a second: 1000 reference frames, well above CREPE's 256 dimensions
    stats = audio_stats(reference.clips, 16000)  # pyin once
    result = {
        name: score_sets(
            audio_folder(tmp_path / name, corpus), reference, [floor], crepe, None, reference_stats=stats, with_likeness=name == "noise"
        )
        for name in sets
    }
    assert result["same"]["fad"]["evaluated"] == pytest.approx(result["same"]["fad"]["floor_training"], rel=1e-9)  # the very same audio
    noise = result["noise"]["likeness"]
    assert noise["evaluated"]["brightness_mean_diff_hz"] > 5 * noise["floor_training"]["brightness_mean_diff_hz"]
    assert result["noise"]["fad"]["frames"] == 401 and set(result["noise"]["fad"]["per_clip"]) == {"0.wav"}
    assert result["noise"]["fad"]["fad_inf"] is None and "frames" in result["noise"]["fad"]["fad_inf_note"]


def test_the_reconstructed_floor_and_the_cli_json(corpus: Config, tmp_path: Path) -> None:
    from lmdm.builders import build_autoencoder_from
    from lmdm.checkpoints.format import TrainedWith, save_checkpoint
    from lmdm.pipelines.cli import app

    small_vae = ("autoencoder.channels=4", "autoencoder.latent_channels=4", "autoencoder.strides=[2,4]", "autoencoder.channel_mults=[1,2]")
    cfg = tiny_config(*OVERRIDES, f"data.root={corpus.data.root}", *small_vae)
    vae = build_autoencoder_from(cfg)
    folder = tmp_path / "stream"
    folder.mkdir()
    write_audio(folder / "s.wav", training_clips(cfg, 3.0).clips[0], 16000, subtype="FLOAT")
    save_checkpoint(tmp_path / "vae", vae, {}, TrainedWith(stage="autoencoder"))
    out = tmp_path / "score.json"
    overrides = [*OVERRIDES, f"data.root={corpus.data.root}", *small_vae]
    run = CliRunner().invoke(
        app,
        [
            "score",
            "--audio",
            str(folder),
            "--autoencoder",
            str(tmp_path / "vae"),
            "--text-embedder",
            "none",
            "--json",
            str(out),
            *overrides,
        ],
    )
    assert run.exit_code == 0, run.output
    figures = json.loads(out.read_text())
    assert {"evaluated", "floor_training", "floor_reconstructed"} <= set(figures["fad"]) and "clap" not in figures
    assert figures["fad"]["evaluated"] == pytest.approx(figures["fad"]["floor_training"]) and "FAD (crepe-tiny" in run.output
    assert figures["likeness"]["floor_reconstructed"]["loudness_mean_diff_db"] > 0
    bad = CliRunner().invoke(app, ["score", "--audio", str(tmp_path / "absent"), *overrides])
    assert bad.exit_code == 1 and "no such folder" in bad.output


def test_score_a_dits_streams_under_held_out_captions(corpus: Config, tmp_path: Path) -> None:
    """`lmdm score --dit --autoencoder`: eval.num_streams streams, each under a held-out caption, scored with
    the built-in embedder's CLAP score; the DiT is checked against the autoencoder as `lmdm generate` does."""
    from lmdm.builders import build_autoencoder_from, build_dit
    from lmdm.checkpoints.format import TrainedWith, file_sha256, save_checkpoint
    from lmdm.pipelines.cli import app
    from lmdm.text.encoders import build_text_encoder

    small = ("autoencoder.channels=4", "autoencoder.latent_channels=4", "autoencoder.strides=[2,4]", "autoencoder.channel_mults=[1,2]",
             "dit.width=64", "dit.depth=1", "dit.head_dim=32", "dit.project_cond_tokens=true", "stream.block_frames=8", "stream.context_blocks=2", "stream.steps=2",
             "eval.num_streams=2", "eval.stream_seconds=1.5")  # fmt: skip
    overrides = [*OVERRIDES, f"data.root={corpus.data.root}", *small]
    cfg = tiny_config(*overrides)
    save_checkpoint(tmp_path / "vae", build_autoencoder_from(cfg), {}, TrainedWith(stage="autoencoder"))
    trained = TrainedWith(stage="lmdm", objective=cfg.dit.objective, variant="block_causal", block_frames=8, context_blocks=2,
                          autoencoder=file_sha256(tmp_path / "vae" / "model.safetensors"), text_encoder=build_text_encoder(cfg).fingerprint())  # fmt: skip
    save_checkpoint(tmp_path / "dit", build_dit(cfg), {}, trained)
    out = tmp_path / "score.json"
    args = ["score", "--dit", str(tmp_path / "dit"), "--autoencoder", str(tmp_path / "vae"), "--json", str(out), *overrides]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    figures = json.loads(out.read_text())
    assert figures["evaluated"]["clips"] == 2 and figures["evaluated"]["seconds"] == pytest.approx(3.0)
    assert figures["clap"]["embedder"] == "builtin:embedder" and -1 <= figures["clap"]["evaluated"] <= 1
    other = CliRunner().invoke(app, [*args[:4], str(tmp_path / "dit"), *overrides])  # a DiT is not an autoencoder
    assert other.exit_code == 1 and "error" in other.output


def test_a_small_corpus_reference_grows_with_held_out_clips_rendered_past_it(corpus: Config) -> None:
    """eval.reference_clips: held-out clips of the same seed past the corpus's last index are rendered once into
    <data.root>-reference/ (clips no corpus of that seed trains on) and reused."""
    from lmdm.data.split import is_held_out

    said: list[str] = []
    grown = held_out_reference(corpus, min_clips=3, progress=said.append)
    extra = Path(corpus.data.root).with_name(Path(corpus.data.root).name + "-reference")
    indices = [int(Path(f).stem.split("_")[1]) for f in grown.files]
    assert len(grown.clips) == 3 and indices[:2] == [2, 4] and indices[2] >= 6 and all(is_held_out(5, i) for i in indices)
    assert len(said) == 1 and (extra / grown.files[2]).is_file() and grown.prompts[2]
    again: list[str] = []
    assert held_out_reference(corpus, min_clips=3, progress=again.append).files == grown.files and not again


def test_score_and_ship_refuse_bad_arguments(tmp_path: Path) -> None:
    from lmdm.pipelines.cli import app

    neither = CliRunner().invoke(app, ["score"])
    both = CliRunner().invoke(app, ["score", "--audio", str(tmp_path), "--dit", str(tmp_path)])
    assert neither.exit_code == both.exit_code == 2 and "give --audio FOLDER or --dit CHECKPOINT" in neither.output
    (tmp_path / "card.md").write_text("# card\n")
    ship = CliRunner().invoke(app, ["ship", "x", "--checkpoint", str(tmp_path), "--card", str(tmp_path / "card.md")])
    assert ship.exit_code == 1 and "not a checkpoint folder (missing model.safetensors, config.json)" in ship.output
