"""`lmdm precompute` with real Ray Data on a small corpus: exact latents, resume, skipped inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from conftest import alive_actor_pids, tiny_config
from lmdm.audio.io import load_audio
from lmdm.checkpoints.format import save_checkpoint
from lmdm.config import Config
from lmdm.data.corpus import CorpusSummary
from lmdm.models.autoencoder import OobleckVAE
from lmdm.pipelines.precompute import PrecomputeMismatchError, run_precompute

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ae") / "autoencoder", OobleckVAE(1, 4, [1, 2], [2, 4], 4))


def rows(out: Path) -> list[dict[str, object]]:
    return [r for f in sorted(out.glob("shard_*.parquet")) for r in pq.read_table(f).to_pylist()]


def corpus_cfg(summary: CorpusSummary, out: Path, *more: str) -> Config:
    return tiny_config(
        f"data.root={summary.root}", f"precompute.out={out}", "precompute.chunk_frames=4000", "precompute.shard_inputs=2", *more
    )


def test_shards_hold_exact_latents_and_curves(
    tmp_path: Path, local_ray: object, vae_dir: Path, tiny_corpus: tuple[Config, CorpusSummary]
) -> None:
    _, summary = tiny_corpus
    cfg = corpus_cfg(summary, tmp_path / "latents")
    result = run_precompute(cfg, vae_dir)
    assert result.inputs == 6 and result.chunks == 6 * 3 and not result.skipped  # 6-s clips, 2-s chunks
    table = rows(tmp_path / "latents")
    assert sorted((r["input_index"], r["chunk"]) for r in table) == [(i, c) for i in range(6) for c in range(3)]
    torch.manual_seed(0)
    vae = OobleckVAE(1, 4, [1, 2], [2, 4], 4).eval()  # the same weights as the checkpoint
    row = next(r for r in table if r["input_index"] == 1 and r["chunk"] == 2)
    audio = load_audio(summary.root / "audio" / "clip_00001.flac", 16000, 1)[:, 2 * 32000 : 3 * 32000]
    with torch.no_grad():
        direct = vae.encode(torch.from_numpy(audio)[None])
    np.testing.assert_allclose(np.array(row["latent_mean"]).reshape(4, 4000), direct.mean[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(row["latent_std"]).reshape(4, 4000), direct.std[0].numpy(), rtol=1e-5, atol=1e-6)
    assert len(row["f0_hz"]) == 4000 and len(row["loudness_db"]) == 4000
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 6, "chunks": 18, "skipped": 0, "shards": 3}
    assert len(manifest["autoencoder_sha256"]) == 64 and manifest["text_encoder"]["kind"] == "minilm"
    text = pq.read_table(tmp_path / "latents" / "text_embeddings.parquet").to_pylist()
    assert {t["caption"] for t in text} >= {r["caption"] for r in table}
    assert len(text[0]["tokens"]) == 64 * 384


def test_interrupted_run_completes_without_duplicates_or_gaps(
    tmp_path: Path, local_ray: object, vae_dir: Path, tiny_corpus: tuple[Config, CorpusSummary]
) -> None:
    _, summary = tiny_corpus
    cfg = corpus_cfg(summary, tmp_path / "latents")
    first = run_precompute(cfg, vae_dir, stop_after_shards=1)
    assert first.shards_written == 1 and len(list((tmp_path / "latents").glob("shard_*.json"))) == 1
    second = run_precompute(cfg, vae_dir)
    assert second.shards_reused == 1 and second.shards_written == 2
    keys = [(r["input_index"], r["chunk"]) for r in rows(tmp_path / "latents")]
    assert sorted(keys) == [(i, c) for i in range(6) for c in range(3)] and len(keys) == len(set(keys))
    other = corpus_cfg(summary, tmp_path / "latents", "precompute.chunk_frames=2000")
    with pytest.raises(PrecomputeMismatchError, match="differs in: chunk_frames"):
        run_precompute(other, vae_dir)


def test_corrupt_input_is_listed_in_the_manifest(tmp_path: Path, local_ray: object, vae_dir: Path) -> None:
    folder = tmp_path / "audio"
    folder.mkdir()
    t = np.arange(32000) / 16000
    sf.write(folder / "a.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    (folder / "b.wav").write_bytes(b"RIFF garbage")
    sf.write(folder / "c.wav", np.zeros(4000, np.float32), 16000)
    cfg = tiny_config("data.source=folder", f"data.path={folder}", f"precompute.out={tmp_path / 'latents'}", "precompute.chunk_frames=1000")
    result = run_precompute(cfg, vae_dir)
    reasons = {s["input_id"]: s["reason"] for s in result.skipped}
    assert set(reasons) == {"b.wav", "c.wav"}
    assert reasons["b.wav"].startswith("unreadable audio") and reasons["c.wav"].startswith("too short")
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert {s["input_id"] for s in manifest["skipped"]} == {"b.wav", "c.wav"}
    assert result.chunks == 4


ENCODER_ACTOR = "MapWorker(MapBatches(_Encoder))"  # Ray Data's actor class name for precompute's encoder pool


def test_an_encoder_actor_killed_with_sigkill_loses_no_shard(
    tmp_path: Path, local_ray: object, vae_dir: Path, tiny_corpus: tuple[Config, CorpusSummary]
) -> None:
    """A real fault: an encoder actor is SIGKILLed from outside while shards are being written; Ray Data
    restarts it and retries its batch, and every shard is written once with every chunk once."""
    import os
    import signal
    import threading
    import time

    _, summary = tiny_corpus
    out = tmp_path / "latents"
    cfg = corpus_cfg(summary, out, "precompute.shard_inputs=1", "precompute.batch_size=1")
    done: dict[str, object] = {}
    thread = threading.Thread(target=lambda: done.update(summary=run_precompute(cfg, vae_dir)))
    thread.start()
    killed: dict[str, int] = {}
    deadline = time.monotonic() + 120
    pids: list[int] = []
    while thread.is_alive() and not pids and time.monotonic() < deadline:  # the encoder's pid (a state-API call: slow)
        pids = alive_actor_pids(ENCODER_ACTOR)
    while thread.is_alive() and pids and not killed and time.monotonic() < deadline:  # then kill it once shard 0 is written
        if (out / "shard_00000.json").is_file():
            killed = {"pid": pids[0], "shards": len(list(out.glob("shard_*.json")))}
            os.kill(pids[0], signal.SIGKILL)
        time.sleep(0.005)
    thread.join(300)
    assert killed and killed["shards"] < 6, f"the run ended before the kill ({killed})"
    result = done["summary"]
    assert result.inputs == 6 and result.chunks == 18 and not result.skipped  # type: ignore[attr-defined]
    assert sorted(p.name for p in out.glob("shard_*.parquet")) == [f"shard_{k:05d}.parquet" for k in range(6)]
    assert sorted((r["input_index"], r["chunk"]) for r in rows(out)) == [(i, c) for i in range(6) for c in range(3)]
    assert killed["pid"] not in alive_actor_pids(ENCODER_ACTOR)


def test_held_out_clips_never_reach_training(tmp_path: Path, local_ray: object, vae_dir: Path) -> None:
    """The corpus' held-out reference (a pure function of seed and clip index) is recorded in the corpus and
    precompute manifests; precompute encodes only the training split, and the autoencoder stage's inputs are
    the training split too, so no held-out clip reaches a training batch."""
    from lmdm.data.chunks import list_inputs
    from lmdm.data.corpus import build_corpus
    from lmdm.data.split import held_out_indices

    cfg = tiny_config("data.corpus.seed=2", f"data.root={tmp_path / 'corpus'}", f"precompute.out={tmp_path / 'latents'}")
    assert held_out_indices(2, 4) == [2]  # seed 2 holds out clip 2 of the first four
    build_corpus(cfg.data.root, cfg.data.corpus, cfg.audio, cfg.data.frame_rate)
    recorded = json.loads((cfg.data.root / "corpus.json").read_text())["held_out"]
    assert recorded["clips"] == ["clip_00002"] and recorded["fraction"] == 0.1
    assert [r.input_id for r in list_inputs("corpus", cfg.data.root, split="held_out")] == ["clip_00002"]
    train = list_inputs("corpus", cfg.data.root, split="train")  # what the autoencoder stage reads (_audio_dataset)
    assert [r.input_id for r in train] == ["clip_00000", "clip_00001", "clip_00003"] and [r.index for r in train] == [0, 1, 2]
    run_precompute(cfg, vae_dir)
    assert {r["input_id"] for r in rows(tmp_path / "latents")} == {"clip_00000", "clip_00001", "clip_00003"}
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["held_out"] == ["clip_00002"] and manifest["counts"]["inputs"] == 3
    assert "max_inputs" not in manifest  # a folder made before the option existed stays valid
    subset = tiny_config(
        "data.corpus.seed=2", f"data.root={tmp_path / 'corpus'}", f"precompute.out={tmp_path / 'subset'}", "precompute.max_inputs=2"
    )
    run_precompute(subset, vae_dir)  # the first N training inputs only (the quickstart's ARC stage encodes a subset)
    assert {r["input_id"] for r in rows(tmp_path / "subset")} == {"clip_00000", "clip_00001"}
    assert json.loads((tmp_path / "subset" / "manifest.json").read_text())["max_inputs"] == 2


def test_the_split_is_a_pure_function_of_seed_and_index() -> None:
    from lmdm.data.split import held_out_indices, is_held_out

    small, large = held_out_indices(0, 48), held_out_indices(0, 5000)
    assert small == [i for i in large if i < 48]  # a larger corpus holds out the same clips, and more
    assert 0.08 < len(large) / 5000 < 0.12  # about HELD_OUT_FRACTION
    assert held_out_indices(0, 300) != held_out_indices(1, 300) and is_held_out(0, 15) and not is_held_out(0, 14)


def test_the_quickstart_re_encodes_its_own_latents_from_an_older_request(
    tmp_path: Path, local_ray: object, vae_dir: Path, tiny_corpus: tuple[Config, CorpusSummary]
) -> None:
    """Latents in the quickstart's own folder from another request (e.g. precompute format 1, made before the
    held-out split) are encoded again there; `lmdm precompute` into a user's folder refuses them instead."""
    from rich.console import Console

    from lmdm.pipelines.quickstart import precompute_into_own_folder

    _, summary = tiny_corpus
    cfg = corpus_cfg(summary, tmp_path / "latents")
    (tmp_path / "latents").mkdir()
    (tmp_path / "latents" / "request.json").write_text(json.dumps({"format": 1}))
    (tmp_path / "latents" / "shard_00000.json").write_text("{}")  # an old shard, not to be reused
    with pytest.raises(PrecomputeMismatchError, match="differs in: "):
        run_precompute(cfg, vae_dir)
    console = Console(record=True, width=200)
    result = precompute_into_own_folder(cfg, vae_dir, console)
    assert "holds latents from an earlier request: encoding them again" in console.export_text()
    assert result.inputs == 6 and result.chunks == 18 and result.shards_reused == 0
