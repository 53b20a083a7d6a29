"""The one rollout function, audio streams, `lmdm generate`, `lmdm import-sao` and `lmdm bench stream`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from lmdm.eval import bench_stream
from lmdm.models.autoencoder import OobleckVAE
from lmdm.models.dit import DiT, DiTArgs
from lmdm.pipelines.cli import app
from lmdm.streaming.engines import Condition, LMDMEngine, Sampling
from lmdm.streaming.rollout import rollout
from lmdm.streaming.sequences import BlockGeometry
from lmdm.streaming.stream import Stream

runner = CliRunner()


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lmdm generate` defaults to the quickstart's models under ./runs: a checkout where `make quickstart` ran
    must not change what these tests stream."""
    monkeypatch.chdir(tmp_path)


GEO = BlockGeometry(block_frames=4, context_blocks=2)


def engine() -> LMDMEngine:
    torch.manual_seed(0)
    dit = DiT(DiTArgs(io_channels=4, width=64, depth=2, head_dim=32, cond_token_dim=32, input_concat_dim=5))
    return LMDMEngine(dit, "block_causal", GEO, Sampling(steps=2, sampler="pingpong"))


def test_rollout_equals_stepping_and_follows_the_schedule() -> None:
    eng = engine()
    prompts = [Condition(torch.randn(1, 3, 32), "a"), Condition(torch.randn(1, 3, 32), "b")]
    seen: list[int] = []
    with torch.no_grad():
        out = rollout(eng, 5, lambda i: prompts[i // 3], generator=torch.Generator().manual_seed(1), on_block=lambda i, b: seen.append(i))
        state = eng.start(prompts[0], 1, generator=torch.Generator().manual_seed(1))
        manual = torch.cat([eng.step(state, prompts[i // 3]) for i in range(5)], -1)
    assert out.shape == (1, 4, 20) and seen == [0, 1, 2, 3, 4]
    torch.testing.assert_close(out, manual, rtol=0, atol=0)


def test_stream_audio_equals_batch_decode_of_its_latents() -> None:
    eng = engine()
    vae = OobleckVAE(1, 8, [1, 2], [2, 4], 4).eval()
    cond = Condition(torch.randn(1, 3, 32), "a")
    with torch.no_grad():
        stream = Stream(eng, vae, cond, generator=torch.Generator().manual_seed(2))
        audio = torch.cat(list(stream.chunks(6)), -1)
        latents = rollout(eng, 6, cond, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(audio, vae.decode(latents), rtol=1e-4, atol=1e-5)
    assert audio.shape == (1, 1, 6 * 4 * vae.downsampling_ratio)


TINY = [
    "dit.width=64",
    "dit.depth=1",
    "dit.head_dim=32",
    "dit.cond_token_dim=0",
    "autoencoder.channels=4",
    "autoencoder.latent_channels=4",
    "stream.block_frames=4",
    "stream.steps=2",
]


def test_generate_writes_a_wav(tmp_path: Path) -> None:
    out = tmp_path / "x.wav"
    result = runner.invoke(app, ["generate", "--out", str(out), "--seconds", "1.5", *TINY])
    assert result.exit_code == 0, result.output
    audio, rate = sf.read(out)
    assert rate == 16000 and len(audio) == 24000 and abs(audio).max() > 0


TEXT = ["dit.cond_token_dim=384", "dit.project_cond_tokens=true"]  # the shipped MiniLM's width


def test_generate_with_prompts_by_time_cfg_steps_and_runtime(tmp_path: Path) -> None:
    out, prompts = tmp_path / "x.wav", tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\n0 Bach chorale on organ\n0.5   Monteverdi madrigal for strings\n")
    args = [
        "generate",
        "--out",
        str(out),
        "--seconds",
        "1.5",
        "--prompts",
        str(prompts),
        "--cfg",
        "2",
        "--steps",
        "2",
        "--runtime",
        "eager",
    ]
    result = runner.invoke(app, [*args, *TINY, *TEXT])
    assert result.exit_code == 0, result.output
    assert "runtime: eager" in result.output and "random init" in result.output
    audio, _ = sf.read(out)
    assert len(audio) == 24000 and abs(audio).max() > 0


def test_generate_uses_the_quickstart_models_where_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmdm.builders import build_autoencoder_from, build_dit
    from lmdm.checkpoints.format import save_checkpoint
    from lmdm.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config("quickstart", TINY)
    save_checkpoint(tmp_path / "runs" / cfg.name / "lmdm", build_dit(cfg))
    save_checkpoint(tmp_path / "runs" / cfg.name / "autoencoder", build_autoencoder_from(cfg))
    result = runner.invoke(app, ["generate", "--out", "x.wav", "--seconds", "0.5", "--prompt", "organ", *TINY])
    assert result.exit_code == 1 and "no text conditioning" in result.output  # this DiT has no text input
    result = runner.invoke(app, ["generate", "--out", "x.wav", "--seconds", "0.5", *TINY])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"DiT: runs/{cfg.name}/lmdm" in said and f"autoencoder: runs/{cfg.name}/autoencoder" in said and "random init" not in said


def test_generate_decodes_with_the_autoencoder_the_lmdm_learned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the default quickstart (no autoencoder of its own) the LMDM's latents are the pretrained pair's, and
    after a --from-scratch run beside it the own autoencoder is the LMDM's only when the hashes say so."""
    from lmdm.builders import build_autoencoder_from, build_dit
    from lmdm.checkpoints.format import TrainedWith, file_sha256, save_checkpoint
    from lmdm.config import load_config
    from lmdm.pipelines.generate import default_checkpoints

    monkeypatch.chdir(tmp_path)
    pair = Path("pair")
    cfg = load_config("quickstart", [*TINY, f"quickstart.base={pair}"])
    pair_ae = save_checkpoint(pair / "autoencoder", build_autoencoder_from(cfg))
    save_checkpoint(pair / "base", build_dit(cfg))
    runs = Path("runs") / cfg.name  # relative, as the CLI reports it
    lmdm = save_checkpoint(runs / "lmdm", build_dit(cfg), trained=TrainedWith(autoencoder=file_sha256(pair_ae / "model.safetensors")))
    assert default_checkpoints(cfg) == (lmdm, pair_ae)
    torch.manual_seed(1)
    own = save_checkpoint(runs / "autoencoder", build_autoencoder_from(cfg))  # an older from-scratch run's
    assert default_checkpoints(cfg) == (lmdm, pair_ae)
    save_checkpoint(runs / "lmdm", build_dit(cfg), trained=TrainedWith(autoencoder=file_sha256(own / "model.safetensors")))
    assert default_checkpoints(cfg) == (lmdm, own)
    assert default_checkpoints(cfg.model_copy(update={"quickstart": cfg.quickstart.model_copy(update={"base": None})})) == (lmdm, own)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("1 late start\n", "prompts.txt:1: the first prompt must start at 0 seconds"),
        ("0 a\n0 b\n", "prompts.txt:2: times must increase"),
        ("0 a\nsoon b\n", "prompts.txt:2: 'soon' is not a time in seconds"),
        ("# nothing\n", "no prompt in it"),
    ],
)
def test_generate_bad_prompts_file_is_a_clear_error(tmp_path: Path, text: str, error: str) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text)
    result = runner.invoke(app, ["generate", "--out", str(tmp_path / "x.wav"), "--prompts", str(prompts), *TINY, *TEXT])
    assert result.exit_code == 1 and error in " ".join(result.output.split())


def test_generate_refuses_mismatched_models_and_empty_prompts(tmp_path: Path) -> None:
    from lmdm.builders import build_autoencoder_from, build_dit
    from lmdm.checkpoints.format import save_checkpoint
    from lmdm.config import load_config

    dit = save_checkpoint(tmp_path / "dit", build_dit(load_config("quickstart", [*TINY, "autoencoder.latent_channels=8"])))
    ae = save_checkpoint(tmp_path / "ae", build_autoencoder_from(load_config("quickstart", TINY)))
    result = runner.invoke(app, ["generate", "--out", str(tmp_path / "x.wav"), "--dit", str(dit), "--autoencoder", str(ae), *TINY])
    assert result.exit_code == 1 and "makes 8-channel latents but the autoencoder" in " ".join(result.output.split())
    wide = save_checkpoint(tmp_path / "wide", build_dit(load_config("quickstart", [*TINY, "dit.cond_token_dim=64"])))
    result = runner.invoke(app, ["generate", "--out", str(tmp_path / "x.wav"), "--dit", str(wide), "--prompt", "organ", *TINY])
    assert result.exit_code == 1 and "takes 64-d text tokens but text encoder 'minilm' gives 384-d" in " ".join(result.output.split())
    result = runner.invoke(app, ["generate", "--out", str(tmp_path / "x.wav"), "--prompt", "  ", *TINY])
    assert result.exit_code == 2 and "--prompt is empty" in result.output


def test_generate_refuses_checkpoints_trained_for_something_else(tmp_path: Path) -> None:
    """Each mismatch of what a DiT checkpoint says it is (DESIGN §6) is refused, naming both sides."""
    from lmdm.builders import build_autoencoder_from, build_dit
    from lmdm.checkpoints.format import TrainedWith, file_sha256, save_checkpoint
    from lmdm.config import load_config

    cfg = load_config("quickstart", TINY)
    torch.manual_seed(0)
    ae = save_checkpoint(tmp_path / "ae", build_autoencoder_from(cfg))
    other_ae = save_checkpoint(tmp_path / "other-ae", build_autoencoder_from(cfg))
    sha, other_sha = file_sha256(ae / "model.safetensors"), file_sha256(other_ae / "model.safetensors")
    lmdm = TrainedWith(stage="lmdm", objective="rectified_flow", variant="block_causal", block_frames=4, context_blocks=2, autoencoder=sha)
    cases = [
        (dict(stage="base", variant=None), [], "is a bidirectional base model, but stream.variant='block_causal' needs an LMDM"),
        ({}, ["stream.context_blocks=3"], "stream.context_blocks=3 is a longer context than"),
        ({}, ["stream.block_frames=8"], "trained with blocks of 4 latent frames, but stream.block_frames is 8"),
        ({}, ["stream.variant=encdec"], "an LMDM trained for stream.variant='block_causal', not 'encdec'"),
        ({}, ["dit.objective=v"], "trained with objective 'rectified_flow', but dit.objective is 'v'"),
        (dict(autoencoder=other_sha), [], f"latents of the autoencoder {other_sha[:12]}"),
    ]
    args = ["generate", "--out", str(tmp_path / "x.wav"), "--seconds", "0.5", "--autoencoder", str(ae)]
    for changes, overrides, error in cases:
        dit = save_checkpoint(tmp_path / "dit", build_dit(cfg), trained=dataclasses.replace(lmdm, **changes))  # type: ignore[arg-type]
        result = runner.invoke(app, [*args, "--dit", str(dit), *TINY, "stream.context_blocks=2", *overrides])
        said = " ".join(result.output.split())
        assert result.exit_code == 1 and error in said, (error, said)
        if "autoencoder " in error:
            assert sha[:12] in said  # both sides named
    result = runner.invoke(app, [*args, "--dit", str(ae), *TINY])
    assert result.exit_code == 1 and "holds a checkpoint of kind 'autoencoder' where kind 'dit' is needed" in " ".join(
        result.output.split()
    )
    dit = save_checkpoint(tmp_path / "dit", build_dit(cfg), trained=lmdm)
    result = runner.invoke(app, [*args, "--dit", str(dit), *TINY, "stream.context_blocks=1"])  # a shorter context is fine
    assert result.exit_code == 0, result.output


def test_bench_stream_refuses_packed_off_float32_cpu() -> None:
    args = ["bench", "stream", "--quick", "--width", "64", "--depth", "1", "--block-frames", "4", "--steps", "2", "--repeats", "2"]
    result = runner.invoke(app, [*args, "--runtime", "packed", "--dtype", "bfloat16"])
    assert result.exit_code == 2 and "no runtime to measure" in result.output


def test_generate_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "--dit", str(tmp_path / "nope"), *TINY])
    assert result.exit_code == 1 and "config.json: missing" in result.output


@pytest.mark.parametrize("command", ["generate", "score", "precompute"])
def test_checkpoint_options_take_builtin_names(tmp_path: Path, command: str) -> None:
    """--autoencoder builtin:NAME/PART resolves through the shipped index (hash-checked), and a wrong name says
    what is shipped."""
    required = {"score": ["--audio", str(tmp_path)], "generate": ["--out", str(tmp_path / "x.wav")]}.get(command, [])
    result = runner.invoke(app, [command, "--autoencoder", "builtin:no-such-pair/autoencoder", *required])
    assert result.exit_code == 1 and "no built-in model builtin:no-such-pair; shipped:" in " ".join(result.output.split()), result.output
    assert "builtin:corpus-base" in result.output


def test_import_sao_cli(tmp_path: Path) -> None:
    fixture = Path(__file__).resolve().parent / "fixtures" / "sao_dit_tiny"
    result = runner.invoke(app, ["import-sao", str(fixture), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "dit" / "model.safetensors").is_file()


def test_bench_stream_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "stream",
            "--quick",
            "--width",
            "64",
            "--depth",
            "1",
            "--block-frames",
            "4",
            "--steps",
            "2",
            "--repeats",
            "2",
            "--json",
            str(out),
            "--config",
            "quick",
        ],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    runtimes = figures["runtimes"]  # every runtime from one run, both methods on each
    assert set(runtimes) == {"eager", "packed", "compile", "best"} and runtimes["best"] in ("eager", "packed", "compile")
    for name in ("eager", "packed", "compile"):
        for method in ("outpainting", "encdec", "block_causal"):
            assert runtimes[name][method]["median_s"] > 0 and runtimes[name]["warmup_s"][method] > 0
        assert runtimes[name]["lmdm_vs_outpainting"]["analytical_speedup"] == 2 * (16 + 4) / (2 * 4 + 4)
    best = runtimes[runtimes["best"]]
    assert all(best["block_causal"]["median_s"] <= r["block_causal"]["median_s"] for n, r in runtimes.items() if n != "best")
    assert figures["block_causal"] == best["block_causal"] and figures["lmdm"]["runtime"] == runtimes["best"]
    assert figures["lmdm"]["realtime_factor"] > 0
    assert figures["block_causal"]["kv_cache_bytes"] > 0
    for name in ("eager", "packed", "compile"):
        assert name in result.output
    quickstart = figures["quickstart"]  # where a quickstart block's time goes: the DiT's steps, then the decode
    assert quickstart["median_dit_s"] > 0 and quickstart["median_decode_s"] > 0
    assert 0.5 < (quickstart["median_dit_s"] + quickstart["median_decode_s"]) / quickstart["median_s"] < 2


def test_bench_stream_one_runtime_and_bad_options(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "stream", "--quick", "--width", "64", "--depth", "1", "--block-frames", "4", "--steps", "2", "--repeats", "2"]
    result = runner.invoke(app, [*args, "--runtime", "eager", "--json", str(out), "--config", "quick"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(out.read_text())["runtimes"]) == {"eager", "best"}
    bad = runner.invoke(app, [*args, "--runtime", "fast"])
    assert bad.exit_code == 2 and "unknown runtime 'fast'" in bad.output


def test_bench_stream_peak_is_the_best_of_before_and_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow moment while the peak is measured (a shared machine) must not inflate every MFU: the peak is
    measured before and after the timed blocks and the higher rate kept."""
    rates = iter([50e9, 200e9])  # slow before, fast after
    monkeypatch.setattr(bench_stream, "matmul_peak_flops", lambda **_: next(rates))
    shape = bench_stream.BenchShape(
        width=64, depth=1, block_frames=4, steps=2, repeats=2, warmup=2, text_tokens=4, runtimes=("eager", "packed")
    )
    figures = bench_stream.run_stream_bench(shape)
    assert figures["machine"]["matmul_peak_flops"] == 200e9
    for runtime in ("eager", "packed"):
        for name in ("outpainting", "encdec", "block_causal"):
            entry = figures["runtimes"][runtime][name]
            assert entry["mfu"] == pytest.approx(entry["achieved_flops"] / 200e9)


def test_commit_flops_charge_the_last_layer_keys_and_values_only() -> None:
    """The merged commit pass runs its last layer for keys/values only (``outputs_from``): the bench's FLOP
    count (and so block-causal's MFU) must not charge that layer's attention, feed-forward or output."""
    from dataclasses import replace

    args = DiTArgs(io_channels=8, width=64, depth=3, head_dim=32, cond_token_dim=32, input_concat_dim=9)
    S, K, L, D = 4, 12, 5, 64
    first_layers = bench_stream.pass_flops(replace(args, depth=2), S, K, L) - 2 * S * D * args.io_channels  # no project_out
    assert bench_stream.commit_flops(args, S, K, L) == first_layers + 6 * S * D * D  # + the last layer's qkv


def test_pass_flops_charge_the_last_layer_for_its_output_tokens_only() -> None:
    """Every engine's last layer computes the target's outputs only (outpainting skips its global and context
    tokens there): the FLOP count charges the other tokens that layer's keys/values alone."""
    args = DiTArgs(io_channels=8, width=64, depth=3, head_dim=32, cond_token_dim=32, input_concat_dim=9)
    S, K, L, D, So = 9, 9, 5, 64, 4
    assert bench_stream.pass_flops(args, S, K, L, outputs=S) == bench_stream.pass_flops(args, S, K, L)
    per_output = 30 * D * D + 4 * K * D + 4 * L * D + 2 * D * args.io_channels  # attention on, GLU, project_out
    assert bench_stream.pass_flops(args, S, K, L, outputs=So) == bench_stream.commit_flops(args, S, K, L) + So * per_output
