"""The serving pieces without a server: wire format, message validation, prompt blending, the client's clock,
``lmdm listen``'s parsing and arithmetic, the deployment options and the ``serve run`` config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from lmdm.config import load_config
from lmdm.serve.client import PlaybackClock
from lmdm.serve.listen import latency_bounds, parse_prompt
from lmdm.serve.protocol import (
    HEADER,
    AudioHeader,
    ProtocolError,
    SetPrompts,
    Start,
    WeightedPrompt,
    parse_client_message,
    prompt_key,
    prompt_set,
)
from lmdm.serve.session import blend, encode_context, pcm16


def test_an_audio_header_round_trips_and_refuses_foreign_frames() -> None:
    header = AudioHeader(session=7, block=123, sample_rate=44100, channels=2, frames=3, first_sample=2**40, last=True)
    frame = header.pack() + np.arange(6, dtype="<i2").tobytes()
    assert HEADER.size == 32 and AudioHeader.unpack(frame) == header
    with pytest.raises(ValueError, match="not an LMDM audio frame"):
        AudioHeader.unpack(b"RIFF" + frame[4:])
    with pytest.raises(ValueError, match="its header says 3 frames"):
        AudioHeader.unpack(frame[:-2])
    with pytest.raises(ValueError, match="at least 32 bytes"):
        AudioHeader.unpack(frame[:10])


@pytest.mark.parametrize(
    ("raw", "code", "says"),
    [
        ("{", "bad_json", "not JSON"),
        ("[1, 2]", "bad_json", "JSON object"),
        ('{"type": "jump"}', "unknown_type", "'jump'"),
        ('{"kind": "start"}', "unknown_type", "None"),
        ('{"type": "set_prompts", "prompts": []}', "invalid", "prompts"),
        ('{"type": "set_prompts", "prompts": [{"text": "a", "weight": -1}]}', "invalid", "weight"),
        ('{"type": "start", "seed": -3}', "invalid", "seed"),
        ('{"type": "ack"}', "invalid", "block"),
        ('{"type": "pause", "x": 1}', "invalid", "x"),
        ('{"type": "stop", "pad": "' + "x" * 300 + '"}', "too_big", "serve.max_message_bytes"),
        ("[" * 5000 + "]" * 5000, "bad_json", "not JSON"),  # deeper than the parser's recursion: was a RecursionError
        ('{"type": "ack", "block": ' + "9" * 5000 + "}", "bad_json", "not JSON"),  # over int's digit limit: was a ValueError
        ('{"type": "start", "prompt": ""}', "invalid", "prompt"),  # reached WeightedPrompt(text="") and raised
    ],
)
def test_bad_messages_are_refused_with_what_is_wrong(raw: str, code: str, says: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_client_message(raw, max_bytes=256 if '"pad"' in raw else max(256, len(raw)))
    assert caught.value.code == code and says in str(caught.value)


def test_good_messages_parse() -> None:
    start = parse_client_message('{"type": "start", "prompt": "organ", "seed": 4, "steps": 3}', 1024)
    assert isinstance(start, Start) and prompt_set(start.prompt, start.prompts) == [WeightedPrompt(text="organ")] and start.steps == 3
    both = parse_client_message('{"type": "start", "prompt": "a", "prompts": [{"text": "b"}]}', 1024)
    assert isinstance(both, Start)
    with pytest.raises(ProtocolError, match="either 'prompt' or 'prompts'"):
        prompt_set(both.prompt, both.prompts)
    change = parse_client_message(json.dumps({"type": "set_prompts", "prompts": [{"text": "a", "weight": 0.5}]}), 1024)
    assert isinstance(change, SetPrompts) and change.prompts[0].weight == 0.5


def test_a_prompt_sets_key_is_its_normalised_blend() -> None:
    a, b = WeightedPrompt(text="a", weight=1), WeightedPrompt(text="b", weight=3)
    assert prompt_key([a, b]) == prompt_key([b, a]) == prompt_key([WeightedPrompt(text="a", weight=2), WeightedPrompt(text="b", weight=6)])
    assert prompt_key([a, b]) != prompt_key([WeightedPrompt(text="a", weight=3), b])
    assert prompt_key([a, WeightedPrompt(text="b", weight=0)]) == prompt_key([a])


def test_blend_is_the_weighted_mean_of_the_token_embeddings() -> None:
    x, y = torch.ones(1, 4, 8), torch.zeros(1, 4, 8)
    torch.testing.assert_close(blend([x, y], [1.0, 3.0]), torch.full((1, 4, 8), 0.25))
    torch.testing.assert_close(blend([x], [5.0]), x)


def test_pcm16_clips_rounds_and_interleaves() -> None:
    audio = torch.tensor([[0.0, 0.5, 1.5, -2.0], [1e-5, -0.5, 0.25, 1.0]])
    pcm = pcm16(audio)
    assert pcm.dtype == np.int16 and pcm.shape == (4, 2)
    assert pcm[:, 0].tolist() == [0, 16384, 32767, -32767] and pcm[:, 1].tolist() == [0, -16384, 8192, 32767]


def test_encode_context_refuses_audio_that_is_not_whole_frames() -> None:
    from lmdm.builders import build_autoencoder_from
    from lmdm.serve.session import SessionError

    vae = build_autoencoder_from(load_config("quickstart", ["autoencoder.channels=8"])).eval()
    latents = encode_context(vae, np.zeros((2 * vae.downsampling_ratio, vae.audio_channels), dtype=np.int16))
    assert latents.shape == (1, vae.latent_dim, 2)
    with pytest.raises(SessionError, match="whole latent frames"):
        encode_context(vae, np.zeros((vae.downsampling_ratio + 1, vae.audio_channels), dtype=np.int16))


def test_the_playback_clock_counts_underruns_and_pauses() -> None:
    clock = PlaybackClock(sample_rate=100)
    assert clock.arrive(100, now=10.0) == 10.0  # plays at once: 1 s buffered
    assert clock.arrive(100, now=10.5) == 11.0  # queued behind the first
    assert clock.arrive(50, now=12.5) == 12.5 and clock.underruns == 1 and clock.stalled == pytest.approx(0.5)
    clock.hold(2.0)  # paused for 2 s: the buffer ends later
    assert clock.arrive(10, now=14.0) == 15.0 and clock.underruns == 1


def test_listen_parses_weighted_prompts_and_states_the_latency_arithmetic() -> None:
    assert parse_prompt("Bach chorale, for organ @ 0.25") == WeightedPrompt(text="Bach chorale, for organ", weight=0.25)
    assert parse_prompt("jazz @ home") == WeightedPrompt(text="jazz @ home", weight=1.0)
    with pytest.raises(ValueError, match="no text"):
        parse_prompt(" @ 2")
    started = {"blocks_ahead": 1.0, "block_samples": 32768, "latency_samples": 5120, "sample_rate": 16000}
    bounds = latency_bounds(started)
    assert bounds["min_s"] == pytest.approx(2.368) and bounds["max_s"] == pytest.approx(4.416) and bounds["mean_s"] == pytest.approx(3.392)


def test_deployment_options_follow_the_config_and_the_serve_run_config_builds() -> None:
    from ray.serve.schema import ServeDeploySchema

    from lmdm.serve.app import app_builder, deployment_options

    cfg = load_config("quickstart", ["serve.max_sessions=5", "serve.spare_requests=2", "serve.replicas=3", "serve.num_cpus=2"])
    options = deployment_options(cfg)
    assert options["max_ongoing_requests"] == 7 and options["max_queued_requests"] == 2 and options["num_replicas"] == 3
    assert options["ray_actor_options"] == {"num_cpus": 2.0}

    spec = yaml.safe_load((REPO / "infra" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(spec)
    (application,) = schema.applications
    assert application.import_path == "lmdm.serve.app:app_builder"
    built = app_builder(application.args)
    deployment = built._bound_deployment
    assert deployment.max_ongoing_requests == 8 + 4 and deployment.num_replicas == 2
    with pytest.raises(ValueError, match=r"serve\.dit and serve\.autoencoder"):
        app_builder({"config": "quickstart"})
    with pytest.raises(ValueError, match="extra"):
        app_builder({"config": "quickstart", "replicas": 2})


def test_the_pacer_starts_the_clients_clock_with_the_first_samples_and_stops_it_while_paused() -> None:
    """A first block shorter than the decoder's lookahead sends no samples: the client cannot have started
    playing, so the clock must not start (it did, once: the server then ran a block behind what the client
    heard, and control latency came out a block's compute above its arithmetic)."""
    from lmdm.serve.session import Pacer

    pacer = Pacer(sample_rate=100)
    assert pacer.send(0, now=0.0) is False and pacer.send(0, now=0.3) is False
    assert pacer.t0 is None and pacer.ahead(now=0.5) == 0
    assert pacer.send(50, now=1.0) is False and pacer.t0 == 1.0
    assert pacer.ahead(now=1.2) == pytest.approx(30)  # 50 sent, 20 played
    assert pacer.send(50, now=1.4) is False and pacer.ahead(now=1.4) == pytest.approx(60)
    pacer.pause(now=1.5)
    assert pacer.ahead(now=9.0) == pytest.approx(50)  # nothing plays while paused
    pacer.play(now=9.0)
    assert pacer.ahead(now=9.5) == pytest.approx(0)
    assert pacer.send(10, now=10.0) is True  # the client ran dry 0.5 s before this frame: an underrun


def test_a_pause_before_the_first_samples_does_not_count_against_playback() -> None:
    from lmdm.serve.session import Pacer

    pacer = Pacer(sample_rate=100)
    pacer.pause(now=0.0)
    pacer.send(50, now=0.5)  # a block in flight when the pause came still goes out: the clock starts, paused
    pacer.play(now=2.0)
    assert pacer.paused_total == pytest.approx(1.5) and pacer.ahead(now=2.2) == pytest.approx(30)


def test_the_origin_check_refuses_a_page_whose_dns_points_at_the_server() -> None:
    """A DNS-rebinding page has Origin and Host alike, on its own name: same-origin is not enough."""
    from types import SimpleNamespace

    from lmdm.serve.app import LMDMServer

    server = SimpleNamespace(cfg=load_config("quickstart", ["serve.allowed_origins=[https://studio.example]"]))
    check = LMDMServer.func_or_class._check_origin
    assert check(server, {}) is None  # scripts send no Origin
    assert check(server, {"origin": "http://127.0.0.1:8000", "host": "127.0.0.1:8000"}) is None
    assert check(server, {"origin": "http://localhost:8000", "host": "localhost:8000"}) is None
    assert check(server, {"origin": "https://studio.example", "host": "127.0.0.1:8000"}) is None
    assert "not allowed" in check(server, {"origin": "http://evil.example:8000", "host": "evil.example:8000"})
    assert "not allowed" in check(server, {"origin": "http://evil.example", "host": "127.0.0.1:8000"})


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("serve.blocks_ahead=0", "serve.blocks_ahead"),
        ("serve.max_sessions=0", "serve.max_sessions"),
        ("serve.max_message_bytes=10", "serve.max_message_bytes"),
        ("serve.control_rate=-1", "serve.control_rate"),
        ("serve.idle_timeout_s=0", "serve.idle_timeout_s"),
        ("serve.warmup_blocks=-1", "serve.warmup_blocks"),
        ("serve.allowed_origins=nope", "serve.allowed_origins"),
        ("serve.tokn=x", "serve.tokn"),
        ("serve.batching=sometimes", "serve.batching"),
    ],
)
def test_bad_serve_settings_are_refused_naming_the_key(override: str, key: str) -> None:
    from lmdm.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("quickstart", [override])


def test_serve_batching_reads_on_and_off() -> None:
    assert load_config("quickstart", ["serve.batching=off"]).serve.batching is False
    assert load_config("quickstart", ["serve.batching=on"]).serve.batching is True
