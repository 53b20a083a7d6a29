"""The autoencoder recipe's parts: mel and STFT losses, the STFT discriminator and its hinge losses, the
learning-rate schedule, and the reconstruction figures `lmdm eval reconstruction` prints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmdm.config import load_config
from lmdm.eval.reconstruction import reconstruction_figures
from lmdm.models.autoencoder import OobleckVAE
from lmdm.pipelines.recipe import lr_factor
from lmdm.training.autoencoder_loss import (
    AutoencoderWeights,
    MelLoss,
    MultiScaleSTFTDiscriminator,
    autoencoder_loss,
    discriminator_loss,
    multi_resolution_stft_loss,
)

SR = 16000


def _tone(hz: float, seconds: float = 1.0, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * hz * t) + 0.1 * np.sin(2 * np.pi * 2 * hz * t)).astype(np.float32)


def test_spectral_losses_are_zero_on_identical_audio_and_grow_with_the_difference() -> None:
    torch.manual_seed(0)
    x = torch.from_numpy(_tone(220.0))[None, None]
    mel = MelLoss(SR)
    assert float(mel(x, x)) == 0.0 and float(multi_resolution_stft_loss(x, x, (2048, 64))) == pytest.approx(0.0, abs=1e-6)
    near, far = x + 0.001 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)
    assert 0 < float(mel(near, x)) < float(mel(far, x))
    with pytest.raises(ValueError, match="3 windows but 2 band counts"):
        MelLoss(SR, windows=(64, 128, 256), bands=(5, 10))


def test_the_discriminator_scores_every_scale_and_its_hinge_loss_is_the_sum() -> None:
    torch.manual_seed(0)
    disc = MultiScaleSTFTDiscriminator((256, 128), channels=1, filters=4)
    x = torch.randn(2, 1, 4096)
    outputs = disc(x)
    assert len(outputs) == 2
    for (logits, features), n_fft in zip(outputs, (256, 128), strict=True):
        assert logits.shape[:2] == (2, 1) and len(features) == 5
        assert features[0].shape[2] == 4096 // (n_fft // 4) + 1  # STFT frames (time is kept; frequency is strided)
    # The hinge loss is Σ_scales mean(relu(1 - D(real))) + mean(relu(1 + D(fake))).
    fake = torch.randn(2, 1, 4096)
    expected = sum(torch.relu(1 - r[0]).mean() + torch.relu(1 + f[0]).mean() for r, f in zip(disc(x), disc(fake), strict=True))
    assert float(discriminator_loss(disc, x, fake).detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_the_generator_step_reaches_the_autoencoder_but_leaves_the_discriminator_without_gradients() -> None:
    """The adversarial terms train the autoencoder only (the discriminator is frozen meanwhile, and trainable after)."""
    torch.manual_seed(0)
    vae = OobleckVAE(1, 4, [1, 2], [2, 4], 4)
    disc = MultiScaleSTFTDiscriminator((128,), filters=4)
    audio = 0.1 * torch.randn(2, 1, 1024)
    weights = AutoencoderWeights(stft=1, mel=0, waveform=1, kl=1e-4, adversarial=0.1, feature_matching=5)
    loss, recon = autoencoder_loss(vae, audio, weights, discriminator=disc)
    loss.loss.backward()
    assert all(p.grad is not None for p in vae.parameters())
    assert all(p.grad is None and p.requires_grad for p in disc.parameters())
    assert float(loss.feature_matching) > 0 and recon.requires_grad  # recon carries the graph (the recipe detaches it)
    with pytest.raises(ValueError, match="need a discriminator"):
        autoencoder_loss(vae, audio, weights)
    with pytest.raises(ValueError, match="needs a MelLoss"):
        autoencoder_loss(vae, audio, AutoencoderWeights(mel=1.0))


def test_the_learning_rate_warms_up_then_decays_by_a_cosine_to_the_final_ratio() -> None:
    cfg = load_config("quickstart", ["train.steps=110", "train.lr_warmup_steps=10", "train.lr_schedule=cosine", "train.lr_final_ratio=0.1"])
    assert lr_factor(cfg, 0) == pytest.approx(0.1) and lr_factor(cfg, 9) == pytest.approx(1.0)
    assert lr_factor(cfg, 10) == pytest.approx(1.0) and lr_factor(cfg, 60) == pytest.approx(0.55)
    assert lr_factor(cfg, 110) == pytest.approx(0.1) and lr_factor(cfg, 500) == pytest.approx(0.1)
    constant = load_config("quickstart", ["train.steps=110"])
    assert {lr_factor(constant, s) for s in (0, 50, 109)} == {1.0}
    assert not math.isnan(lr_factor(load_config("quickstart", ["train.steps=1", "train.lr_schedule=cosine"]), 0))


def test_reconstruction_figures_by_their_definitions() -> None:
    """A perfect copy: mel L1 0, every pitch class right; a tone a semitone off: the same voicing, no pitch class right;
    noise: far in mel L1 and unvoiced."""
    a = _tone(220.0, 2.0)[None]
    same = reconstruction_figures(a, a.copy(), SR)
    assert same["mel_l1_db"] == 0.0 and same["pitch_class_accuracy"] == 1.0 and same["voiced_diff"] == 0.0
    assert same["loudness_error_db"] == 0.0 and same["brightness_error_hz"] == 0.0 and same["voiced_input"] > 0.9
    off = reconstruction_figures(a, _tone(220.0 * 2 ** (1 / 12), 2.0)[None], SR)
    assert off["pitch_class_accuracy"] == 0.0 and off["voiced_diff"] < 0.05 and off["mel_l1_db"] > 1.0
    noise = reconstruction_figures(a, 0.1 * np.random.default_rng(0).standard_normal(a.shape).astype(np.float32), SR)
    assert noise["mel_l1_db"] > 20 and noise["voiced_reconstruction"] < 0.2
    with pytest.raises(ValueError, match="cut both to one length"):
        reconstruction_figures(a, a[:, :-1], SR)
