"""Our checkpoint format: a folder with ``model.safetensors`` and ``config.json``.

``config.json`` holds ``{"kind": "dit" | "autoencoder" | ..., "args": {flat constructor arguments},
"meta": {...}}``; loading rebuilds the module from ``args`` and loads the tensors strictly. Only
safetensors are read (no pickle: a checkpoint from elsewhere cannot run code).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmdm.checkpoints.errors import CheckpointError
from lmdm.models.autoencoder import OobleckVAE
from lmdm.models.dit import DiT, DiTArgs

__all__ = ["load_checkpoint", "load_state_strict", "save_checkpoint"]

FORMAT_VERSION = 1


def _build_dit(args: dict[str, Any]) -> nn.Module:
    return DiT(DiTArgs(**args))


def _build_autoencoder(args: dict[str, Any]) -> nn.Module:
    return OobleckVAE(**args)


def _build_numbers(args: dict[str, Any]) -> nn.Module:
    from lmdm.checkpoints.sao_dit import NumberConditioners

    return NumberConditioners({k: tuple(v) for k, v in args["numbers"].items()})


BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "dit": _build_dit,
    "autoencoder": _build_autoencoder,
    "number_conditioners": _build_numbers,
}


def _args_of(model: nn.Module) -> tuple[str, dict[str, Any]]:
    if isinstance(model, DiT):
        return "dit", dataclasses.asdict(model.args)
    if isinstance(model, OobleckVAE):
        return "autoencoder", dict(model.init_args)
    from lmdm.checkpoints.sao_dit import NumberConditioners

    if isinstance(model, NumberConditioners):
        return "number_conditioners", {"numbers": {k: list(v) for k, v in model.numbers.items()}}
    raise CheckpointError(f"cannot save a {type(model).__name__}: no checkpoint kind for it (known: {sorted(BUILDERS)})")


def save_checkpoint(folder: str | Path, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``folder/model.safetensors`` + ``folder/config.json``.

    Args:
        meta: JSON-serialisable extras (objective, sample rate, training step, ...).

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind, args = _args_of(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    config = {"format": FORMAT_VERSION, "kind": kind, "args": args, "meta": meta or {}}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` or raise a :class:`CheckpointError` listing every bad key.

    Raises:
        CheckpointError: missing keys, unexpected keys and shape mismatches, with shapes and the file.
    """
    expected = model.state_dict()
    missing = [f"{k} {list(v.shape)}" for k, v in expected.items() if k not in state]
    unexpected = [f"{k} {list(v.shape)}" for k, v in state.items() if k not in expected]
    mismatched = [
        f"{k}: file {list(v.shape)}, model expects {list(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source}: the weights do not match the {type(model).__name__} built from its config"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = items[:30] + ([f"… and {len(items) - 30} more"] if len(items) > 30 else [])
                lines.append(f"  {title} ({len(items)}):" + "".join(f"\n    {item}" for item in shown))
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def load_checkpoint(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a module saved with :func:`save_checkpoint`.

    Returns:
        ``(module in eval mode, meta)``.

    Raises:
        CheckpointError: missing files, unknown kind, bad arguments, or weights that do not match.
    """
    folder = Path(folder)
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; a checkpoint folder holds model.safetensors and config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    kind = config.get("kind")
    if kind not in BUILDERS:
        raise CheckpointError(f"{config_path}: unknown checkpoint kind {kind!r}; expected one of {sorted(BUILDERS)}")
    try:
        model = BUILDERS[kind](dict(config.get("args", {})))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: cannot build a {kind} from its args ({exc})") from None
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{weights}: cannot read as safetensors ({exc})") from None
    load_state_strict(model, state, str(weights))
    return model.eval(), dict(config.get("meta", {}))
