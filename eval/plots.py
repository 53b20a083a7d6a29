"""Plots a person would rather look at than read (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_clip", "plot_spectrograms"]


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


def plot_spectrograms(panels: list[tuple[str, np.ndarray]], sample_rate: int, title: str, path: Path) -> Path:
    """Mel spectrograms stacked one above another on a shared colour range (80 dB below the loudest panel's peak).

    Args:
        panels: ``(label, audio)`` pairs, audio ``(C, N)`` or ``(N,)`` at ``sample_rate`` (lengths may differ;
            the time axes are in seconds).
        path: PNG to write (folders are created).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmdm.eval.reconstruction import MEL_HOP, mel_db

    hop = MEL_HOP
    mels = [mel_db(audio, sample_rate) for _, audio in panels]  # the spectrogram mel L1 is measured on
    top = max(float(m.max()) for m in mels)
    longest = max(m.shape[1] for m in mels) * hop / sample_rate
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 2.6 * len(panels)), squeeze=False)
    for ax, (label, _), mel in zip(axes[:, 0], panels, mels, strict=True):
        seconds = mel.shape[1] * hop / sample_rate
        ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", vmin=top - 80, vmax=top, extent=(0, seconds, 0, mel.shape[0]))
        ax.set_xlim(0, longest)
        ax.set_ylabel("mel band")
        ax.set_title(label, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
