"""`lmdm eval` end to end on tiny models (outpainting, block-causal and encdec engines): Ray actor pool, resume after a killed actor and after a stopped driver,
MLflow runs (a child per engine, metrics stepped by window), the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console
from typer.testing import CliRunner

from lmdm.builders import build_autoencoder_from, build_dit
from lmdm.checkpoints.format import TrainedWith, save_checkpoint
from lmdm.config import Config
from lmdm.data.corpus import CorpusSummary

TINY = [
    "autoencoder.latent_channels=4",
    "autoencoder.channels=4",
    "dit.width=64",
    "dit.project_cond_tokens=true",
    "dit.depth=1",
    "dit.head_dim=32",
    "stream.block_frames=8",
    "stream.context_blocks=1",
    "stream.steps=2",
    "eval.rollouts=2",
    "eval.rollout_seconds=4",
    "eval.window_seconds=2",
    "eval.bootstrap=50",
    "eval.reference_clips=2",
    "eval.likeness_clips=1",
    "eval.actors=2",
]


@pytest.fixture
def models(tiny_corpus: tuple[Config, CorpusSummary], tmp_path: Path) -> tuple[Config, dict[str, Path]]:
    """Tiny checkpoints: an autoencoder, a base DiT (outpainting) and an LMDM (block-causal) on its latents."""
    from lmdm.config import load_config

    cfg = load_config("quickstart", [f"data.root={tiny_corpus[1].root}", *TINY, f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    cfg.eval.out = tmp_path / "eval"
    import torch

    torch.manual_seed(0)
    paths = {
        "autoencoder": save_checkpoint(tmp_path / "autoencoder", build_autoencoder_from(cfg), trained=TrainedWith(stage="autoencoder"))
    }
    paths["base"] = save_checkpoint(tmp_path / "base", build_dit(cfg), trained=TrainedWith(stage="base"))
    paths["lmdm"] = save_checkpoint(tmp_path / "lmdm", build_dit(cfg), trained=TrainedWith(stage="lmdm", variant="block_causal"))
    paths["encdec"] = save_checkpoint(tmp_path / "encdec", build_dit(cfg), trained=TrainedWith(stage="lmdm", variant="encdec"))
    return cfg, paths


def _cli_args(paths: dict[str, Path], tmp_path: Path) -> list[str]:
    return [
        "eval",
        "--engine",
        f"outpainting=outpainting:{paths['base']}",
        "--engine",
        f"lmdm=block_causal:{paths['lmdm']}",
        "--engine",
        f"encdec=encdec:{paths['encdec']}",
        "--autoencoder",
        str(paths["autoencoder"]),
        "--out",
        str(tmp_path / "eval"),
    ]


@pytest.mark.slow
def test_eval_resumes_after_a_killed_actor_and_a_stopped_driver_then_logs_and_reports(
    models: tuple[Config, dict[str, Path]], tmp_path: Path, local_ray: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from lmdm.config import EvalEngine
    from lmdm.pipelines.cli import app
    from lmdm.pipelines.evaluate import EVAL_ACTOR_PREFIX, run_eval

    cfg, paths = models
    cfg.eval.engines = [
        EvalEngine(name="outpainting", variant="outpainting", dit=str(paths["base"])),
        EvalEngine(name="lmdm", variant="block_causal", dit=str(paths["lmdm"])),
        EvalEngine(name="encdec", variant="encdec", dit=str(paths["encdec"])),
    ]
    cfg.eval.autoencoder = str(paths["autoencoder"])
    rollouts = tmp_path / "eval" / "rollouts"

    class Stop(Exception):
        pass

    def stop_after_one(record: dict[str, Any]) -> None:
        raise Stop  # the driver goes away after the first finished rollout

    console = Console(quiet=True)
    with pytest.raises(Stop):
        run_eval(cfg, console, on_rollout=stop_after_one)
    finished = {p.parent: p.stat().st_mtime_ns for p in rollouts.glob("*/*/rollout.json")}
    assert len(finished) >= 1

    killed: list[str] = []

    def kill_an_actor(record: dict[str, Any]) -> None:
        if not killed:  # from outside: the other actor, mid-rollout; Ray restarts it and retries that rollout
            run, index = record["actor"].rsplit("-", 1)
            assert run.startswith(EVAL_ACTOR_PREFIX)
            name = f"{run}-{1 - int(index)}"
            ray.kill(ray.get_actor(name), no_restart=False)
            killed.append(name)

    result = run_eval(cfg, console, on_rollout=kill_an_actor)
    assert killed and result["rollouts_run"] == 6 - len(finished) and result["rollouts_reused"] == len(finished)
    for folder, mtime in finished.items():  # finished rollouts were not redone
        assert (folder / "rollout.json").stat().st_mtime_ns == mtime

    # the figures: every metric per window, drift summaries, speed
    for name in ("outpainting", "lmdm", "encdec"):
        figures = result["engines"][name]
        assert figures["rollouts"] == 2 and figures["windows"] == 2
        assert set(figures["drift"]) >= {"fad", "clap", "pitch_class_l1", "onset_rate_log_ratio"}
        assert figures["drift"]["fad"]["curve"][0] > 0 and figures["speed"]["ms_per_block"] > 0

    # MLflow: a parent run, a child per engine with the same metric keys, per-window metrics stepped by window
    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_id == result["mlflow_run_id"])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"eval/outpainting", "eval/lmdm", "eval/encdec"}
    keys = [set(r.data.metrics) for r in children.values()]
    assert (
        keys[0] == keys[1] == keys[2]
        and {"by_window/fad", "by_window/clap", "speed/rtf", "speed/ms_per_block", "drift/fad.last_over_first"} <= keys[0]
    )
    history = client.get_metric_history(children["eval/lmdm"].info.run_id, "by_window/fad")
    assert sorted(m.step for m in history) == [0, 1]
    assert children["eval/lmdm"].data.params["engine.variant"] == "block_causal"
    artifacts = {a.path for a in client.list_artifacts(children["eval/lmdm"].info.run_id, "audio")}
    assert artifacts == {"audio/lmdm-first.wav", "audio/lmdm-last.wav"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {"report/report.html", "report/report.md"}
    assert "workflowType=machine_learning" in result["mlflow_link"] and "compareRunsMode=CHART" in result["mlflow_link"]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["mlflow_run_id"] == parent.info.run_id
    assert "| lmdm | fad |" in (tmp_path / "eval" / "report.md").read_text()

    # the command line, rerun: everything is finished, nothing runs again
    monkeypatch.chdir(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in rollouts.glob("*/*/rollout.json")}
    args = [*_cli_args(paths, tmp_path), f"data.root={cfg.data.root}", *TINY, f"tracking.tracking_uri={cfg.tracking.tracking_uri}"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "6 finished earlier, 0 to run" in out.output and "report.html" in out.output
    assert {p: p.stat().st_mtime_ns for p in rollouts.glob("*/*/rollout.json")} == before and len(before) == 6


def test_eval_refuses_a_base_as_an_lmdm_before_any_rollout(models: tuple[Config, dict[str, Path]], tmp_path: Path) -> None:
    from lmdm.pipelines.cli import app

    cfg, paths = models
    args = ["eval", "--engine", f"x=block_causal:{paths['base']}", "--autoencoder", str(paths["autoencoder"]), "--out", str(tmp_path / "e")]
    out = CliRunner().invoke(app, [*args, f"data.root={cfg.data.root}", *TINY])
    assert out.exit_code == 1 and "bidirectional base model" in out.output
    bad = CliRunner().invoke(app, ["eval", "--engine", "lmdm:block_causal"])
    assert bad.exit_code == 2 and "NAME=VARIANT[@STEPS]:CHECKPOINT" in bad.output.replace("\n", "")
    misspelt = CliRunner().invoke(app, ["eval", "retreival"])
    assert misspelt.exit_code == 2 and "No such command" in misspelt.output
    assert not (tmp_path / "e" / "rollouts").exists()


def test_an_engine_may_stream_at_its_own_steps(models: tuple[Config, dict[str, Path]]) -> None:
    """``NAME=VARIANT@STEPS:CHECKPOINT`` (an ARC-Forced LMDM at 4 steps beside one at 8): the steps reach the
    engine the rollout builds and its fingerprint (a rollout at other steps is not reused)."""
    from lmdm.config import EvalEngine
    from lmdm.eval.rollouts import RolloutRunner
    from lmdm.pipelines.cli import _engine_option
    from lmdm.pipelines.evaluate import _fingerprint, _tasks

    cfg, paths = models
    assert _engine_option(f"arc=block_causal@4:{paths['lmdm']}") == {
        "name": "arc",
        "variant": "block_causal",
        "dit": str(paths["lmdm"]),
        "steps": 4,
    }
    assert "steps" not in _engine_option(f"tf=block_causal:{paths['lmdm']}")
    few, default = (EvalEngine(name=n, variant="block_causal", dit=str(paths["lmdm"]), steps=s) for n, s in (("arc", 4), ("tf", None)))
    assert _fingerprint(cfg, few, paths["autoencoder"], None, 0) != _fingerprint(cfg, default, paths["autoencoder"], None, 0)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"text_embedder": None})})
    runner = RolloutRunner(cfg)
    for task, steps in zip(
        _tasks(cfg, [few, default], paths["autoencoder"], [None, None], Path("unused")), [4, 4, None, None], strict=True
    ):
        engine = runner._models_for(task)[0]
        assert task.steps == steps and engine.core.sampling.steps == (steps or cfg.stream.steps)


def test_a_rollout_rewritten_halfway_is_not_taken_for_the_finished_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old rollout.json goes before any new file is written: a rewrite killed halfway leaves no finished rollout
    whose record would vouch for the new audio and frames."""
    import numpy as np

    from lmdm.eval import rollouts
    from lmdm.eval.rollouts import RolloutOutput, finished_rollout, load_window_frames, write_rollout

    def output(fingerprint: str, value: float) -> RolloutOutput:
        record = {"folder": str(tmp_path / "r"), "fingerprint": fingerprint, "windows": 2}
        return RolloutOutput(record, np.full((1, 1600), value, np.float32), [np.full((3, 4), value, np.float32)] * 2)

    write_rollout(output("A", 0.1), 16000)
    assert finished_rollout(tmp_path / "r", "A") is not None
    assert float(load_window_frames(tmp_path / "r")[1][0, 0]) == pytest.approx(0.1)

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # the driver stops between the audio and the frames

    monkeypatch.setattr(rollouts.np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        write_rollout(output("B", 0.5), 16000)
    assert finished_rollout(tmp_path / "r", "A") is None and finished_rollout(tmp_path / "r", "B") is None


def test_an_lmm_is_an_eval_engine(models: tuple[Config, dict[str, Path]], tmp_path: Path) -> None:
    """The LMM baseline joins `lmdm eval` as an engine variant: checked before any rollout (its kind against the
    variant asked for), and rolled out, decoded and measured by the same runner as the LMDM."""
    import torch

    from lmdm.builders import build_lmm
    from lmdm.checkpoints.errors import CheckpointError
    from lmdm.config import EvalEngine
    from lmdm.eval.rollouts import RolloutRunner
    from lmdm.pipelines.evaluate import _check_engines, _tasks

    cfg, paths = models
    small = {"width": 64, "depth": 1, "head_dim": 32, "embed_dim": 8}
    cfg = cfg.model_copy(
        update={
            "rvq": cfg.rvq.model_copy(update={"levels": 2, "codes": 16}),
            "lmm": cfg.lmm.model_copy(update={"flat": cfg.lmm.flat.model_copy(update=small)}),
        }
    )
    torch.manual_seed(0)
    lmm = build_lmm(cfg, "flat")
    lmm.rvq.codebooks.normal_()
    folder = save_checkpoint(tmp_path / "lmm", lmm, trained=TrainedWith(stage="lmm", variant="flat"))
    engine = EvalEngine(name="lmm", variant="flat", dit=str(folder))
    _check_engines(cfg, [engine], paths["autoencoder"])
    with pytest.raises(CheckpointError, match=r"engine lmm-as-framewise: .* is a flat LMM, not framewise"):
        _check_engines(cfg, [EvalEngine(name="lmm-as-framewise", variant="framewise", dit=str(folder))], paths["autoencoder"])
    (task,) = _tasks(
        cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"rollouts": 1})}),
        [engine],
        paths["autoencoder"],
        ["a fugue for organ"],
        tmp_path / "eval",
    )
    out = RolloutRunner(cfg, threads=1).run(task)
    assert out.audio.shape == (1, 4 * cfg.audio.sample_rate) and len(out.frames) == 2
    assert out.record["variant"] == "flat" and len(out.record["dit_s"]) == out.record["blocks"]
