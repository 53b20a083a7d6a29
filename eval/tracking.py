"""MLflow, the system of record: one experiment per config name, a parent run per ``lmdm`` command and
nested runs per stage; params are the flattened config. Only rank 0 / the driver logs.

The default store is local SQLite under ``runs/`` (``sqlite:///runs/mlflow.db``); a cluster points
``tracking.tracking_uri`` at a shared server or database.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmdm.config import Config

__all__ = ["absolute_tracking_uri", "flatten", "mlflow_run", "prepare_tracking", "ui_command"]

# MLflow caps a param value at 6000 characters (and a key at 250).
_MAX_PARAM = 6000


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}`` (lists and values as strings)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:_MAX_PARAM]
    return flat


def absolute_tracking_uri(uri: str) -> str:
    """A relative ``sqlite:///runs/mlflow.db`` made absolute (Ray workers run in other directories)."""
    db = _sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db is not None else uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def prepare_tracking(cfg: Config) -> str:
    """Point MLflow at ``tracking.tracking_uri`` (creating the SQLite folder) and make sure the
    experiment exists (created on the driver, before any worker logs: avoids a schema race).

    Returns:
        The experiment name.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Absolute: MLflow caches one store per URI string, and a relative SQLite path stays bound to the directory
    # it was first opened in; a process that moves on (tests, notebooks) would log into the old folder's store.
    uri = absolute_tracking_uri(cfg.tracking.tracking_uri)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    name = cfg.tracking.experiment or cfg.name
    if mlflow.get_experiment_by_name(name) is None:
        artifacts = (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None
        mlflow.create_experiment(name, artifact_location=artifacts)
    mlflow.set_experiment(name)
    return name


@contextmanager
def mlflow_run(cfg: Config, run_name: str, nested: bool = False, params: bool = True) -> Iterator[Any]:
    """Start a (nested) MLflow run with the flattened config as params.

    Yields:
        The active ``mlflow.ActiveRun``.
    """
    import mlflow

    prepare_tracking(cfg)
    with mlflow.start_run(run_name=run_name, nested=nested) as run:
        if params:
            mlflow.log_params(flatten(cfg.model_dump(mode="json")))
        yield run


def ui_command(cfg: Config) -> str:
    """The command that opens the MLflow UI on this config's store (loopback)."""
    return f"mlflow ui --backend-store-uri {cfg.tracking.tracking_uri} --host 127.0.0.1 --port 5000"
