"""Shared fixtures: offline, seeded, tiny."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

from lmdm.config import Config, load_config
from lmdm.data.corpus import CorpusSummary, build_corpus

REPO = Path(__file__).resolve().parents[1]


def tiny_config(*overrides: str) -> Config:
    """The quickstart config shrunk to a few short clips."""
    base = ["data.corpus.num_clips=4", "data.corpus.clip_seconds=6", "data.corpus.workers=1"]
    return load_config("quickstart", [*base, *overrides])


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, CorpusSummary]:
    """A 6-clip corpus built once per test session (two of them solo)."""
    cfg = tiny_config("data.corpus.num_clips=6", "data.corpus.solo_probability=0.3")
    root = tmp_path_factory.mktemp("corpus") / "corpus"
    summary = build_corpus(root, cfg.data.corpus, cfg.audio, cfg.data.frame_rate)
    return cfg, summary


@pytest.fixture(scope="session")
def local_ray() -> object:
    """One local Ray for the test session (loopback, its own temp dir; 4 logical CPUs on 2 cores so
    Ray Data tasks and actors always get slots)."""
    import ray

    from lmdm.pipelines.ray_session import ensure_ray

    # Ray Train's controller polls the workers (and commits their reported checkpoints) every 0.2 s, not 2 s:
    # a test's checkpoint interval is a fraction of a second. Set before Ray starts: its processes inherit it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ensure_ray(load_config("quickstart", ["ray.num_cpus=4", "ray.dashboard=true"]))  # the dashboard: Ray's state API
    yield ray
    ray.shutdown()


def alive_actor_pids(class_name: str) -> list[int]:
    """Pids of this Ray session's live actors of ``class_name``, from Ray's state API (needs the dashboard:
    the test session's Ray starts it, ``ray.dashboard=true``)."""
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    actors = list_actors(address=address, filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")], detail=True)
    return [int(a.pid) for a in actors if a.pid]
