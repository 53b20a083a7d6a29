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

    ensure_ray(load_config("quickstart", ["ray.num_cpus=4"]))
    yield ray
    ray.shutdown()
