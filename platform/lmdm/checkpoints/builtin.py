"""Weights the platform ships inside its own package, loaded by name: ``builtin:<name>``.

Each shipped model is an ordinary checkpoint folder (``model.safetensors`` + ``config.json``, our
format) under ``lmdm/weights/<name>/`` with a ``MODEL_CARD.md`` (data and split, config, steps, wall
time, figures, licences, the command that reproduces it). ``lmdm/weights/index.json`` records each
file's SHA-256; :func:`load_builtin` checks them before reading a byte of the weights, so a tampered
or truncated file is refused with the file, both hashes and what to do. :func:`ship` is how a trained
checkpoint becomes a shipped one (``lmdm ship``): it copies the folder, writes the card and records
the hashes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from lmdm.checkpoints.errors import CheckpointError
from lmdm.checkpoints.format import file_sha256, load_checkpoint

__all__ = ["PREFIX", "WEIGHTS", "builtin_names", "builtin_path", "load_builtin", "resolve_checkpoint", "ship", "verify_builtin"]

PREFIX = "builtin:"
WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
_HASHED = ("model.safetensors", "config.json")


def _index(weights: Path = WEIGHTS) -> dict[str, Any]:
    path = weights / "index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def builtin_names(weights: Path = WEIGHTS) -> list[str]:
    """The names of the shipped models."""
    return sorted(_index(weights))


def builtin_path(name: str, weights: Path = WEIGHTS) -> Path:
    """The folder of shipped model ``name`` (``builtin:`` prefix optional), its files' hashes verified.

    A shipped set of models (a pair: ``builtin:corpus-base``) is addressed by part:
    ``builtin:corpus-base/autoencoder``.
    """
    name, _, part = name.removeprefix(PREFIX).partition("/")
    index = _index(weights)
    if name not in index:
        raise CheckpointError(f"no built-in model {PREFIX}{name}; shipped: {', '.join(PREFIX + n for n in sorted(index)) or 'none'}")
    parts = index[name].get("parts", {})
    if part and part not in parts:
        have = f"its parts are {', '.join(f'{PREFIX}{name}/{p}' for p in parts)}" if parts else "it is a single model"
        raise CheckpointError(f"{PREFIX}{name} has no part {part!r}: {have}")
    if parts and not part:
        raise CheckpointError(f"{PREFIX}{name} holds several models: name one, {' or '.join(f'{PREFIX}{name}/{p}' for p in parts)}")
    verify_builtin(name, weights)
    return weights / name / part if part else weights / name


def verify_builtin(name: str, weights: Path = WEIGHTS) -> None:
    """Every recorded file of ``name`` is there with its recorded SHA-256, else a :class:`CheckpointError`."""
    recorded: dict[str, str] = _index(weights)[name]["sha256"]
    for file, expected in recorded.items():
        path = weights / name / file
        if not path.is_file():
            raise CheckpointError(f"{PREFIX}{name}: {path} is missing; reinstall lmdm (pip install --force-reinstall lmdm)")
        actual = file_sha256(path)
        if actual != expected:
            raise CheckpointError(
                f"{PREFIX}{name}: {path} has SHA-256 {actual}, but {expected} was shipped (the file is truncated or was changed); "
                "reinstall lmdm, or rebuild it with the command in its MODEL_CARD.md"
            )


def load_builtin(name: str, kind: str | None = None, weights: Path = WEIGHTS) -> tuple[nn.Module, dict[str, Any]]:
    """The shipped model ``name`` and its meta (hashes verified first), as :func:`~lmdm.checkpoints.format.load_checkpoint` returns them."""
    return load_checkpoint(builtin_path(name, weights), kind)


def resolve_checkpoint(spec: str | Path) -> Path:
    """``builtin:<name>`` → its verified folder; anything else → that path."""
    text = str(spec)
    return builtin_path(text) if text.startswith(PREFIX) else Path(spec)


def ship(checkpoint: Path, name: str, card: str, weights: Path = WEIGHTS, parts: list[str] | None = None) -> dict[str, str]:
    """Copy a checkpoint folder into the package as ``builtin:<name>`` with its model card, and record its hashes.

    Args:
        parts: ship a set of models instead: the checkpoint folders ``checkpoint/<part>``, each loaded as
            ``builtin:<name>/<part>`` (e.g. ``autoencoder`` and ``base`` of a pair from ``lmdm pretrain``).

    Returns:
        The recorded ``{file: sha256}`` (files relative to the model's folder).
    """
    checkpoint = Path(checkpoint)
    sources = {part: checkpoint / part for part in parts} if parts else {"": checkpoint}
    for source in sources.values():
        missing = [f for f in _HASHED if not (source / f).is_file()]
        if missing:
            raise CheckpointError(f"{source}: not a checkpoint folder (missing {', '.join(missing)})")
    target = weights / name
    if target.exists():
        shutil.rmtree(target)
    kinds = {}
    for part, source in sources.items():
        (target / part).mkdir(parents=True, exist_ok=True)
        for file in _HASHED:
            shutil.copy2(source / file, target / part / file)
        kinds[part] = json.loads((target / part / "config.json").read_text()).get("kind")
    (target / "MODEL_CARD.md").write_text(card)
    index = _index(weights)
    files = [str(Path(part) / f) for part in sources for f in _HASHED]
    entry: dict[str, Any] = {"sha256": {f: file_sha256(target / f) for f in files}}
    if parts:
        entry["kind"], entry["parts"] = "set", kinds
    else:
        entry["kind"] = kinds[""]
    index[name] = entry
    (weights / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return dict(entry["sha256"])
