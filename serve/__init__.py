"""Serving: Ray Serve streaming endpoints (later issues)."""
