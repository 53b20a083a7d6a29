"""The Ray session every ``lmdm`` command runs in: the cluster of a ``ray job submit`` (or ``ray.address``),
else a local Ray on loopback.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lmdm.config import Config

__all__ = ["ensure_ray"]


def ensure_ray(cfg: Config) -> None:
    """Connect to ``ray.address`` (or ``$RAY_ADDRESS``, set inside a Ray job), or start a local Ray on
    loopback with its own temp dir (and its dashboard with ``ray.dashboard``).

    A local Ray keeps its log noise in its own log files (``<temp dir>/session_latest/logs``): worker
    output does not reach the terminal (``log_to_driver=False``) and neither do Ray Data's and Ray
    Train's driver-side log lines (:func:`_logs_to_files`); errors still surface as exceptions.
    """
    import ray

    if ray.is_initialized():
        return
    # Inside `ray job submit` Ray sets RAY_ADDRESS for the entrypoint: join that cluster (ray.init semantics).
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    temp = Path(tempfile.gettempdir()) / f"lmdm-ray-{os.getuid()}"
    # Logical CPUs are scheduling slots, not cores (torch threads per task/actor are set explicitly):
    # twice the cores (at least 4) lets decode tasks run beside a full actor pool instead of deadlocking.
    num_cpus = cfg.ray.num_cpus or max(4, 2 * (os.cpu_count() or 1))
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=cfg.ray.dashboard,
        dashboard_host="127.0.0.1",  # loopback only (8265, or the next free port)
        _node_ip_address="127.0.0.1",
        _temp_dir=str(temp),
        configure_logging=False,
        log_to_driver=False,
    )
    _logs_to_files()


def _logs_to_files() -> None:
    """Take the terminal handlers off Ray Data's and Ray Train's loggers; Ray Data keeps its file handler
    (``logs/ray-data.log``), and Ray Train's records go to ``logs/lmdm-driver.log`` in the session folder."""
    import logging

    import ray
    import ray.data  # configures the "ray.data" logger on import

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for name in ("ray.data", "ray.train", "ray.tune"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
                logger.removeHandler(handler)
        if not logger.handlers:
            logger.addHandler(logging.FileHandler(logs / "lmdm-driver.log"))
        logger.propagate = False
