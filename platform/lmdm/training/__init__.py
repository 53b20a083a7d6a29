"""Training objectives as library functions (the Ray pipelines call these)."""
