"""Import a Stable Audio Open (or Open Small) diffusion checkpoint: DiT, timing conditioners, and the
Oobleck autoencoder (through :mod:`lmdm.checkpoints.sao_autoencoder`).

Every size is read from ``model_config.json``; options our classes do not implement (adaLN global
conditioning, patching, prepend conditioning, x-transformers layout, q/k norm) are clear errors
naming the config key. Keys: ``model.model.*`` (DiT, names identical to ours after the prefix),
``conditioner.conditioners.<id>.*`` (number conditioners for timing), ``pretransform.model.*``
(autoencoder). The T5 text encoder is not part of these files; it loads from a local path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from lmdm.checkpoints.errors import CheckpointError
from lmdm.checkpoints.format import load_state_strict
from lmdm.models.conditioners import NumberConditioners
from lmdm.models.dit import DiT, DiTArgs

__all__ = [
    "SaoDiffusion",
    "SaoDiffusionSpec",
    "import_sao",
    "load_sao_diffusion",
    "read_sao_diffusion_config",
]

DIT_PREFIX = "model.model."
CONDITIONER_PREFIX = "conditioner.conditioners."
# Config keys of the DiT section we read, with the only values our DiT implements (None = any).
_SUPPORTED: dict[str, Any] = {
    "io_channels": None,
    "embed_dim": None,
    "depth": None,
    "num_heads": None,
    "cond_token_dim": None,
    "global_cond_dim": None,
    "project_cond_tokens": None,
    "input_concat_dim": None,
    "transformer_type": "continuous_transformer",
    "global_cond_type": "prepend",
    "timestep_cond_type": "global",
    "patch_size": 1,
    "prepend_cond_dim": 0,
    "project_global_cond": True,
}


@dataclass(frozen=True)
class SaoDiffusionSpec:
    """What ``model_config.json`` says about the diffusion model."""

    dit: DiTArgs
    objective: str
    sample_rate: int
    audio_channels: int
    cross_attention_cond_ids: tuple[str, ...]
    global_cond_ids: tuple[str, ...]
    numbers: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # id → (output_dim, min, max)


@dataclass
class SaoDiffusion:
    """An imported diffusion checkpoint."""

    dit: DiT
    spec: SaoDiffusionSpec
    conditioners: NumberConditioners


def _get(node: dict[str, Any], key: str, where: str, path: Path) -> Any:
    if key not in node:
        raise CheckpointError(f"{path}: {where}.{key} is missing")
    return node[key]


def read_sao_diffusion_config(config_path: str | Path) -> SaoDiffusionSpec:
    """Parse a ``diffusion_cond`` ``model_config.json``.

    Raises:
        CheckpointError: not a ``diffusion_cond`` config, or an unsupported option (names the key).
    """
    path = Path(config_path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the model config ({exc})") from None
    if config.get("model_type") != "diffusion_cond":
        raise CheckpointError(f"{path}: model_type is {config.get('model_type')!r}; `lmdm import-sao` reads 'diffusion_cond' models")
    model = _get(config, "model", "", path)
    diffusion = _get(model, "diffusion", "model", path)
    if diffusion.get("type") != "dit":
        raise CheckpointError(f"{path}: model.diffusion.type is {diffusion.get('type')!r}; only 'dit' is supported")
    dit_cfg = _get(diffusion, "config", "model.diffusion", path)
    unknown = sorted(set(dit_cfg) - set(_SUPPORTED))
    if unknown:
        raise CheckpointError(f"{path}: model.diffusion.config has options this importer does not implement: {unknown}")
    if dit_cfg.get("global_cond_type", "prepend") == "adaLN":
        raise CheckpointError(
            f"{path}: model.diffusion.config.global_cond_type = 'adaLN' is not supported: adaLN modulates every token "
            "(context included) with the timestep, so an LMDM could not cache context keys/values; only 'prepend' "
            "(one global token) is imported"
        )
    for key, only in _SUPPORTED.items():
        if only is not None and key in dit_cfg and dit_cfg[key] != only:
            raise CheckpointError(f"{path}: model.diffusion.config.{key} = {dit_cfg[key]!r} is not supported (only {only!r})")
    embed_dim, num_heads = (
        int(_get(dit_cfg, "embed_dim", "model.diffusion.config", path)),
        int(_get(dit_cfg, "num_heads", "model.diffusion.config", path)),
    )
    args = DiTArgs(
        io_channels=int(_get(dit_cfg, "io_channels", "model.diffusion.config", path)),
        width=embed_dim,
        depth=int(_get(dit_cfg, "depth", "model.diffusion.config", path)),
        head_dim=embed_dim // num_heads,
        cond_token_dim=int(dit_cfg.get("cond_token_dim", 0)),
        project_cond_tokens=bool(dit_cfg.get("project_cond_tokens", True)),
        global_cond_dim=int(dit_cfg.get("global_cond_dim", 0)),
        input_concat_dim=int(dit_cfg.get("input_concat_dim", 0)),
    )
    objective = diffusion.get("diffusion_objective", "v")
    if objective not in ("v", "rectified_flow", "rf_denoiser"):
        raise CheckpointError(f"{path}: model.diffusion.diffusion_objective {objective!r} is not supported ('v' or 'rectified_flow')")
    numbers: dict[str, tuple[int, float, float]] = {}
    for entry in model.get("conditioning", {}).get("configs", []):
        if entry.get("type") == "number":
            cfg = entry.get("config", {})
            numbers[entry["id"]] = (
                int(model["conditioning"].get("cond_dim", args.cond_token_dim)),
                float(cfg.get("min_val", 0)),
                float(cfg.get("max_val", 1)),
            )
    return SaoDiffusionSpec(
        dit=args,
        objective="rectified_flow" if objective == "rf_denoiser" else objective,
        sample_rate=int(config.get("sample_rate", 44100)),
        audio_channels=int(config.get("audio_channels", 2)),
        cross_attention_cond_ids=tuple(diffusion.get("cross_attention_cond_ids", [])),
        global_cond_ids=tuple(diffusion.get("global_cond_ids", [])),
        numbers=numbers,
    )


def load_sao_diffusion(folder_or_config: str | Path, weights_path: str | Path | None = None) -> SaoDiffusion:
    """Build the DiT (and timing conditioners) of a Stable Audio checkpoint and load their weights.

    Raises:
        CheckpointError: missing files, non-safetensors weights, unsupported config options, or
            weights that do not match (every missing/unexpected key and shape listed).
    """
    path = Path(folder_or_config)
    config_path = path / "model_config.json" if path.is_dir() else path
    weights = Path(weights_path) if weights_path else config_path.parent / "model.safetensors"
    if weights.suffix != ".safetensors":
        raise CheckpointError(f"{weights}: only .safetensors weights are read (pickle checkpoints can run code)")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: no such weights file")
    spec = read_sao_diffusion_config(config_path)
    dit = DiT(spec.dit)
    conditioners = NumberConditioners(spec.numbers)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            dit_state = {k.removeprefix(DIT_PREFIX): f.get_tensor(k) for k in keys if k.startswith(DIT_PREFIX)}
            cond_state = {k.removeprefix(CONDITIONER_PREFIX): f.get_tensor(k) for k in keys if k.startswith(CONDITIONER_PREFIX)}
            stray = [k for k in keys if not k.startswith((DIT_PREFIX, CONDITIONER_PREFIX, "pretransform."))]
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{weights}: cannot read as safetensors ({exc})") from None
    if stray:
        raise CheckpointError(f"{weights}: keys outside model.model., conditioner.conditioners. and pretransform.: {stray[:30]}")
    load_state_strict(dit, dit_state, f"{weights} (model.model.*)")
    # Conditioners other than numbers (e.g. the T5 prompt encoder's optional projection) are not imported.
    known = {k: v for k, v in cond_state.items() if k.split(".", 1)[0] in spec.numbers}
    other = sorted({k.split(".", 1)[0] for k in cond_state} - set(spec.numbers))
    if other:
        raise CheckpointError(f"{weights}: conditioner weights for {other} are not supported by this importer (only number conditioners)")
    load_state_strict(conditioners, known, f"{weights} (conditioner.conditioners.*)")
    return SaoDiffusion(dit=dit.eval(), spec=spec, conditioners=conditioners.eval())


def import_sao(folder_or_config: str | Path, out: str | Path) -> dict[str, Path]:
    """Convert a Stable Audio checkpoint into our format under ``out``.

    Writes ``out/dit`` (and ``out/conditioners`` when the checkpoint has timing conditioners, and
    ``out/autoencoder`` when it carries ``pretransform.*`` weights), each a folder of
    ``model.safetensors`` + ``config.json``.

    Returns:
        What was written, by component.

    Raises:
        CheckpointError: see :func:`load_sao_diffusion` and :func:`~lmdm.checkpoints.sao_autoencoder.load_sao_autoencoder`.
    """
    from lmdm.checkpoints.format import TrainedWith, file_sha256, save_checkpoint
    from lmdm.checkpoints.sao_autoencoder import load_sao_autoencoder

    path = Path(folder_or_config)
    config_path = path / "model_config.json" if path.is_dir() else path
    weights = config_path.parent / "model.safetensors"
    out = Path(out)
    imported = load_sao_diffusion(config_path, weights)
    spec = imported.spec
    meta = {
        "sample_rate": spec.sample_rate,
        "audio_channels": spec.audio_channels,
        "cross_attention_cond_ids": list(spec.cross_attention_cond_ids),
        "global_cond_ids": list(spec.global_cond_ids),
    }
    written: dict[str, Path] = {}
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        has_autoencoder = any(k.startswith("pretransform.") for k in f.keys())  # noqa: SIM118 (safe_open is not a mapping)
    autoencoder_sha = None
    if has_autoencoder:
        trained = TrainedWith(stage="autoencoder", source=str(path))
        written["autoencoder"] = save_checkpoint(out / "autoencoder", load_sao_autoencoder(config_path, weights), meta, trained)
        autoencoder_sha = file_sha256(written["autoencoder"] / "model.safetensors")
    # A Stable Audio DiT is bidirectional: a base (its text encoder, T5, is not part of the file: unknown).
    trained = TrainedWith(stage="base", objective=spec.objective, autoencoder=autoencoder_sha, source=str(path))
    written["dit"] = save_checkpoint(out / "dit", imported.dit, meta, trained)
    if spec.numbers:
        written["conditioners"] = save_checkpoint(out / "conditioners", imported.conditioners, meta, TrainedWith(source=str(path)))
    return written
