"""Plots a person would rather look at than read (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_clip"]


def plot_clip(
    audio: np.ndarray,
    sample_rate: int,
    frame_rate: int,
    curves: dict[str, np.ndarray],
    title: str,
    path: Path,
    f0_source: str = "pyin",
) -> Path:
    """Waveform, spectrogram with f0 and brightness overlaid, and loudness of one clip.

    Args:
        audio: ``(C, N)`` or ``(N,)`` audio.
        curves: ``f0_hz``, ``brightness_hz``, ``loudness_db``, each ``(F,)`` at ``frame_rate``.
        path: PNG to write (folders are created).
        f0_source: where ``f0_hz`` came from, for the legend (``pyin`` estimate, or ``score`` for a corpus clip).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.signal import stft

    y = audio.mean(axis=0) if audio.ndim == 2 else audio
    t = np.arange(y.shape[-1]) / sample_rate
    fig, axes = plt.subplots(3, 1, figsize=(12, 8), sharex=True, height_ratios=[1, 2.5, 1])
    axes[0].plot(t, y, lw=0.4, color="tab:blue")
    axes[0].set_ylabel("amplitude")
    axes[0].set_title(title, fontsize=10)
    freqs, times, spec = stft(y, fs=sample_rate, nperseg=1024, noverlap=768)
    db = 20 * np.log10(np.abs(spec) + 1e-6)
    axes[1].pcolormesh(times, freqs, db, shading="auto", cmap="magma", vmin=db.max() - 80, vmax=db.max())
    frame_t = np.arange(len(curves["f0_hz"])) / frame_rate
    f0 = np.where(np.asarray(curves["f0_hz"]) > 0, curves["f0_hz"], np.nan)
    axes[1].plot(frame_t, f0, color="cyan", lw=1.2, label=f"f0 ({f0_source})")
    axes[1].plot(frame_t, curves["brightness_hz"], color="lime", lw=0.8, label="brightness (centroid)")
    axes[1].set_yscale("symlog", linthresh=200)
    axes[1].set_ylim(30, sample_rate / 2)
    axes[1].set_ylabel("Hz")
    axes[1].legend(loc="upper right", fontsize=8)
    axes[2].plot(frame_t, curves["loudness_db"], color="tab:orange")
    axes[2].set_ylabel("loudness (dBFS)")
    axes[2].set_xlabel("time (s)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
