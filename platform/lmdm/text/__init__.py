"""Text encoders for prompt conditioning (local folders only)."""
