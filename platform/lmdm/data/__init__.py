"""Data: the built-in corpus (scores → MIDI → audio, captions, curves) and readers for user audio."""
