"""Audio decoding, format conversion and the per-frame features used for sketches and drift."""
