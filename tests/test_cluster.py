"""Cluster use: the `infra/` files, and a real `ray job submit` of `lmdm train` as the README documents it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from lmdm.config import Config
from lmdm.data.corpus import CorpusSummary

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def _lmdm_argv_is_valid(argv: list[str]) -> None:
    """``argv`` (without ``lmdm``) parses as a real ``lmdm`` command line: the subcommand exists, its
    options are known, required ones are given, and the KEY=VALUE overrides make a valid config."""
    import typer

    from lmdm.config import load_config
    from lmdm.pipelines.cli import app

    group = typer.main.get_command(app)
    name, *rest = argv
    command = group.get_command(group.make_context("lmdm", [name]), name)  # type: ignore[attr-defined]
    assert command is not None, f"no lmdm command {name!r}"
    sub = command.make_context(name, rest)  # parses and validates, does not run
    overrides = [str(o) for o in sub.params.get("overrides") or []]
    load_config(sub.params.get("config") or "quickstart", overrides)


def _entrypoint(text: str) -> list[str]:
    argv = shlex.split(text)
    assert argv[0] == "lmdm", f"entrypoint {text!r} is not an lmdm command"
    return argv[1:]


def test_infra_files_parse_and_run_real_lmdm_commands() -> None:
    job = yaml.safe_load((INFRA / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    _lmdm_argv_is_valid(_entrypoint(job["spec"]["entrypoint"]))
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].startswith("lmdm:")

    cluster = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    assert {"cluster_name", "provider", "docker", "head_start_ray_commands"} <= cluster.keys()
    # The submit command in cluster.yaml's header (its last lines, after `--`) is a real lmdm command too.
    header = [line.lstrip("#").strip() for line in (INFRA / "cluster.yaml").read_text().split("cluster_name:")[0].splitlines()]
    start = next(i for i, line in enumerate(header) if line.startswith("ray job submit"))
    submit = " ".join(line.rstrip("\\").strip() for line in header[start:] if line)
    _lmdm_argv_is_valid(_entrypoint(submit.split(" -- ", 1)[1]))

    env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "dist" and "--no-deps" in env["pip"]["pip_install_options"]
    (wheel,) = env["pip"]["packages"]
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert wheel.endswith(f"/lmdm-{version}-py3-none-any.whl"), "runtime_env.yaml names another version than pyproject.toml"
    docker = (INFRA / "Dockerfile").read_text()
    assert "torch==2.13.0" in docker and f"lmdm-{version}-py3-none-any.whl" in docker


def test_an_invalid_entrypoint_is_caught() -> None:
    """The check above can fail: an unknown option or a bad override is an error."""
    from typer.exceptions import TyperException

    from lmdm.config import ConfigError

    with pytest.raises(TyperException, match="No such option"):
        _lmdm_argv_is_valid(["train", "--stage", "base", "--no-such-option"])
    with pytest.raises(ConfigError):
        _lmdm_argv_is_valid(["train", "--stage", "base", "train.no_such_key=1"])
    with pytest.raises(AssertionError, match="no lmdm command"):
        _lmdm_argv_is_valid(["trian", "--stage", "base"])


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head() -> object:
    """A real Ray head started with `ray start --head` on loopback (free ports, its own temp dir),
    stopped afterwards by signalling its process group (`ray stop` would stop every Ray of the user)."""
    gcs, dashboard, client, agent, agent_grpc, env_agent, metrics = _free_ports(7)
    temp = Path(tempfile.mkdtemp(prefix="lmdm-rayhead-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    bin_dir = Path(sys.executable).parent
    command = [
        str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}", "--num-cpus=4",
        f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    log = open(temp / "ray-start.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 120
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start failed:\n{(temp / 'ray-start.log').read_text()}") from None
                time.sleep(1)
        yield address
    finally:
        for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 10)):  # `ray start --block` ignores SIGTERM for ~15 s
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        log.close()
        shutil.rmtree(temp, ignore_errors=True)  # the head's session (a runtime-env virtualenv among it) is 2.5 GB


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_trains_with_the_wheel_in_the_runtime_env(
    tmp_path: Path, ray_head: str, tiny_corpus: tuple[Config, CorpusSummary], local_ray: object
) -> None:
    """As README "Running on a cluster": build the wheel into dist/, run the README's `ray job submit
    --runtime-env infra/runtime_env.yaml -- lmdm train ...` (the Ray CLI, which waits for the job), then
    find the checkpoint and the MLflow run in the shared storage the overrides name."""
    import torch
    from mlflow.tracking import MlflowClient

    from lmdm.checkpoints.format import load_checkpoint, save_checkpoint
    from lmdm.models.autoencoder import OobleckVAE
    from lmdm.models.dit import DiT
    from lmdm.pipelines.precompute import run_precompute

    _, summary = tiny_corpus
    torch.manual_seed(0)
    ae = save_checkpoint(tmp_path / "autoencoder", OobleckVAE(1, 4, [1, 2], [2, 4], 4))
    latents = tmp_path / "latents"
    run_precompute(tiny_config(f"data.root={summary.root}", f"precompute.out={latents}", "precompute.chunk_frames=96"), ae)

    dist = tmp_path / "dist"  # `make wheel`
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)], check=True
    )
    (built,) = dist.glob("lmdm-*.whl")
    with zipfile.ZipFile(built) as wheel:  # every subpackage ships, the runtimes too, and every shipped weight file
        assert "lmdm/runtime/packed.py" in wheel.namelist()
        index = json.loads(wheel.read("lmdm/weights/index.json"))
        for name, entry in index.items():
            for file, digest in entry["sha256"].items():
                assert hashlib.sha256(wheel.read(f"lmdm/weights/{name}/{file}")).hexdigest() == digest, (name, file)
            assert f"lmdm/weights/{name}/MODEL_CARD.md" in wheel.namelist()
    shared = tmp_path / "shared"
    entrypoint = (
        f"lmdm train --config quickstart --stage base --latents {latents} ray.address=auto name=submitted "
        "dit.width=64 dit.depth=1 dit.head_dim=32 dit.cond_token_dim=384 dit.project_cond_tokens=true autoencoder.latent_channels=4 stream.block_frames=8 stream.context_blocks=2 "
        "train.workers=2 train.batch_size=2 train.steps=3 train.checkpoint_every=3 train.cpus_per_worker=1 "
        f"train.storage_path={shared / 'ray_results'} tracking.tracking_uri=sqlite:///{shared / 'mlflow.db'}"
    )
    # The README's command itself, from the folder holding dist/ (runtime_env.yaml's working_dir: dist).
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    submit = [
        str(bin_dir / "ray"),
        "job",
        "submit",
        "--address",
        ray_head,
        "--runtime-env",
        str(INFRA / "runtime_env.yaml"),
        "--",
        *shlex.split(entrypoint),
    ]
    done = subprocess.run(submit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=780)
    logs = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in logs, logs[-6000:]

    checkpoints = sorted((shared / "ray_results").glob("submitted-base-*/checkpoint_*/model"))
    assert checkpoints, logs[-3000:]
    model, meta = load_checkpoint(checkpoints[-1])
    assert isinstance(model, DiT) and meta["step"] == 3 and meta["train_seconds"] > 0
    # The job imported lmdm from the shipped wheel, not from this checkout.
    imported = re.search(r"lmdm \S+ imported from (\S+)", logs)
    assert imported is not None and "runtime_resources" in imported[1] and not imported[1].startswith(str(REPO)), imported

    mlflow = MlflowClient(tracking_uri=f"sqlite:///{shared / 'mlflow.db'}")
    (experiment,) = [e for e in mlflow.search_experiments() if e.name == "submitted"]
    runs = {r.info.run_name: r for r in mlflow.search_runs([experiment.experiment_id])}
    assert {"train", "base"} <= runs.keys()
    history = mlflow.get_metric_history(runs["base"].info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
