"""Load Stable Audio (stable-audio-tools) Oobleck VAE checkpoints into :class:`~lmdm.models.autoencoder.OobleckVAE`.

A Stable Audio folder holds ``model_config.json`` and ``model.safetensors``. The autoencoder config
sits at ``model.pretransform.config`` (a ``diffusion_cond`` model, or an autoencoder exported as a
pretransform) or at ``model`` itself (an ``autoencoder`` config with ``model.encoder``). Its weights
are ``pretransform.model.{encoder,decoder}.*`` in full checkpoints, or bare ``{encoder,decoder}.*``;
the other components of a full checkpoint (``model.*`` DiT, ``conditioner.*``) are skipped, anything
else is an unexpected key. Every size is read from the config; a key absent from an encoder/decoder
config takes stable-audio-tools' constructor default (``ENCODER_DEFAULTS``, ``DECODER_DEFAULTS``),
which is what stable-audio-tools itself builds. Only safetensors files are read, never pickles.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from lmdm.checkpoints.errors import CheckpointError
from lmdm.models.autoencoder import OobleckVAE

__all__ = [
    "DECODER_DEFAULTS",
    "ENCODER_DEFAULTS",
    "SAO_PREFIX",
    "SaoAutoencoderSpec",
    "convert_sao_state_dict",
    "lmdm_key_to_sao",
    "load_sao_autoencoder",
    "read_sao_autoencoder_config",
    "sao_key_to_lmdm",
]

SAO_PREFIX = "pretransform.model."
OTHER_COMPONENTS = ("model.", "conditioner.")  # DiT and conditioners of a full Stable Audio checkpoint
_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
_MAX_LISTED = 40

# stable-audio-tools' OobleckEncoder / OobleckDecoder constructor defaults (models/autoencoders.py).
ENCODER_DEFAULTS: dict[str, Any] = {
    "in_channels": 2,
    "channels": 128,
    "latent_dim": 32,
    "c_mults": [1, 2, 4, 8],
    "strides": [2, 4, 8, 8],
    "use_snake": False,
    "antialias_activation": False,
}
DECODER_DEFAULTS: dict[str, Any] = {
    "out_channels": 2,
    "channels": 128,
    "latent_dim": 32,
    "c_mults": [1, 2, 4, 8],
    "strides": [2, 4, 8, 8],
    "use_snake": False,
    "antialias_activation": False,
    "use_nearest_upsample": False,
    "final_tanh": True,
}
_SUPPORTED_OPTIONS = {"use_snake": True, "antialias_activation": False, "use_nearest_upsample": False}
_AUTOENCODER_KEYS = {"encoder", "decoder", "bottleneck", "latent_dim", "downsampling_ratio", "io_channels", "in_channels", "out_channels"}
_PRETRANSFORM_KEYS = {"type", "config", "scale", "model_half", "iterate_batch", "enable_grad"}  # the last three only change execution
_CODEC_KEYS = {"type", "config", "requires_grad", "soft_clip"}


@dataclass(frozen=True)
class SaoAutoencoderSpec:
    """The :class:`OobleckVAE` arguments read from a Stable Audio ``model_config.json``."""

    audio_channels: int
    channels: int
    c_mults: tuple[int, ...]
    strides: tuple[int, ...]
    latent_dim: int
    final_tanh: bool

    def build(self) -> OobleckVAE:
        """A randomly initialised :class:`OobleckVAE` of this shape."""
        return OobleckVAE(self.audio_channels, self.channels, self.c_mults, self.strides, self.latent_dim, self.final_tanh)


class _Config:
    """Reads a parsed JSON config; every failure names the file and the dotted key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {key}: {problem}")

    def section(self, node: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
        dotted = f"{where}.{key}" if where else key
        if key not in node:
            raise self.error(dotted, "missing")
        value = node[key]
        if not isinstance(value, dict):
            raise self.error(dotted, f"expected a mapping, got {type(value).__name__}")
        return value

    def only(self, node: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
        unknown = sorted(set(node) - set(allowed))
        if unknown:
            raise self.error(where, f"unknown or unsupported keys {unknown}; allowed: {sorted(allowed)}")

    def integer(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.error(key, f"expected a positive integer, got {value!r}")
        return value

    def integers(self, value: Any, key: str) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            raise self.error(key, f"expected a non-empty list of positive integers, got {value!r}")
        return tuple(self.integer(v, f"{key}[{i}]") for i, v in enumerate(value))

    def codec(self, ae: Mapping[str, Any], name: str, where: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The encoder or decoder config with stable-audio-tools' defaults filled in, checked for supported options."""
        codec = self.section(ae, name, where)
        at = f"{where}.{name}"
        self.only(codec, _CODEC_KEYS, at)
        if codec.get("type") != "oobleck":
            raise self.error(f"{at}.type", f"only 'oobleck' is supported, got {codec.get('type')!r}")
        if codec.get("soft_clip", False):
            raise self.error(f"{at}.soft_clip", "soft clipping (tanh after the autoencoder) is not supported; set it to false")
        config = self.section(codec, "config", at)
        self.only(config, defaults, f"{at}.config")
        merged = {**defaults, **config}
        for option, supported in _SUPPORTED_OPTIONS.items():
            if option in merged and merged[option] is not supported:
                got = repr(config[option]) if option in config else f"absent, so the stable-audio-tools default {merged[option]!r},"
                raise self.error(f"{at}.config.{option}", f"{got} is not supported; only {option}: {str(supported).lower()} is implemented")
        return merged


def read_sao_autoencoder_config(config_path: str | Path) -> SaoAutoencoderSpec:
    """Read the Oobleck VAE shape from a Stable Audio ``model_config.json``.

    Args:
        config_path: the JSON file (``model_type`` ``autoencoder`` or ``diffusion_cond``).

    Returns:
        The :class:`SaoAutoencoderSpec`.

    Raises:
        CheckpointError: unreadable JSON, a missing or malformed key, an unsupported option (ELU instead
            of snake, anti-aliasing, nearest upsampling, a non-VAE bottleneck, a pretransform scale) or an
            encoder and decoder that disagree; the message names the file and the dotted key.
    """
    path = Path(config_path)
    cfg = _Config(path)
    try:
        top = json.loads(path.read_text())
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the model config ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(top, dict):
        raise CheckpointError(f"{path}: the top level must be a JSON object")
    model_type = top.get("model_type")
    model = cfg.section(top, "model", "")
    if model_type == "autoencoder" and "encoder" in model:
        ae, where = model, "model"
        if "pretransform" in model:
            raise cfg.error("model.pretransform", "an autoencoder with its own pretransform is not supported")
    elif model_type in {"autoencoder", "diffusion_cond", "diffusion_cond_inpaint", "diffusion_uncond"} and "pretransform" in model:
        pretransform = cfg.section(model, "pretransform", "model")
        cfg.only(pretransform, _PRETRANSFORM_KEYS, "model.pretransform")
        if pretransform.get("type") != "autoencoder":
            raise cfg.error("model.pretransform.type", f"only 'autoencoder' is supported, got {pretransform.get('type')!r}")
        if pretransform.get("scale", 1.0) != 1.0:
            raise cfg.error("model.pretransform.scale", f"{pretransform['scale']!r} is not supported; only 1.0 (latents unscaled)")
        ae, where = cfg.section(pretransform, "config", "model.pretransform"), "model.pretransform.config"
    else:
        raise cfg.error(
            "model",
            f"no autoencoder found for model_type {model_type!r}: expected model.pretransform.config, or model.encoder when model_type is 'autoencoder'",
        )
    cfg.only(ae, _AUTOENCODER_KEYS, where)
    enc = cfg.codec(ae, "encoder", where, ENCODER_DEFAULTS)
    dec = cfg.codec(ae, "decoder", where, DECODER_DEFAULTS)
    bottleneck = cfg.section(ae, "bottleneck", where)
    cfg.only(bottleneck, {"type"}, f"{where}.bottleneck")
    if bottleneck.get("type") != "vae":
        raise cfg.error(f"{where}.bottleneck.type", f"only 'vae' is supported, got {bottleneck.get('type')!r}")

    e, d = f"{where}.encoder.config", f"{where}.decoder.config"
    for key in ("channels", "c_mults", "strides"):
        if enc[key] != dec[key]:
            raise cfg.error(
                f"{d}.{key}", f"{dec[key]!r} differs from {e}.{key} {enc[key]!r}; only mirrored encoders and decoders are supported"
            )
    channels = cfg.integer(dec["channels"], f"{d}.channels")
    c_mults = cfg.integers(dec["c_mults"], f"{d}.c_mults")
    strides = cfg.integers(dec["strides"], f"{d}.strides")
    if len(c_mults) != len(strides) or any(s % 2 for s in strides):
        raise cfg.error(f"{d}.strides", f"{list(strides)}: need even strides, one per c_mults entry ({list(c_mults)})")
    latent_dim = cfg.integer(dec["latent_dim"], f"{d}.latent_dim")
    if cfg.integer(enc["latent_dim"], f"{e}.latent_dim") != 2 * latent_dim:
        raise cfg.error(f"{e}.latent_dim", f"{enc['latent_dim']} must be twice {d}.latent_dim ({latent_dim}) for a VAE (mean and scale)")
    audio_channels = cfg.integer(dec["out_channels"], f"{d}.out_channels")
    checks = {
        f"{e}.in_channels": (enc["in_channels"], audio_channels),
        f"{where}.latent_dim": (ae.get("latent_dim", latent_dim), latent_dim),
        f"{where}.downsampling_ratio": (ae.get("downsampling_ratio", math.prod(strides)), math.prod(strides)),
        f"{where}.io_channels": (ae.get("io_channels", audio_channels), audio_channels),
        f"{where}.in_channels": (ae.get("in_channels", audio_channels), audio_channels),
        f"{where}.out_channels": (ae.get("out_channels", audio_channels), audio_channels),
        "audio_channels": (top.get("audio_channels", audio_channels), audio_channels),
    }
    for key, (got, want) in checks.items():
        if got != want:
            raise cfg.error(key, f"{got!r} disagrees with the encoder/decoder config, which implies {want!r}")
    final_tanh = dec["final_tanh"]
    if not isinstance(final_tanh, bool):
        raise cfg.error(f"{d}.final_tanh", f"expected true or false, got {final_tanh!r}")
    return SaoAutoencoderSpec(audio_channels, channels, c_mults, strides, latent_dim, final_tanh)


def sao_key_to_lmdm(key: str) -> str:
    """Rename one Stable Audio key (prefix already stripped) to ours: ``….weight_g`` → ``….parametrizations.weight.original0``."""
    head, _, leaf = key.rpartition(".")
    return f"{head}.{_WEIGHT_NORM[leaf]}" if leaf in _WEIGHT_NORM else key


def lmdm_key_to_sao(key: str) -> str:
    """Inverse of :func:`sao_key_to_lmdm`."""
    for sao, ours in _WEIGHT_NORM.items():
        if key.endswith("." + ours):
            return key.removesuffix(ours) + sao
    return key


def _detect_prefix(keys: Iterable[str]) -> str:
    """``pretransform.model.`` when any key carries it (a full Stable Audio checkpoint), else ``""``."""
    return SAO_PREFIX if any(k.startswith(SAO_PREFIX) for k in keys) else ""


def _is_other_component(key: str, prefix: str) -> bool:
    return bool(prefix) and key.startswith(OTHER_COMPONENTS)


def _listed(lines: list[str]) -> str:
    shown = lines[:_MAX_LISTED]
    more = f"\n    … and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    return "".join(f"\n    {line}" for line in shown) + more


def convert_sao_state_dict(sao: Mapping[str, Tensor], model: nn.Module, source: str) -> dict[str, Tensor]:
    """Map a Stable Audio autoencoder state dict onto ``model``'s keys, strictly.

    Strips ``pretransform.model.`` (when present; else keys must be bare ``encoder.*``/``decoder.*``),
    renames weight-norm keys, skips other components of a full checkpoint (``model.*``, ``conditioner.*``).

    Args:
        sao: tensors keyed as in the Stable Audio file.
        model: the module the result will load into (its state dict gives the expected keys and shapes).
        source: the file name, for messages.

    Returns:
        A state dict ``model.load_state_dict(..., strict=True)`` accepts.

    Raises:
        CheckpointError: listing every missing key, unexpected key and shape mismatch (file names and shapes).
    """
    prefix = _detect_prefix(sao)
    expected = model.state_dict()
    converted: dict[str, Tensor] = {}
    unexpected: list[str] = []
    mismatched: dict[str, str] = {}  # our key → message line
    for key, tensor in sao.items():
        if _is_other_component(key, prefix):
            continue
        ours = sao_key_to_lmdm(key.removeprefix(prefix)) if key.startswith(prefix) else None
        if ours is None or ours not in expected:
            unexpected.append(f"{key} {list(tensor.shape)}")
        elif tensor.shape != expected[ours].shape:
            mismatched[ours] = f"{key}: file {list(tensor.shape)}, model expects {list(expected[ours].shape)}"
        else:
            converted[ours] = tensor
    missing = [f"{prefix}{lmdm_key_to_sao(k)} {list(v.shape)}" for k, v in expected.items() if k not in converted and k not in mismatched]
    if unexpected or missing or mismatched:
        parts = [f"{source}: the weights do not match the Oobleck VAE built from the config"]
        for title, lines in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", list(mismatched.values()))):
            if lines:
                parts.append(f"  {title} ({len(lines)}):{_listed(lines)}")
        parts.append("Check that model_config.json belongs to this model.safetensors and that the file is an Oobleck VAE checkpoint.")
        raise CheckpointError("\n".join(parts))
    return converted


def _resolve(folder_or_config_path: str | Path, weights_path: str | Path | None) -> tuple[Path, Path]:
    path = Path(folder_or_config_path)
    config_path = path / "model_config.json" if path.is_dir() else path
    weights = Path(weights_path) if weights_path is not None else config_path.parent / "model.safetensors"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: no such model config; pass a Stable Audio folder or its model_config.json")
    if weights.suffix != ".safetensors":
        raise CheckpointError(f"{weights}: only .safetensors weights are read (pickle checkpoints can run code); convert the file first")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: no such weights file")
    return config_path, weights


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """The file's tensors, without loading the other components of a full checkpoint."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            prefix = _detect_prefix(keys)
            return {k: f.get_tensor(k) for k in keys if not _is_other_component(k, prefix)}
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot read as safetensors ({exc})") from None


def load_sao_autoencoder(folder_or_config_path: str | Path, weights_path: str | Path | None = None) -> OobleckVAE:
    """Build an :class:`OobleckVAE` from a Stable Audio config and load its weights.

    Args:
        folder_or_config_path: a folder with ``model_config.json`` (and ``model.safetensors``), or the config file.
        weights_path: the ``.safetensors`` file; defaults to ``model.safetensors`` next to the config.

    Returns:
        The VAE in eval mode, float32, on CPU.

    Raises:
        CheckpointError: a missing file, a non-safetensors file, an unsupported or inconsistent config
            (naming the key), or weights that do not match (listing the keys and shapes).
    """
    config_path, weights = _resolve(folder_or_config_path, weights_path)
    vae = read_sao_autoencoder_config(config_path).build()
    state = convert_sao_state_dict(_read_safetensors(weights), vae, str(weights))
    with torch.no_grad():
        vae.load_state_dict(state, strict=True)
    return vae.eval()
