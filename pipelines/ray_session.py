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
    loopback with its own temp dir."""
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
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(temp),
        configure_logging=False,
        log_to_driver=False,
    )
