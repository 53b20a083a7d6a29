"""Evaluation: metrics, reports and plots. Imports ``lmdm`` (the library), never the reverse."""
