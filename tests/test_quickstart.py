"""The quickstart chain end to end (`lmdm quickstart --quick`), as a new user runs it: local Ray, local
MLflow, the built-in corpus; checks every stage's outputs exist and MLflow has the nested runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from lmdm.pipelines.cli import app

pytestmark = pytest.mark.slow


_TINY = [
    "data.corpus.num_clips=8",
    "data.corpus.seed=5",  # holds out clips 2 and 4 of 8: the reference
    "train.batch_size=3",  # 6 training clips, 3 chunks per worker: one batch each
    "quickstart.autoencoder_steps=4",
    "quickstart.base_steps=4",
    "quickstart.lmdm_steps=4",
    "quickstart.stream_seconds=8",
    "quickstart.likeness_clips=2",
    "quickstart.rvq_steps=2",  # the LMM baseline's stages: the chain, not the training (nor the Magenta-sized RVQ)
    "rvq.levels=4",
    "rvq.codes=64",
    "quickstart.lmm_steps=2",
    "quickstart.lmm_stream_seconds=2",
    "quickstart.arc_steps=2",  # the ARC stage: the chain (precompute of longer chunks, two steps, its eval engine)
    "arc.sample_blocks=2",  # its MLflow audio sample: 2 blocks, not 8
    "eval.reference_clips=2",
    "eval.rollouts=2",  # the eval stage: 2 rollouts of 4 s per engine, 2-s windows, on one actor
    "eval.rollout_seconds=4",
    "eval.window_seconds=2",
    "eval.actors=1",
    "eval.likeness_clips=2",
    "eval.bootstrap=50",
]


def test_quickstart_fine_tunes_the_shipped_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_ray: object) -> None:
    """The default chain: precompute with builtin:corpus-base's autoencoder, fine-tune its base DiT (the real
    shipped weights, hash-checked) into an LMDM, stream, score; no autoencoder or base stage runs."""
    from lmdm.checkpoints.builtin import builtin_path
    from lmdm.config import load_config

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["quickstart", "--quick", *_TINY])
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "quick"
    assert (out / "lmdm" / "model.safetensors").is_file() and not (out / "autoencoder").exists() and not (out / "base").exists()
    figures = json.loads((out / "quickstart.json").read_text())
    assert figures["base"] == "builtin:corpus-base" and set(figures["times_s"]) == {
        "corpus",
        "precompute",
        "lmdm",
        "arc",
        "lmm",
        "stream",
        "eval",
    }
    # the LMM baseline: its RVQ tokenizer (with its per-depth error), the flat LMM, and its stream beside the LMDM's
    from lmdm.checkpoints.format import read_checkpoint_info

    rvq, lmm = read_checkpoint_info(out / "rvq", "rvq"), read_checkpoint_info(out / "lmm-flat", "lmm")
    assert len(rvq.meta["depth_mse"]) == 4 and lmm.args["kind"] == "flat" and lmm.trained.rvq
    audio, rate = sf.read(figures["lmm_wav"])
    assert rate == 16000 and len(audio) == 2 * 16000 and abs(audio).max() > 0
    report = Path(figures["eval"]["report"]["html"])  # the chain ends with `lmdm eval` of the base (outpainting) and the LMDM
    assert report.is_file() and str(report) in result.output.replace("\n", "") and "workflowType=machine_learning" in result.output
    assert set(figures["eval"]["engines"]) == {"outpainting", "lmdm", "arc"}
    arc = read_checkpoint_info(out / "arc")  # ARC-Forced from the chain's LMDM, on its own longer latent chunks
    assert arc.trained.stage == "arc" and arc.meta["step"] == 2
    assert json.loads((out / "latents-arc" / "manifest.json").read_text())["latent"]["frames"] == 384
    assert figures["eval"]["engines"]["lmdm"]["drift"]["fad"]["verdict"] in ("drifts", "improves", "holds")
    assert figures["fad"]["stream"] > 0 and figures["likeness"]["trained"]["voiced_diff"] >= 0
    assert Path(figures["listening_png"]).read_bytes()[:4] == b"\x89PNG"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("quick").experiment_id])}
    assert runs["lmdm"].data.params["train.init"] == str(builtin_path("corpus-base/base").resolve())
    assert float(runs["lmdm"].data.params["train.lr"]) == load_config("quick").quickstart.lmdm_lr  # the fine-tune's own rate
    assert "autoencoder" not in runs and "base" not in runs
    assert {"train/g_loss", "train/d_acc_real", "train/d_acc_contrastive"} <= set(runs["arc"].data.metrics)
    assert [a.path for a in client.list_artifacts(runs["arc"].info.run_id, "samples")] == ["samples/real.wav", "samples/step_000002.wav"]
    assert runs["lmm"].data.params["lmm.tokenizer"] == str((out / "rvq").resolve()) and "train/loss" in runs["rvq"].data.metrics
    depth_curve = client.get_metric_history(runs["rvq"].info.run_id, "rvq/latent_mse")  # the RVQ's error, decoded figures too
    assert [m.step for m in depth_curve] == [1, 2, 4] and "rvq/mel_l1_db" in runs["rvq"].data.metrics
    assert runs["eval"].data.tags["mlflow.parentRunId"] == runs["quickstart"].info.run_id  # the eval nests in the chain's run
    assert runs["eval/lmdm"].data.tags["mlflow.parentRunId"] == runs["eval"].info.run_id


def test_quickstart_refuses_a_pair_that_does_not_fit_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["quickstart", "--quick", *_TINY, "dit.depth=2"])
    assert result.exit_code == 2 and "dit.depth: config 2, checkpoint 4" in result.output, result.output
    missing = CliRunner().invoke(app, ["quickstart", "--quick", f"quickstart.base={tmp_path}"])
    assert missing.exit_code == 2 and "not a pretrained pair" in missing.output and "--from-scratch" in missing.output
    assert not (tmp_path / "runs").exists()


def test_quickstart_from_scratch_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_ray: object) -> None:
    monkeypatch.chdir(tmp_path)
    # the chain, not the sizes; the eval stage is the fine-tune test's
    result = CliRunner().invoke(
        app,
        [
            "quickstart",
            "--quick",
            "--from-scratch",
            *_TINY,
            "dit.depth=1",
            "quickstart.eval=false",
            "quickstart.lmm=false",
            "quickstart.arc=false",
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "quick"
    for folder in ("autoencoder", "base", "lmdm"):
        assert (out / folder / "model.safetensors").is_file()
    assert (out / "stream.png").read_bytes()[:4] == b"\x89PNG"
    audio, rate = sf.read(out / "stream.wav")
    assert rate == 16000 and len(audio) == 8 * 16000
    figures = json.loads((out / "quickstart.json").read_text())
    assert set(figures["likeness"]) == {"trained", "untrained", "verdict"} and set(figures["times_s"]) == {
        "corpus",
        "autoencoder",
        "precompute",
        "base",
        "lmdm",
        "stream",
    }
    assert figures["eval"] is None and not (out / "eval").exists()
    trained = figures["likeness"]["trained"]
    assert trained["onset_rate_ratio"] >= 0 and trained["pitch_change_rate_ratio"] >= 0
    assert figures["fad"]["stream"] > 0 and figures["fad"]["floor_reconstructed"] > 0 and figures["reference"]["clips"] == 2
    assert "vs the held-out reference (2 clips)" in result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quick")
    assert experiment is not None
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"quickstart", "autoencoder", "precompute", "base", "lmdm"} <= set(runs)
    for stage in ("autoencoder", "precompute", "base", "lmdm"):  # every stage run carries its resolved config
        assert "train.steps" in runs[stage].data.params, stage
    assert runs["lmdm"].data.params["train.init"].endswith("base") and "checkpoint" in runs["lmdm"].data.tags
