"""``lmdm serve``: start the Ray Serve app on the embedded default (local Ray on loopback) or the cluster of
``ray.address`` / a ``ray job submit``; the checkpoints default to the quickstart's.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmdm.config import Config

__all__ = ["ServeHandle", "resolve_checkpoints", "start_server"]

APP_NAME = "lmdm"


@dataclass(frozen=True)
class ServeHandle:
    """Where the app answers and what it serves."""

    url: str
    ws_url: str
    dit: str
    autoencoder: str


def resolve_checkpoints(cfg: Config) -> Config:
    """``cfg`` with ``serve.dit`` / ``serve.autoencoder`` filled in from the quickstart's models where unset
    (:func:`lmdm.pipelines.generate.default_checkpoints`); still ``None`` where there are none (random init)."""
    from lmdm.pipelines.generate import default_checkpoints

    if cfg.serve.dit is not None and cfg.serve.autoencoder is not None:
        return cfg
    dit, autoencoder = default_checkpoints(cfg)
    serve = cfg.serve.model_copy(update={"dit": cfg.serve.dit or dit, "autoencoder": cfg.serve.autoencoder or autoencoder})
    return cfg.model_copy(update={"serve": serve})


def start_server(cfg: Config) -> ServeHandle:
    """Start (or update) the app and return once every replica is loaded and warm.

    Raises:
        RuntimeError: the replicas failed to start (Serve's message names the cause: a checkpoint that does not
            load, a port in use, ...).
    """
    from ray import serve

    from lmdm.pipelines.ray_session import ensure_ray
    from lmdm.serve.app import build_app

    ensure_ray(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return ServeHandle(
        url=f"http://{host}:{cfg.serve.port}/",
        ws_url=f"ws://{host}:{cfg.serve.port}/v1/stream",
        dit=str(cfg.serve.dit or "random init"),
        autoencoder=str(cfg.serve.autoencoder or "random init"),
    )
