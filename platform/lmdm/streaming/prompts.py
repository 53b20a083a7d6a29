"""Prompts by time: a stream whose prompt changes at given seconds (``lmdm generate --prompts FILE``).

A prompts file has one change per line, ``SECONDS PROMPT`` (the time in seconds from the stream's start,
whitespace, then the prompt text); blank lines and lines starting with ``#`` are skipped. The first change
is at 0 and times increase::

    # a chorale that turns into a madrigal at ten seconds
    0    Bach chorale, for organ, moderato
    10   Monteverdi madrigal, for strings
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["PromptChange", "PromptsError", "parse_prompts", "prompt_at", "read_prompts"]


class PromptsError(ValueError):
    """A prompts file or prompt schedule that cannot be used (says where and why)."""


@dataclass(frozen=True)
class PromptChange:
    """From ``seconds`` on, the stream is generated under ``prompt``."""

    seconds: float
    prompt: str


def parse_prompts(text: str, source: str = "<prompts>") -> list[PromptChange]:
    """Parse prompts-by-time text (see the module docstring).

    Raises:
        PromptsError: a line without a time and a prompt, a bad time, a first time other than 0, times
            that do not increase, or no prompt at all; the message names ``source`` and the line.
    """
    changes: list[PromptChange] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        where = f"{source}:{number}"
        if len(parts) != 2:
            raise PromptsError(f"{where}: expected 'SECONDS PROMPT', got {line!r}")
        try:
            seconds = float(parts[0])
        except ValueError:
            raise PromptsError(f"{where}: {parts[0]!r} is not a time in seconds") from None
        if not seconds >= 0 or seconds == float("inf"):
            raise PromptsError(f"{where}: the time must be a finite number of seconds >= 0, got {parts[0]}")
        if not changes and seconds != 0:
            raise PromptsError(f"{where}: the first prompt must start at 0 seconds, got {seconds:g}")
        if changes and seconds <= changes[-1].seconds:
            raise PromptsError(f"{where}: times must increase ({seconds:g} s after {changes[-1].seconds:g} s)")
        changes.append(PromptChange(seconds, parts[1].strip()))
    if not changes:
        raise PromptsError(f"{source}: no prompt in it (lines are 'SECONDS PROMPT')")
    return changes


def read_prompts(path: Path) -> list[PromptChange]:
    """:func:`parse_prompts` of a file.

    Raises:
        PromptsError: the file is missing, unreadable, or malformed.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptsError(f"{path}: cannot read the prompts file ({exc})") from None
    return parse_prompts(text, str(path))


def prompt_at(changes: list[PromptChange], seconds: float) -> str:
    """The prompt active at ``seconds`` (the last change at or before it)."""
    current = changes[0].prompt
    for change in changes:
        if change.seconds <= seconds:
            current = change.prompt
    return current
