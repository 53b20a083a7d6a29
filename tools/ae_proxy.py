"""A cheap proxy for autoencoder recipes: train one in this process for a few minutes, then print the
reconstruction figures of ``lmdm eval reconstruction`` on held-out clips.

Not the training stage (that is ``lmdm pretrain`` / ``lmdm train --stage autoencoder``, on Ray Train);
this compares recipes quickly on one machine, with the same model, losses and figures.

    python tools/ae_proxy.py --config corpus-base --minutes 10 --mel 15 --adv 1 --fm 2 --out /tmp/ae-a
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="corpus-base")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. autoencoder.channels=32")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: by time)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=16, help="latent frames per training segment")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-final", type=float, default=0.0, help="cosine-decay to this rate by the end (0: constant)")
    p.add_argument("--disc-lr", type=float, default=0.0, help="0: the generator's")
    p.add_argument("--stft", type=float, default=1.0)
    p.add_argument("--stft-ffts", default="256,512,1024")
    p.add_argument("--mel", type=float, default=0.0)
    p.add_argument("--waveform", type=float, default=1.0)
    p.add_argument("--kl", type=float, default=1e-4)
    p.add_argument("--adv", type=float, default=0.0)
    p.add_argument("--fm", type=float, default=0.0)
    p.add_argument("--adv-start", type=int, default=0, help="step the discriminator starts at")
    p.add_argument("--disc-filters", type=int, default=32)
    p.add_argument("--disc-ffts", default="1024,512,256,128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()

    from lmdm.audio.io import load_audio
    from lmdm.builders import build_autoencoder_from
    from lmdm.checkpoints.format import save_checkpoint
    from lmdm.config import load_config
    from lmdm.data.chunks import list_inputs
    from lmdm.eval.reconstruction import run_reconstruction
    from lmdm.training.autoencoder_loss import (
        AutoencoderWeights,
        MelLoss,
        MultiScaleSTFTDiscriminator,
        autoencoder_loss,
        discriminator_loss,
    )

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = load_config(a.config, a.set)
    records = list_inputs(cfg.data.source, cfg.data.root, cfg.data.captions, split="train")
    clips = [load_audio(r.path, cfg.audio.sample_rate, cfg.audio.channels) for r in records]
    vae = build_autoencoder_from(cfg)
    print(f"{len(clips)} training clips; autoencoder {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters", flush=True)
    weights = AutoencoderWeights(a.stft, a.mel, a.waveform, a.kl, a.adv, a.fm)
    mel = MelLoss(cfg.audio.sample_rate) if a.mel else None
    disc = (
        MultiScaleSTFTDiscriminator([int(n) for n in a.disc_ffts.split(",")], cfg.audio.channels, a.disc_filters)
        if (a.adv or a.fm)
        else None
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr, betas=(0.8, 0.99))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=a.disc_lr or a.lr, betas=(0.8, 0.99)) if disc else None
    step = 0
    if a.resume:
        state = torch.load(a.resume / "state.pt", weights_only=True)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        if disc and "disc" in state:
            disc.load_state_dict(state["disc"])
            assert opt_d is not None
            opt_d.load_state_dict(state["opt_d"])
        step = state["step"]
    seg = a.frames * vae.downsampling_ratio
    ffts = [int(n) for n in a.stft_ffts.split(",")]
    rng = np.random.default_rng(step)
    budget = a.minutes * 60
    start = time.perf_counter()
    log: list[dict[str, float]] = []
    while True:
        elapsed = time.perf_counter() - start
        if (a.steps and step >= a.steps) or (not a.steps and elapsed >= budget):
            break
        progress = min(1.0, elapsed / budget) if not a.steps else step / a.steps
        if a.lr_final:
            lr = a.lr_final + 0.5 * (a.lr - a.lr_final) * (1 + np.cos(np.pi * progress))
            for g in opt.param_groups:
                g["lr"] = lr
        batch = []
        for _ in range(a.batch):
            clip = clips[rng.integers(len(clips))]
            s = rng.integers(0, clip.shape[-1] - seg)
            batch.append(clip[:, s : s + seg])
        audio = torch.from_numpy(np.stack(batch).astype(np.float32))
        adv_on = disc is not None and step >= a.adv_start
        w = weights if adv_on else AutoencoderWeights(a.stft, a.mel, a.waveform, a.kl)
        loss, recon = autoencoder_loss(vae, audio, w, mel=mel, discriminator=disc if adv_on else None, stft_ffts=ffts)
        opt.zero_grad()
        loss.loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        d = float("nan")
        if adv_on and disc is not None and opt_d is not None:
            opt_d.zero_grad()
            dl = discriminator_loss(disc, audio, recon)
            dl.backward()
            opt_d.step()
            d = float(dl)
        step += 1
        if step % 50 == 0:
            row = {
                "step": step,
                "s": time.perf_counter() - start,
                "loss": float(loss.loss),
                "mel": float(loss.mel),
                "stft": float(loss.stft),
                "d": d,
            }
            log.append(row)
            print(json.dumps(row), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    state = {"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step}
    if disc is not None and opt_d is not None:
        state |= {"disc": disc.state_dict(), "opt_d": opt_d.state_dict()}
    torch.save(state, a.out / "state.pt")
    save_checkpoint(a.out / "model", vae.eval(), {"step": step})
    seconds = time.perf_counter() - start
    result = run_reconstruction(cfg, vae.eval(), 4, 8.0)
    figures = {
        "args": vars(a) | {"out": str(a.out), "resume": str(a.resume)},
        "steps": step,
        "train_seconds": seconds,
        "mean": result["mean"],
        "clips": result["clips"],
    }
    (a.out / "figures.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps({"steps": step, "seconds": round(seconds), **{k: round(v, 3) for k, v in result["mean"].items()}}))


if __name__ == "__main__":
    main()
