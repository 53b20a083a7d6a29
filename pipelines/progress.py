"""Progress bars on the driver (rich), shared by the CLI commands and the quickstart."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["LOG_EVERY_S", "progress_bar", "training_progress"]

LOG_EVERY_S = 60.0  # where the console is not a terminal, a training progress line at most this often


def progress_bar(description: str, console: Console) -> Progress:
    """A bar for work counted in items: description, bar, done/total, elapsed, ETA."""
    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


@contextmanager
def training_progress(description: str, console: Console) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A training bar (step/total, loss, samples/s, elapsed, ETA) and the callback that moves it, for
    :func:`lmdm.pipelines.train.run_train`'s ``progress`` (called with rank 0's latest step)."""
    bar = Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} samples/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    with bar:
        task = bar.add_task(description, total=None, loss="–", rate="–")

        last_line = [-LOG_EVERY_S]

        def update(step: dict[str, Any]) -> None:
            bar.update(task, completed=step["step"], total=step["steps"], loss=f"{step['loss']:.4f}", rate=f"{step['samples_per_s']:.1f}")
            now = time.monotonic()
            if not console.is_terminal and (now - last_line[0] >= LOG_EVERY_S or step["step"] == step["steps"]):
                # A log file or `ray job logs` gets no live bar: a plain line now and then instead.
                last_line[0] = now
                console.print(
                    f"{description}: step {step['step']}/{step['steps']}, loss {step['loss']:.4f}, {step['samples_per_s']:.1f} samples/s",
                    highlight=False,
                )

        yield update
