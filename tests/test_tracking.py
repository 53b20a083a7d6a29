"""MLflow tracking on a real local SQLite store: runs, nested runs, params, metrics, artifacts."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lmdm.config import load_config
from lmdm.eval.tracking import flatten, mlflow_run, ui_command


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}


def test_runs_nested_runs_params_metrics_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    cfg = load_config("quickstart", [f"tracking.tracking_uri={uri}", "train.steps=3"])
    with mlflow_run(cfg, "quickstart") as parent, mlflow_run(cfg, "base", nested=True, params=False) as child:
        for step in range(3):
            mlflow.log_metric("train/loss", 1.0 / (step + 1), step=step)
        note = tmp_path / "note.txt"
        note.write_text("sample")
        mlflow.log_artifact(str(note), "samples")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"quickstart", "base"}
    assert runs["base"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert runs["quickstart"].data.params["train.steps"] == "3"
    history = client.get_metric_history(child.info.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2]
    assert [a.path for a in client.list_artifacts(child.info.run_id, "samples")] == ["samples/note.txt"]
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    assert uri in ui_command(cfg) and "127.0.0.1" in ui_command(cfg)


def test_a_relative_store_follows_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default `sqlite:///runs/mlflow.db` in one process, from two folders (two tests, a notebook that moves
    on): each run lands in its own folder's store. MLflow caches a store per URI string; a relative one kept
    writing into the first folder's file while the training stages (absolute URIs) wrote into the second."""
    runs = {}
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        cfg = load_config("quickstart", ["tracking.tracking_uri=sqlite:///runs/mlflow.db", f"name=exp-{folder}"])
        with mlflow_run(cfg, folder) as run:
            runs[folder] = run.info.run_id
    for folder, run_id in runs.items():
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / folder / 'runs' / 'mlflow.db'}")
        assert client.get_run(run_id).info.run_name == folder
