"""Render notes to audio through a General MIDI SoundFont, pip-only.

Choice: ``pretty_midi`` builds the MIDI file (its wheel also carries ``TimGM6mb.sf2``, a 6 MB GM
SoundFont with all 128 programs) and ``midirenderer`` (a Rust SoundFont synthesiser in an abi3
wheel, no system libraries) renders it to 48 kHz stereo in a fraction of a second. FluidSynth would
need the system ``libfluidsynth``; tinysoundfont needs portaudio headers. Rendering is deterministic:
the same MIDI bytes give the same samples.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import midirenderer
import numpy as np
import pretty_midi

from lmdm.audio.io import decode_audio

__all__ = ["Voice", "build_midi", "render_midi", "soundfont_path"]


@dataclass(frozen=True)
class Voice:
    """One voice of an arrangement.

    Attributes:
        program: General MIDI program (0-127).
        notes: ``(n, 3)`` float ``[start_s, end_s, midi_pitch]``.
        velocity: MIDI velocity 1-127.
        pan: MIDI pan 0 (left) .. 127 (right).
    """

    program: int
    notes: np.ndarray
    velocity: int
    pan: int = 64


def soundfont_path() -> Path:
    """The General MIDI SoundFont shipped in pretty_midi's wheel."""
    return Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"


@functools.cache
def _soundfont_bytes() -> bytes:
    return soundfont_path().read_bytes()


def build_midi(voices: list[Voice], tempo_bpm: float) -> bytes:
    """A type-1 MIDI file with one track and channel per voice (drum channel 9 skipped)."""
    pm = pretty_midi.PrettyMIDI(initial_tempo=float(tempo_bpm))
    for voice in voices:
        instrument = pretty_midi.Instrument(program=voice.program, name=pretty_midi.program_to_instrument_name(voice.program))
        instrument.control_changes.append(pretty_midi.ControlChange(number=10, value=voice.pan, time=0.0))
        for start, end, pitch in voice.notes:
            instrument.notes.append(pretty_midi.Note(velocity=voice.velocity, pitch=int(pitch), start=float(start), end=float(end)))
        pm.instruments.append(instrument)
    buffer = io.BytesIO()
    pm.write(buffer)
    return buffer.getvalue()


def render_midi(midi: bytes, sample_rate: int, channels: int, num_samples: int) -> np.ndarray:
    """Render MIDI bytes to ``(channels, num_samples)`` float32 (cut or zero-padded to length)."""
    wav = midirenderer.render_wave_from(_soundfont_bytes(), midi)
    audio = decode_audio(bytes(wav), sample_rate, channels, source="<rendered midi>")
    out = np.zeros((channels, num_samples), dtype=np.float32)
    n = min(num_samples, audio.shape[1])
    out[:, :n] = audio[:, :n]
    return out
