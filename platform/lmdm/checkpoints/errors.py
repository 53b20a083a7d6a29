"""The error raised when a checkpoint or its config does not fit the model it is loaded into."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint file or its config is wrong or unsupported.

    The message names the file, the offending keys (with shapes) or config key, and what to do.
    """
