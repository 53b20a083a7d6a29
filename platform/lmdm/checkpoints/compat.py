"""Checks that a checkpoint fits where it is used, and the documented mapping of a DiT onto a model
with more inputs (DESIGN §6).

Each check compares what a checkpoint says it was trained with (:class:`~lmdm.checkpoints.format.TrainedWith`)
against what the caller is about to do, and raises a :class:`~lmdm.checkpoints.errors.CheckpointError`
naming both values and what to change. An unknown value (an older checkpoint) is not checked.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lmdm.checkpoints.errors import CheckpointError
from lmdm.checkpoints.format import CheckpointInfo, load_state_strict
from lmdm.models.dit import DiT, DiTArgs

__all__ = [
    "STREAMING_VARIANTS",
    "check_fingerprints",
    "check_init",
    "check_lmm_streaming",
    "check_streaming",
    "load_init",
    "widen_inputs",
]

STREAMING_VARIANTS = ("block_causal", "encdec")  # the LMDM variants (outpainting streams a base)


def _short(value: str | None) -> str:
    return value[:12] if value else "unknown"


def check_fingerprints(info: CheckpointInfo, *, autoencoder: str | None, text_encoder: str | None, what: str) -> None:
    """The checkpoint's autoencoder and text-encoder fingerprints equal ``what``'s (each checked when both are known).

    Args:
        autoencoder: SHA-256 of the autoencoder's ``model.safetensors`` about to be used.
        text_encoder: the text encoder's fingerprint about to be used.
        what: names the other side in the message (e.g. ``"the autoencoder runs/q/autoencoder"``).
    """
    t = info.trained
    if t.autoencoder and autoencoder and t.autoencoder != autoencoder:
        raise CheckpointError(
            f"{info.folder} was trained on latents of the autoencoder {_short(t.autoencoder)} (SHA-256 of its model.safetensors), "
            f"but {what} uses the autoencoder {_short(autoencoder)}: its latents mean something else to this model. "
            "Use the autoencoder it was trained with, or train (precompute, then fine-tune) on the new one"
        )
    if t.text_encoder and text_encoder and t.text_encoder != text_encoder:
        raise CheckpointError(
            f"{info.folder} was trained with the text encoder {_short(t.text_encoder)}, but {what} uses the text encoder "
            f"{_short(text_encoder)}: set text.encoder / text.path to the one it was trained with"
        )


def check_streaming(
    info: CheckpointInfo,
    *,
    variant: str,
    block_frames: int,
    context_blocks: int,
    objective: str,
    autoencoder: str | None = None,
    text_encoder: str | None = None,
) -> None:
    """Refuse to stream ``info``'s DiT where it does not fit.

    Args:
        variant: ``stream.variant`` (``outpainting``, ``block_causal`` or ``encdec``).
        block_frames, context_blocks: the stream geometry (``stream.*``).
        objective: the objective the sampler will assume (``dit.objective``).
        autoencoder, text_encoder: fingerprints of the autoencoder and text encoder in use.

    Raises:
        CheckpointError: a base where an LMDM is needed, another LMDM variant, other block frames, a
            longer context than trained, another objective, autoencoder or text encoder.
    """
    t, where = info.trained, str(info.folder)
    if t.stage not in (None, "base", "lmdm", "arc"):
        raise CheckpointError(f"{where} was trained as stage {t.stage!r}; streaming needs a DiT trained as 'base', 'lmdm' or 'arc'")
    if variant in STREAMING_VARIANTS and t.stage == "base":
        raise CheckpointError(
            f"{where} is a bidirectional base model, but stream.variant={variant!r} needs an LMDM: fine-tune it first "
            f"(`lmdm train --stage lmdm train.init={where}`), or stream it with stream.variant=outpainting"
        )
    if variant in STREAMING_VARIANTS and t.variant and t.variant != variant:
        raise CheckpointError(
            f"{where} is an LMDM trained for stream.variant={t.variant!r}, not {variant!r}: set stream.variant={t.variant}"
        )
    if t.objective and t.objective != objective:
        raise CheckpointError(
            f"{where} was trained with objective {t.objective!r}, but dit.objective is {objective!r}: set dit.objective={t.objective}"
        )
    if t.block_frames is not None and t.block_frames != block_frames:
        raise CheckpointError(
            f"{where} was trained with blocks of {t.block_frames} latent frames, but stream.block_frames is {block_frames}: "
            f"set stream.block_frames={t.block_frames}"
        )
    if t.context_blocks is not None and context_blocks > t.context_blocks:
        raise CheckpointError(
            f"stream.context_blocks={context_blocks} is a longer context than {where} was trained with ({t.context_blocks} blocks): "
            f"set stream.context_blocks to at most {t.context_blocks}, or fine-tune with the longer context"
        )
    check_fingerprints(info, autoencoder=autoencoder, text_encoder=text_encoder, what="this stream")


def check_lmm_streaming(
    info: CheckpointInfo, *, kind: str, latent_channels: int, autoencoder: str | None = None, text_encoder: str | None = None
) -> None:
    """Refuse to stream ``info``'s LMM where it does not fit.

    Args:
        kind: the LMM design asked for (``flat`` or ``framewise``).
        latent_channels: the autoencoder's latent width.
        autoencoder, text_encoder: fingerprints of the autoencoder and text encoder in use.

    Raises:
        CheckpointError: another kind of checkpoint or LMM design, other latents, another autoencoder or text encoder.
    """
    where = str(info.folder)
    if info.kind != "lmm":
        raise CheckpointError(
            f"{where} holds a checkpoint of kind {info.kind!r}; variant {kind!r} streams an LMM (`lmdm train --stage lmm`)"
        )
    found = info.args.get("kind")
    if found != kind:
        raise CheckpointError(f"{where} is a {found} LMM, not {kind}: stream it as variant {found!r}")
    if info.args.get("latent_channels") != latent_channels:
        raise CheckpointError(
            f"{where} makes {info.args.get('latent_channels')}-channel latents but the autoencoder decodes {latent_channels}: "
            "pass the autoencoder it was trained with"
        )
    check_fingerprints(info, autoencoder=autoencoder, text_encoder=text_encoder, what="this stream")


# DiT arguments a fine-tune may not change (input_concat_dim may grow: widen_inputs).
_FIXED_ARGS = ("io_channels", "width", "depth", "head_dim", "cond_token_dim", "project_cond_tokens", "global_cond_dim")
_CONFIG_KEY = {"io_channels": "autoencoder.latent_channels"}


def check_init(
    info: CheckpointInfo,
    *,
    stage: str,
    args: DiTArgs,
    objective: str,
    autoencoder: str | None,
    text_encoder: str | None,
) -> None:
    """Refuse ``train.init`` = ``info`` for training ``stage`` with a model of ``args`` where it does not fit.

    Raises:
        CheckpointError: another kind, another model size (each key named, config value and checkpoint
            value), another objective, fewer input channels than it has, another autoencoder or text encoder.
    """
    need = "autoencoder" if stage == "autoencoder" else "dit"
    if info.kind != need:
        raise CheckpointError(
            f"train.init={info.folder} holds a checkpoint of kind {info.kind!r}, but stage {stage!r} trains kind {need!r}"
        )
    if need == "autoencoder":
        return
    found = DiTArgs(**info.args)
    differs = [
        f"{_CONFIG_KEY.get(k, 'dit.' + k)}: config {getattr(args, k)!r}, checkpoint {getattr(found, k)!r}"
        for k in _FIXED_ARGS
        if getattr(args, k) != getattr(found, k)
    ]
    if differs:
        raise CheckpointError(f"train.init={info.folder} is another model than the config builds; set:\n  " + "\n  ".join(differs))
    if found.input_concat_dim not in (0, args.input_concat_dim):
        raise CheckpointError(
            f"train.init={info.folder} takes {found.input_concat_dim} conditioning input channels; the {stage} stage's DiT "
            f"takes {args.input_concat_dim} (or a checkpoint with none, widened with zeros)"
        )
    t = info.trained
    if t.objective and t.objective != objective:
        raise CheckpointError(f"train.init={info.folder} was trained with objective {t.objective!r}, but dit.objective is {objective!r}")
    check_fingerprints(info, autoencoder=autoencoder, text_encoder=text_encoder, what="this training run's latents")


def widen_inputs(state: dict[str, Tensor], args: DiTArgs) -> dict[str, Tensor]:
    """Map a DiT state dict onto a model with ``args.input_concat_dim`` extra input channels (DESIGN §6).

    A model with fewer inputs (a Stable Audio import: none) gets the new channels zero-initialised: the
    new columns of ``transformer.project_in.weight`` and the new rows and columns of
    ``preprocess_conv.weight`` are zeros, so the widened model computes exactly the old function on the
    old channels whatever the new ones hold, and every other tensor is the same tensor. A state dict
    already of that width is returned as is.
    """
    old_in = state["transformer.project_in.weight"].shape[1]
    new_in = args.io_channels + args.input_concat_dim
    if old_in == new_in:
        return state
    if old_in > new_in:
        raise CheckpointError(f"cannot narrow a DiT from {old_in} to {new_in} input channels")
    out = dict(state)
    project_in = state["transformer.project_in.weight"]
    out["transformer.project_in.weight"] = torch.cat([project_in, project_in.new_zeros(project_in.shape[0], new_in - old_in)], dim=1)
    conv = state["preprocess_conv.weight"]
    wide = conv.new_zeros(new_in, new_in, conv.shape[2])
    wide[:old_in, :old_in] = conv
    out["preprocess_conv.weight"] = wide
    return out


def load_init(module: nn.Module, folder: str | Path) -> None:
    """Load ``train.init`` (a checkpoint folder) into ``module``; a DiT with fewer conditioning inputs is
    widened with zeros (:func:`widen_inputs`). Strict otherwise (every bad key listed)."""
    from safetensors.torch import load_file

    weights = Path(folder) / "model.safetensors"
    state = load_file(str(weights))
    load_state_strict(module, widen_inputs(state, module.args) if isinstance(module, DiT) else state, str(weights))
