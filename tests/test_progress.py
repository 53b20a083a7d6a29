"""Training progress where no terminal shows a live bar (a log file, `ray job logs`): plain lines instead."""

from __future__ import annotations

import io

from rich.console import Console

from lmdm.pipelines.progress import training_progress


def test_a_log_file_gets_a_plain_progress_line_now_and_then_and_at_the_end() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with training_progress("autoencoder", console) as update:
        for step in (1, 2, 3):
            update({"step": step, "steps": 3, "loss": 0.5 / step, "samples_per_s": 2.0})
    text = out.getvalue()
    assert "autoencoder: step 1/3, loss 0.5000, 2.0 samples/s" in text  # the first update
    assert "step 2/3" not in text  # within a minute of the last line
    assert "autoencoder: step 3/3, loss 0.1667" in text  # the last step always


def test_a_terminal_gets_only_the_live_bar() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    with training_progress("base", console) as update:
        update({"step": 1, "steps": 2, "loss": 1.0, "samples_per_s": 1.0})
    assert "base: step 1/2" not in out.getvalue()
