"""Pipelines: the ``lmdm`` command line and the Ray jobs behind it."""
