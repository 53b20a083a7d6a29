"""Our checkpoint format: a folder with ``model.safetensors`` and ``config.json``.

``config.json`` says what the checkpoint is (DESIGN §6)::

    {"format": 2, "kind": "dit" | "autoencoder" | "embedder" | "rvq" | "lmm" | "number_conditioners",
     "args": {flat constructor arguments}, "trained": {TrainedWith}, "meta": {free-form extras}}

``kind`` picks the class from :data:`KINDS` (the one registry of checkpoint kinds), ``args`` rebuild it,
and the tensors load strictly. ``trained`` (:class:`TrainedWith`) records how the weights were made:
the stage, objective, stream variant and geometry, and the fingerprints of the autoencoder and text
encoder whose latents and embeddings they were trained on; :mod:`lmdm.checkpoints.compat` checks it
wherever a checkpoint is used. Format-1 folders (no ``trained``) load with every field unknown.
Only safetensors are read (no pickle: a checkpoint from elsewhere cannot run code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmdm.checkpoints.errors import CheckpointError
from lmdm.models.autoencoder import OobleckVAE
from lmdm.models.conditioners import NumberConditioners
from lmdm.models.dit import DiT, DiTArgs
from lmdm.models.embedder import EmbedderArgs, TextAudioEmbedding
from lmdm.models.lmm import LMM, LMMArgs
from lmdm.models.rvq import ResidualVQ

__all__ = [
    "KINDS",
    "CheckpointInfo",
    "Kind",
    "TrainedWith",
    "copy_checkpoint",
    "file_sha256",
    "load_checkpoint",
    "load_state_strict",
    "read_checkpoint_info",
    "save_checkpoint",
]

FORMAT_VERSION = 2


@dataclass(frozen=True)
class Kind:
    """A checkpoint kind: its class, how to build it from ``args``, and how to read ``args`` off a module."""

    cls: type[nn.Module]
    build: Callable[[dict[str, Any]], nn.Module]
    args: Callable[[Any], dict[str, Any]]


KINDS: dict[str, Kind] = {
    "dit": Kind(DiT, lambda a: DiT(DiTArgs(**a)), lambda m: dataclasses.asdict(m.args)),
    "autoencoder": Kind(OobleckVAE, lambda a: OobleckVAE(**a), lambda m: dict(m.init_args)),
    "embedder": Kind(TextAudioEmbedding, lambda a: TextAudioEmbedding(EmbedderArgs(**a)), lambda m: m.init_args()),
    "rvq": Kind(ResidualVQ, lambda a: ResidualVQ(**a), lambda m: m.init_args()),
    "lmm": Kind(LMM, lambda a: LMM(LMMArgs(**a)), lambda m: m.init_args()),
    "number_conditioners": Kind(
        NumberConditioners,
        lambda a: NumberConditioners({k: tuple(v) for k, v in a["numbers"].items()}),
        lambda m: {"numbers": {k: list(v) for k, v in m.numbers.items()}},
    ),
}


@dataclass(frozen=True)
class TrainedWith:
    """How a checkpoint's weights were made. ``None`` = unknown (an older checkpoint, or not applicable).

    Attributes:
        stage: ``autoencoder``, ``base`` (bidirectional, random inpainting masks; also Stable Audio
            imports), ``lmdm`` (streaming fine-tune), ``arc`` (ARC-Forced LMDM), ``rvq`` or ``lmm`` (the LMM
            baseline and its tokenizer).
        objective: the diffusion objective (``v`` or ``rectified_flow``).
        variant: the stream variant an LMDM was trained for (``block_causal`` or ``encdec``), an LMM's kind
            (``flat`` or ``framewise``).
        block_frames, context_blocks: the block geometry it was trained with.
        autoencoder: SHA-256 of the autoencoder's ``model.safetensors`` whose latents it learned.
        text_encoder: the text encoder's fingerprint (:meth:`lmdm.text.encoders.TextEncoder.fingerprint`).
        source: where imported weights came from (a Stable Audio folder).
        rvq: SHA-256 of the RVQ tokenizer's ``model.safetensors`` an LMM was trained on.
    """

    stage: str | None = None
    objective: str | None = None
    variant: str | None = None
    block_frames: int | None = None
    context_blocks: int | None = None
    autoencoder: str | None = None
    text_encoder: str | None = None
    source: str | None = None
    rvq: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Any, where: str) -> TrainedWith:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - names:
            extra = sorted(set(data) - names) if isinstance(data, dict) else data
            raise CheckpointError(f"{where}: 'trained' must be an object with keys {sorted(names)}; got {extra!r}")
        return cls(**data)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint folder's ``config.json`` says (read without loading the weights)."""

    folder: Path
    kind: str
    args: dict[str, Any]
    trained: TrainedWith
    meta: dict[str, Any]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _kind_of(model: nn.Module) -> str:
    for name, kind in KINDS.items():
        if type(model) is kind.cls:
            return name
    raise CheckpointError(f"cannot save a {type(model).__name__}: no checkpoint kind for it (known: {sorted(KINDS)})")


def save_checkpoint(
    folder: str | Path,
    model: nn.Module,
    meta: dict[str, Any] | None = None,
    trained: TrainedWith | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` to ``folder/model.safetensors`` + ``folder/config.json``.

    Args:
        meta: JSON-serialisable extras (training step, EMA decay, ...).
        trained: how the weights were made (checked by loaders; see :mod:`lmdm.checkpoints.compat`).
        state: other tensors for ``model``'s kind and arguments (e.g. its EMA), instead of its own.

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kind = _kind_of(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in (state if state is not None else model.state_dict()).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "args": KINDS[kind].args(model),
        "trained": (trained or TrainedWith()).to_json(),
        "meta": meta or {},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def copy_checkpoint(source: str | Path, folder: str | Path) -> Path:
    """Copy a checkpoint folder's two files (and so everything it says it is) to ``folder``."""
    info = read_checkpoint_info(source)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(info.folder / name, folder / name)
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


def read_checkpoint_info(folder: str | Path, kind: str | None = None) -> CheckpointInfo:
    """Read a checkpoint folder's ``config.json``.

    Args:
        kind: the kind the caller needs (e.g. ``"dit"``); another kind is an error naming both.

    Raises:
        CheckpointError: missing files, invalid JSON, an unknown kind, or not the kind asked for.
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
    found = config.get("kind")
    if found not in KINDS:
        raise CheckpointError(f"{config_path}: unknown checkpoint kind {found!r}; expected one of {sorted(KINDS)}")
    if kind is not None and found != kind:
        raise CheckpointError(f"{folder} holds a checkpoint of kind {found!r} where kind {kind!r} is needed")
    return CheckpointInfo(
        folder=folder,
        kind=found,
        args=dict(config.get("args", {})),
        trained=TrainedWith.from_json(config.get("trained", {}), str(config_path)),
        meta=dict(config.get("meta", {})),
    )


def load_checkpoint(folder: str | Path, kind: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a module saved with :func:`save_checkpoint`.

    Args:
        kind: the kind the caller needs; another kind is an error naming both.

    Returns:
        ``(module in eval mode, meta)``.

    Raises:
        CheckpointError: missing files, unknown or wrong kind, bad arguments, or weights that do not match.
    """
    info = read_checkpoint_info(folder, kind)
    weights = info.folder / "model.safetensors"
    try:
        model = KINDS[info.kind].build(info.args)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{info.folder / 'config.json'}: cannot build a {info.kind} from its args ({exc})") from None
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{weights}: cannot read as safetensors ({exc})") from None
    load_state_strict(model, state, str(weights))
    return model.eval(), info.meta
