"""``lmdm generate``: stream audio from a DiT and an autoencoder, under prompts that may change by time.

With no checkpoint given it uses the quickstart's trained models (``runs/<config name>/lmdm`` and
``.../autoencoder``) where they exist, else a random initialisation, and says which it used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmdm.config import Config
from lmdm.streaming.prompts import PromptChange

__all__ = ["GenerateResult", "default_checkpoints", "run_generate"]


@dataclass(frozen=True)
class GenerateResult:
    """What ``lmdm generate`` wrote and how."""

    out: Path
    seconds: float
    blocks: int
    dit: str  # where the DiT came from (a checkpoint folder or "random init")
    autoencoder: str
    runtime: str


def default_checkpoints(cfg: Config) -> tuple[Path | None, Path | None]:
    """The quickstart's trained DiT (its LMDM) and the autoencoder it was trained on, where they exist.

    The autoencoder is the quickstart's own (``runs/<name>/autoencoder``, from a ``--from-scratch`` run) or,
    where the LMDM learned the pretrained pair's latents (the SHA-256 its checkpoint records), the pair's
    (``quickstart.base``)."""
    from lmdm.checkpoints.format import file_sha256, read_checkpoint_info

    root = Path("runs") / cfg.name

    def trained(p: Path) -> Path | None:
        return p if (p / "model.safetensors").is_file() and (p / "config.json").is_file() else None

    dit, own = trained(root / "lmdm"), trained(root / "autoencoder")
    if dit is None or cfg.quickstart.base is None:
        return dit, own
    wanted = read_checkpoint_info(dit).trained.autoencoder
    if wanted is None or (own is not None and file_sha256(own / "model.safetensors") == wanted):
        return dit, own
    from lmdm.pipelines.quickstart import pretrained_pair

    pair = pretrained_pair(cfg.quickstart.base)[0]
    return dit, pair if file_sha256(pair / "model.safetensors") == wanted else own


def run_generate(
    cfg: Config,
    out: Path,
    seconds: float,
    prompts: list[PromptChange] | None,
    dit_path: Path | None,
    autoencoder_path: Path | None,
    seed: int,
    on_block: Callable[[int, int], None] | None = None,
) -> GenerateResult:
    """Stream ``seconds`` of audio to ``out`` (a WAV), normalised to a 0.9 peak.

    Args:
        cfg: the config (``stream.*`` sets variant, steps, CFG scale, runtime).
        prompts: prompts by time (``None``: unconditional).
        dit_path, autoencoder_path: checkpoint folders; ``None``: the quickstart's, else random init.
        on_block: ``on_block(done, total)`` after each block (a progress bar).

    Raises:
        CheckpointError: a checkpoint folder that cannot be loaded.
        ValueError: checkpoints of the wrong kind, prompts for a model without text conditioning, or a
            text encoder whose width does not match the model's.
    """
    import torch

    from lmdm.audio.io import write_audio
    from lmdm.builders import build_engine, build_runtime, load_stream_models
    from lmdm.streaming.engines import Condition
    from lmdm.streaming.prompts import prompt_at
    from lmdm.streaming.stream import Stream

    if dit_path is None or autoencoder_path is None:
        default_dit, default_ae = default_checkpoints(cfg)
        dit_path, autoencoder_path = dit_path or default_dit, autoencoder_path or default_ae
    torch.manual_seed(seed)
    encoder = None
    if prompts:
        from lmdm.text.encoders import load_text_encoder

        encoder = load_text_encoder(cfg.text.encoder, cfg.text.path, cfg.text.max_tokens)
    dit, vae = load_stream_models(cfg, dit_path, autoencoder_path, encoder)
    dit.eval()
    vae.eval()
    latent_rate = cfg.audio.sample_rate / vae.downsampling_ratio
    Bf = cfg.stream.block_frames
    blocks = max(1, int(-(-seconds * latent_rate // Bf)))
    texts: dict[str, Any] = {}
    if prompts:
        assert encoder is not None
        if dit.args.cond_token_dim == 0:
            raise ValueError("this DiT has no text conditioning (dit.cond_token_dim = 0): generate without --prompt/--prompts")
        if encoder.dim != dit.args.cond_token_dim:
            raise ValueError(
                f"the DiT ({dit_path or 'random init'}) takes {dit.args.cond_token_dim}-d text tokens but text encoder "
                f"{cfg.text.encoder!r} gives {encoder.dim}-d ones: choose the encoder it was trained with (text.encoder, text.path)"
            )
        for change in prompts:
            if change.prompt not in texts:
                texts[change.prompt] = encoder.encode([change.prompt]).tokens.to(next(dit.parameters()).dtype)

    def schedule(block: int) -> Condition:
        if not prompts:
            return Condition()
        prompt = prompt_at(prompts, block * Bf / latent_rate)
        return Condition(texts[prompt], prompt)

    runtime = build_runtime(cfg, dit)
    stream = Stream(build_engine(cfg, dit, runtime=runtime), vae, schedule, generator=torch.Generator().manual_seed(seed))
    chunks = []
    with torch.inference_mode():
        for chunk in stream.chunks(blocks):  # each block's final audio, then the decoder's held-back tail
            chunks.append(chunk)
            if on_block is not None:
                on_block(min(stream.blocks, blocks), blocks)
    audio = torch.cat(chunks, dim=-1)[0, :, : int(seconds * cfg.audio.sample_rate)].float().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_audio(out, audio / max(1e-6, float(abs(audio).max())) * 0.9, cfg.audio.sample_rate)
    return GenerateResult(
        out=out,
        seconds=audio.shape[-1] / cfg.audio.sample_rate,
        blocks=blocks,
        dit=str(dit_path) if dit_path else "random init",
        autoencoder=str(autoencoder_path) if autoencoder_path else "random init",
        runtime=runtime.name,
    )
