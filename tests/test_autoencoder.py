"""Oobleck VAE: the Stable Audio import reproduces stable-audio-tools' outputs, bad checkpoints fail with
the offending keys, and the streaming decoder equals the batch decoder."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmdm.checkpoints.errors import CheckpointError
from lmdm.checkpoints.sao_autoencoder import load_sao_autoencoder, read_sao_autoencoder_config
from lmdm.config import AudioConfig, AutoencoderConfig
from lmdm.models.autoencoder import OobleckVAE, StreamingDecoder, build_autoencoder, push_together, span_forward

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # frozen Stable Audio references (fixtures/README.md)
OOBLECK = FIXTURES / "oobleck_tiny"
ATOL, RTOL = 1e-5, 1e-4


def tiny_vae(seed: int = 0) -> OobleckVAE:
    """Random-init VAE, 8x down; every SnakeBeta parameter moved off its zero init so it matters."""
    torch.manual_seed(seed)
    vae = OobleckVAE(audio_channels=2, channels=8, c_mults=[1, 2], strides=[2, 4], latent_dim=4)
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith(("alpha", "beta")):
                param.uniform_(-0.5, 0.5)
    return vae.eval()


def copy_fixture(tmp_path: Path, tensors: dict[str, torch.Tensor] | None = None, config: dict[str, Any] | None = None) -> Path:
    """The fixture folder in ``tmp_path`` with optionally replaced weights and config."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(OOBLECK / "model_config.json", folder / "model_config.json")
    if config is not None:
        (folder / "model_config.json").write_text(json.dumps(config))
    if tensors is None:
        shutil.copy(OOBLECK / "model.safetensors", folder / "model.safetensors")
    else:
        save_file(tensors, folder / "model.safetensors")
    return folder


def fixture_config() -> dict[str, Any]:
    return dict(json.loads((OOBLECK / "model_config.json").read_text()))


# --- The import reproduces stable-audio-tools ---------------------------------------------------


def test_import_reproduces_stable_audio_tools_outputs() -> None:
    vae = load_sao_autoencoder(OOBLECK)
    ref = load_file(OOBLECK / "reference.safetensors")
    with torch.no_grad():
        encoder_out = vae.encoder(ref["audio"])
        posterior = vae.encode(ref["audio"])
        decoded = vae.decode(ref["latent_mean"])
    torch.testing.assert_close(encoder_out, ref["encoder_out"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(posterior.mean, ref["latent_mean"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(decoded, ref["decoded"], atol=ATOL, rtol=RTOL)
    assert decoded.abs().max() > 1e-2  # a silent decoder would pass a loose comparison


def test_config_sizes_are_read_from_the_file() -> None:
    spec = read_sao_autoencoder_config(OOBLECK / "model_config.json")
    assert (spec.audio_channels, spec.channels, spec.c_mults, spec.strides, spec.latent_dim, spec.final_tanh) == (
        1,
        16,
        (1, 2),
        (2, 4),
        4,
        False,
    )


def test_bare_encoder_decoder_prefix_and_explicit_paths_load(tmp_path: Path) -> None:
    sao = load_file(OOBLECK / "model.safetensors")
    bare = {k.removeprefix("pretransform.model."): v for k, v in sao.items()}
    weights = tmp_path / "weights" / "bare.safetensors"
    weights.parent.mkdir()
    save_file(bare, weights)
    vae = load_sao_autoencoder(OOBLECK / "model_config.json", weights_path=weights)
    ref = load_file(OOBLECK / "reference.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(ref["latent_mean"]), ref["decoded"], atol=ATOL, rtol=RTOL)


def test_full_diffusion_checkpoint_skips_the_dit_and_conditioners(tmp_path: Path) -> None:
    config = fixture_config()
    config["model_type"] = "diffusion_cond"
    config["model"]["diffusion"] = {"type": "dit", "config": {}}
    tensors = load_file(OOBLECK / "model.safetensors")
    tensors["model.model.timestep_features.weight"] = torch.zeros(128, 1)
    tensors["conditioner.conditioners.seconds_total.embedder.embedding.0.weight"] = torch.zeros(3)
    vae = load_sao_autoencoder(copy_fixture(tmp_path, tensors=tensors, config=config))
    assert vae.latent_dim == 4


def test_stand_alone_autoencoder_config_layout(tmp_path: Path) -> None:
    """``model_type: autoencoder`` with ``model.encoder`` (stable-audio-tools' training configs), bare keys."""
    vae = tiny_vae()
    codec = {"channels": 8, "c_mults": [1, 2], "strides": [2, 4], "use_snake": True}
    config = {
        "model_type": "autoencoder",
        "sample_rate": 16000,
        "audio_channels": 2,
        "model": {
            "encoder": {"type": "oobleck", "config": {**codec, "in_channels": 2, "latent_dim": 8}},
            "decoder": {"type": "oobleck", "config": {**codec, "out_channels": 2, "latent_dim": 4, "final_tanh": False}},
            "bottleneck": {"type": "vae"},
            "latent_dim": 4,
            "downsampling_ratio": 8,
            "io_channels": 2,
        },
    }
    sao = {
        k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v"): v
        for k, v in vae.state_dict().items()
    }
    (tmp_path / "model_config.json").write_text(json.dumps(config))
    save_file(sao, tmp_path / "model.safetensors")
    loaded = load_sao_autoencoder(tmp_path)
    latents = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(latents), vae.decode(latents), atol=0, rtol=0)


# --- Bad checkpoints fail with the keys -------------------------------------------------------


def test_missing_key_is_listed_with_its_shape_and_the_file(tmp_path: Path) -> None:
    tensors = load_file(OOBLECK / "model.safetensors")
    del tensors["pretransform.model.decoder.layers.1.layers.1.weight_g"]
    del tensors["pretransform.model.encoder.layers.3.alpha"]
    folder = copy_fixture(tmp_path, tensors=tensors)
    with pytest.raises(CheckpointError) as info:
        load_sao_autoencoder(folder)
    message = str(info.value)
    assert str(folder / "model.safetensors") in message
    assert "missing (2)" in message
    assert "pretransform.model.decoder.layers.1.layers.1.weight_g [32, 1, 1]" in message
    assert "pretransform.model.encoder.layers.3.alpha [32]" in message
    assert "unexpected" not in message and "shape mismatch" not in message


def test_unexpected_and_misspelt_keys_are_listed(tmp_path: Path) -> None:
    tensors = load_file(OOBLECK / "model.safetensors")
    tensors["pretransform.model.encoder.layers.9.bias"] = torch.zeros(5)
    tensors["pretransform.model.decoder.layers.4.weight_gg"] = tensors.pop("pretransform.model.decoder.layers.4.weight_g")
    tensors["stray.tensor"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError) as info:
        load_sao_autoencoder(copy_fixture(tmp_path, tensors=tensors))
    message = str(info.value)
    assert "unexpected (3)" in message
    for line in (
        "pretransform.model.encoder.layers.9.bias [5]",
        "pretransform.model.decoder.layers.4.weight_gg [1, 1, 1]",
        "stray.tensor [2, 2]",
    ):
        assert line in message
    assert "missing (1)" in message and "pretransform.model.decoder.layers.4.weight_g [1, 1, 1]" in message


def test_shape_mismatch_lists_file_and_model_shapes(tmp_path: Path) -> None:
    tensors = load_file(OOBLECK / "model.safetensors")
    tensors["pretransform.model.decoder.layers.0.weight_v"] = torch.zeros(32, 4, 5)
    with pytest.raises(CheckpointError) as info:
        load_sao_autoencoder(copy_fixture(tmp_path, tensors=tensors))
    message = str(info.value)
    assert "shape mismatch (1)" in message
    assert "pretransform.model.decoder.layers.0.weight_v: file [32, 4, 5], model expects [32, 4, 7]" in message
    assert "missing" not in message  # a mismatched key is not also reported missing


def test_config_that_does_not_fit_the_weights_fails_on_shapes(tmp_path: Path) -> None:
    config = fixture_config()
    for codec in ("encoder", "decoder"):
        config["model"]["pretransform"]["config"][codec]["config"]["channels"] = 8
    with pytest.raises(CheckpointError, match=r"shape mismatch \(\d+\)"):
        load_sao_autoencoder(copy_fixture(tmp_path, config=config))


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda ae: ae["encoder"]["config"].update(use_snake=False), "encoder.config.use_snake"),
        (lambda ae: ae["decoder"]["config"].pop("use_snake"), "decoder.config.use_snake"),
        (lambda ae: ae["decoder"]["config"].update(use_nearest_upsample=True), "decoder.config.use_nearest_upsample"),
        (lambda ae: ae["decoder"]["config"].update(antialias_activation=True), "decoder.config.antialias_activation"),
        (lambda ae: ae.update(bottleneck={"type": "tanh"}), "bottleneck.type"),
        (lambda ae: ae["decoder"].update(type="dac"), "decoder.type"),
        (lambda ae: ae["decoder"]["config"].update(chanels=16), "decoder.config"),
        (lambda ae: ae["encoder"]["config"].update(latent_dim=4), "encoder.config.latent_dim"),
        (lambda ae: ae["decoder"]["config"].update(strides=[4, 2]), "decoder.config.strides"),
        (lambda ae: ae.update(downsampling_ratio=16), "model.pretransform.config.downsampling_ratio"),
    ],
)
def test_unsupported_or_inconsistent_config_names_the_key(tmp_path: Path, edit: Any, key: str) -> None:
    config = copy.deepcopy(fixture_config())
    edit(config["model"]["pretransform"]["config"])
    folder = copy_fixture(tmp_path, config=config)
    with pytest.raises(CheckpointError) as info:
        load_sao_autoencoder(folder)
    assert str(folder / "model_config.json") in str(info.value)
    assert key in str(info.value)


def test_pretransform_scale_and_non_safetensors_weights_are_refused(tmp_path: Path) -> None:
    config = fixture_config()
    config["model"]["pretransform"]["scale"] = 0.5
    with pytest.raises(CheckpointError, match=r"model\.pretransform\.scale"):
        load_sao_autoencoder(copy_fixture(tmp_path, config=config))
    with pytest.raises(CheckpointError, match=r"only \.safetensors"):
        load_sao_autoencoder(OOBLECK, weights_path=tmp_path / "model.ckpt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read as safetensors"):
        load_sao_autoencoder(OOBLECK, weights_path=tmp_path / "broken.safetensors")


# --- Streaming decode equals batch decode -------------------------------------------------------


def stream(decoder: StreamingDecoder, latents: torch.Tensor, block: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Push ``latents`` in blocks of ``block`` frames; the per-push outputs and the flushed tail."""
    with torch.no_grad():
        outputs = [decoder.push(latents[..., i : i + block]) for i in range(0, latents.shape[-1], block)]
        return outputs, decoder.flush()


@pytest.mark.parametrize("block", [1, 2, 3, 7, 16, 64])
@pytest.mark.parametrize(
    ("dtype", "atol"),
    # float32 at the required tolerance; float64 proves exactness: one latent frame too little context
    # or lookahead changes this decoder's output by ~1e-6, which float32's tolerance would hide.
    [(torch.float32, 1e-5), (torch.float64, 1e-10)],
)
def test_streaming_decode_equals_batch_decode(block: int, dtype: torch.dtype, atol: float) -> None:
    vae = tiny_vae().to(dtype)
    latents = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(2), dtype=dtype)  # (B, D, L)
    with torch.no_grad():
        batch = vae.decode(latents)  # (B, C, L·R)
    decoder = StreamingDecoder(vae)
    R, lookahead = vae.downsampling_ratio, decoder.lookahead
    outputs, tail = stream(decoder, latents, block)
    for i in range(1, len(outputs) + 1):  # after push i, every frame up to received - lookahead is out
        received = min(i * block, latents.shape[-1])
        assert sum(o.shape[-1] for o in outputs[:i]) == max(0, received - lookahead) * R
    streamed = torch.cat(outputs, dim=-1)
    interior = slice(decoder.context * R, streamed.shape[-1])  # away from the start and the held-back tail
    torch.testing.assert_close(streamed[..., interior], batch[..., interior], atol=atol, rtol=0)
    torch.testing.assert_close(torch.cat([streamed, tail], dim=-1), batch, atol=atol, rtol=0)


def test_streams_decoded_together_equal_each_decoded_alone() -> None:
    """A server decodes its sessions' blocks as one batch (:func:`push_together`): three streams that joined at
    different times (one primed with context), pushing 5-frame blocks, get exactly the audio each gets alone
    (float64); the streams whose windows line up share one decode."""
    vae = tiny_vae().double()
    g = torch.Generator().manual_seed(6)
    latents = [torch.randn(b, 4, 80, generator=g, dtype=torch.float64) for b in (1, 2, 1)]
    joins = [0, 2, 3]  # the block at which each stream starts pushing
    alone = [StreamingDecoder(vae) for _ in latents]
    together = [StreamingDecoder(vae) for _ in latents]
    for d in (alone[2], together[2]):
        d.prime(torch.ones(1, 4, 6, dtype=torch.float64))
    calls = []
    original = vae.decode_span

    def counted(window: torch.Tensor, *span: int) -> torch.Tensor:
        calls.append(window.shape[0])
        return original(window, *span)

    with torch.no_grad():
        for step in range(13):  # the decoder holds 19 frames each side: windows line up after 8 blocks of 5
            active = [i for i, j in enumerate(joins) if step >= j]
            blocks = [latents[i][..., (step - joins[i]) * 5 : (step - joins[i] + 1) * 5] for i in active]
            want = [alone[i].push(x) for i, x in zip(active, blocks, strict=True)]
            vae.decode_span = counted  # type: ignore[method-assign]
            got = push_together([together[i] for i in active], blocks)
            vae.decode_span = original  # type: ignore[method-assign]
            for w, o in zip(want, got, strict=True):
                torch.testing.assert_close(o, w, atol=1e-12, rtol=0)
    assert 4 in calls  # all three streams (1 + 2 + 1 rows) decoded as one batch once their windows lined up
    with pytest.raises(ValueError, match="one autoencoder"):
        push_together([StreamingDecoder(vae), StreamingDecoder(tiny_vae().double())], [latents[0][..., :5]] * 2)


@pytest.mark.parametrize("block", [3, 16])
def test_a_primed_decoder_continues_the_batch_decode_after_the_primed_frames(block: int) -> None:
    """prime(ctx) then push(blocks) gives exactly the batch decode of [ctx, blocks] from ctx's end on (float64)."""
    vae = tiny_vae().double()
    latents = torch.randn(1, 4, 48, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ctx, rest = latents[..., :20], latents[..., 20:]
    decoder = StreamingDecoder(vae)
    decoder.prime(ctx)
    outputs, tail = stream(decoder, rest, block)
    with torch.no_grad():
        batch = vae.decode(latents)[..., 20 * vae.downsampling_ratio :]
    assert outputs[0].shape[-1] == max(0, block - decoder.lookahead) * vae.downsampling_ratio
    torch.testing.assert_close(torch.cat([*outputs, tail], dim=-1), batch, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="prime expects latents"):
        decoder.prime(torch.zeros(1, 3, 8))


@pytest.mark.parametrize(("start", "stop"), [(0, 512), (0, 1), (37, 38), (100, 300), (7, 505), (511, 512), (256, 512)])
def test_decode_span_equals_a_slice_of_decode(start: int, stop: int) -> None:
    """Every span, edges included (where the layers' zero padding shows), in float64 to 1e-12."""
    vae = tiny_vae().double()
    latents = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)  # 512 samples
    with torch.no_grad():
        torch.testing.assert_close(vae.decode_span(latents, start, stop), vae.decode(latents)[..., start:stop], atol=1e-12, rtol=0)


def test_decode_span_refuses_spans_outside_the_audio() -> None:
    vae = tiny_vae()
    with pytest.raises(ValueError, match="outputs 500 … 519 are not inside the 512 outputs"):
        vae.decode_span(torch.zeros(1, 4, 64), 500, 520)
    with pytest.raises(ValueError, match="decode expects latents"):
        vae.decode_span(torch.zeros(1, 3, 64), 0, 8)


def test_span_forward_refuses_a_transposed_conv_whose_kernel_is_shorter_than_its_stride() -> None:
    """Such a layer has outputs no input reaches; spans that end on one are refused, the others are exact."""
    layer = torch.nn.ConvTranspose1d(2, 2, kernel_size=2, stride=4)
    x = torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(span_forward(layer, x, 1, 9), layer(x)[..., 1:10], atol=1e-6, rtol=0)
        for first, last in ((2, 2), (0, 2), (2, 5)):
            with pytest.raises(ValueError, match="outputs no input reaches"):
                span_forward(layer, x, first, last)


def test_streaming_decode_computes_only_the_new_audio(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the audio rate (the last conv) each push computes its new samples, not the whole window again."""
    vae = tiny_vae()
    decoder = StreamingDecoder(vae)
    last_conv = vae.decoder.layers[-2]
    computed: list[int] = []
    conv1d = torch.nn.functional.conv1d

    def counting(x: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = conv1d(x, weight, *args, **kwargs)
        if weight.shape == last_conv.weight.shape:
            computed.append(out.shape[-1])
        return out

    monkeypatch.setattr(torch.nn.functional, "conv1d", counting)
    outputs, tail = stream(decoder, torch.randn(1, 4, 40, generator=torch.Generator().manual_seed(8)), 8)
    emitted = [o.shape[-1] for o in [*outputs, tail] if o.shape[-1]]
    # the window holds up to context + lookahead + 8 frames; only the emitted frames' audio is computed
    assert computed == emitted == [40, 64, 64, 152]  # without span decoding: [192, 256, 320, 304]


def test_streaming_decoder_is_reusable_after_flush() -> None:
    vae = tiny_vae()
    decoder = StreamingDecoder(vae)
    first = torch.randn(1, 4, 30, generator=torch.Generator().manual_seed(3))
    second = torch.randn(1, 4, 12, generator=torch.Generator().manual_seed(4))
    stream(decoder, first, 5)
    outputs, tail = stream(decoder, second, 5)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([*outputs, tail], dim=-1), vae.decode(second), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="push expects latents"):
        decoder.push(torch.zeros(1, 3, 2))


def test_receptive_field_is_exact_by_gradients() -> None:
    """Frame f's audio has a non-zero gradient on exactly latent frames f - context … f + lookahead."""
    vae = tiny_vae()
    context, lookahead = vae.decoder.receptive_field()
    assert context > 0 and lookahead > 0
    L, f, R = 3 * (context + lookahead), context + lookahead, vae.downsampling_ratio
    latents = torch.randn(1, 4, L, generator=torch.Generator().manual_seed(5), requires_grad=True)
    weights = torch.randn(1, 2, R, generator=torch.Generator().manual_seed(6))
    (vae.decode(latents)[..., f * R : (f + 1) * R] * weights).sum().backward()
    assert latents.grad is not None
    touched = (latents.grad.abs().sum(dim=(0, 1)) > 0).nonzero().flatten().tolist()
    assert touched == list(range(f - context, f + lookahead + 1))


def test_sao_sized_decoder_receptive_field() -> None:
    vae = OobleckVAE(audio_channels=2, channels=4, c_mults=[1, 2, 4, 8, 16], strides=[2, 4, 4, 8, 8], latent_dim=64)
    decoder = StreamingDecoder(vae)
    assert (decoder.context, decoder.lookahead, decoder.latency_samples) == (10, 10, 10 * 2048)


# --- Encoder and bottleneck -----------------------------------------------------------------------


def test_encoder_length_kl_and_seeded_sampling() -> None:
    vae = tiny_vae()
    audio = torch.randn(3, 2, 40 * vae.downsampling_ratio, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        posterior = vae.encode(audio)
    assert posterior.mean.shape == posterior.std.shape == (3, vae.latent_dim, 40)
    assert bool((posterior.std >= 1e-4).all())
    assert float(posterior.kl()) >= 0.0
    zero = type(posterior)(mean=torch.zeros(1, 4, 3), std=torch.ones(1, 4, 3))
    torch.testing.assert_close(zero.kl(), torch.tensor(0.0))
    a = posterior.sample(torch.Generator().manual_seed(8))
    b = posterior.sample(torch.Generator().manual_seed(8))
    c = posterior.sample(torch.Generator().manual_seed(9))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, posterior.mean + posterior.std * noise)
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(audio[..., :-1])


def test_build_autoencoder_from_config() -> None:
    cfg = AutoencoderConfig(latent_channels=6, channels=8, channel_mults=[1, 2], strides=[2, 4])
    vae = build_autoencoder(cfg, AudioConfig(channels=2))
    assert (vae.latent_dim, vae.downsampling_ratio, vae.audio_channels) == (6, cfg.downsampling_ratio, 2)
    with torch.no_grad():
        assert vae.decode(torch.zeros(1, 6, 5)).shape == (1, 2, 5 * 8)
    keys = vae.state_dict().keys()
    assert "encoder.layers.0.parametrizations.weight.original0" in keys and "decoder.layers.4.weight" not in keys
    with pytest.raises(ValueError, match="even"):
        OobleckVAE(audio_channels=1, channels=8, c_mults=[1], strides=[3], latent_dim=4)


def test_training_init_makes_the_decoder_read_its_latents() -> None:
    """A regression test: with PyTorch's default init the decoder's random biases drowned latents of std
    ~0.07 under posterior noise of std ~0.69, and training settled on one input-independent output."""
    torch.manual_seed(0)
    vae = OobleckVAE(audio_channels=1, channels=8, c_mults=[1, 2, 4], strides=[2, 4, 8], latent_dim=8)
    assert vae.decode(torch.zeros(2, 8, 5)).abs().max() == 0  # no input-independent output
    t = torch.arange(64 * 8) / 16000
    audio = (0.1 * torch.sin(2 * torch.pi * 220 * t) * torch.linspace(0.2, 1.0, t.numel()))[None, None]  # about -20 dBFS
    with torch.no_grad():
        posterior = vae.encode(audio)
    assert posterior.std.max() < 0.01  # the posterior starts narrow: samples carry the signal
    assert posterior.mean.std() > 5 * posterior.std.max()  # and the latents are far above the noise
