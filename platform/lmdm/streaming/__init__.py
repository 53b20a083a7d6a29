"""Streaming: sequences (training/reference forwards), engines, rollout and streams."""
