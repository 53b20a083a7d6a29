"""The LMM baseline: KV-cached decoding equals one teacher-forced forward over the whole token sequence with
the sliding-window causal mask (both designs, greedy and sampled, past the window, prompt changes, CFG,
a starting context), and the RVQ tokenizer learns, round-trips and restarts dead codes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lmdm.models.block_mask import text_group_mask
from lmdm.models.lmm import LMM, LMMArgs
from lmdm.models.rvq import ResidualVQ, kmeans
from lmdm.runtime import get_runtime
from lmdm.streaming.common import Condition, concat_text
from lmdm.streaming.lmm_engine import LMMEngine, LMMSampling, sample_codes
from lmdm.streaming.rollout import rollout
from lmdm.streaming.sequences import BlockGeometry

C, K, V, BF, CTX, B, DC = 4, 3, 16, 2, 1, 2, 32
GEO = BlockGeometry(block_frames=BF, context_blocks=CTX)
WINDOW = (CTX + 1) * BF  # frames: 4 (flat: 12 tokens)
F64 = torch.float64


def tiny_lmm(kind: str, seed: int = 0) -> LMM:
    torch.manual_seed(seed)
    args = LMMArgs(kind=kind, latent_channels=C, levels=K, codes=V, width=64, depth=2, window_frames=WINDOW, head_dim=32,
                   cond_token_dim=DC, embed_dim=16, depth_width=64, depth_layers=2)  # fmt: skip
    lmm = LMM(args).to(F64)
    for p in lmm.parameters():
        torch.nn.init.normal_(p, std=0.3)
    lmm.rvq.codebooks.normal_()
    return lmm


def texts(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, 5, DC, generator=g, dtype=F64) for _ in range(n)]


def prompt_at(block: int) -> int:
    return 0 if block < 2 else (1 if block < 4 else 2)


class Recorder:
    """Wraps an engine's sampling to keep the (CFG-combined) logits of every code, in generation order."""

    def __init__(self, engine: LMMEngine) -> None:
        self.logits: list[torch.Tensor] = []
        inner = engine._sample

        def record(logits: torch.Tensor, state: object) -> torch.Tensor:
            p = state.progress  # type: ignore[attr-defined]
            combined = logits
            if p.rows != p.batch:
                cond, uncond = logits.chunk(2)
                combined = uncond + engine.sampling.cfg_scale * (cond - uncond)
            self.logits.append(combined.clone())
            return inner(logits, state)  # type: ignore[arg-type]

        engine._sample = record  # type: ignore[method-assign]


def reference_logits(lmm: LMM, codes: torch.Tensor, token_prompt: list[int], prompts: list[torch.Tensor], cfg: float) -> torch.Tensor:
    """Teacher-forced logits ``(B, T, K, V)`` of the whole sequence, each temporal token cross-attending to its prompt."""
    per = [lmm.text_kv(p) for p in prompts]
    group = torch.tensor(token_prompt)
    text_mask = text_group_mask(group, prompts[0].shape[1], len(prompts))
    cond = lmm.logits(codes, concat_text(per), text_mask)
    if cfg == 1.0:
        return cond
    return lmm.logits(codes, None) + cfg * (cond - lmm.logits(codes, None))


@pytest.mark.parametrize("kind", ["flat", "framewise"])
@pytest.mark.parametrize(("temperature", "top_k", "cfg"), [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 5, 2.0)])
@pytest.mark.parametrize("with_context", [False, True])
def test_cached_decode_equals_sliding_window_forward(kind: str, temperature: float, top_k: int, cfg: float, with_context: bool) -> None:
    lmm = tiny_lmm(kind)
    sampling = LMMSampling(temperature=temperature, top_k=top_k, cfg_scale=cfg)
    engine = LMMEngine(lmm, GEO, sampling)
    recorder = Recorder(engine)
    prompts = texts()
    keys = ["a", "b", "c"]
    condition = lambda j: Condition(text=prompts[prompt_at(j)], key=keys[prompt_at(j)])  # noqa: E731
    context = torch.randn(B, C, 2 * BF, generator=torch.Generator().manual_seed(3), dtype=F64) if with_context else None
    blocks = 6  # 12 frames: three windows, so the ring wraps and the rotary base moves (flat: 36 tokens)
    state = engine.start(condition(0), B, context=context, generator=torch.Generator().manual_seed(7))
    block_codes: list[torch.Tensor] = []
    latents = rollout(engine, blocks, condition, state=state, on_block=lambda i, block: block_codes.append(state.codes.clone()))
    assert latents.shape == (B, C, blocks * BF)
    generated = torch.cat(block_codes, dim=-1)  # (B, K, T)
    torch.testing.assert_close(latents, lmm.rvq.decode(generated))
    prefix = lmm.rvq.encode(context) if context is not None else generated[..., :0]
    codes = torch.cat([prefix, generated], dim=-1)
    T0 = prefix.shape[-1]
    frame_prompt = [0] * T0 + [prompt_at(j) for j in range(blocks) for _ in range(BF)]
    token_prompt = [p for p in frame_prompt for _ in range(K)] if kind == "flat" else frame_prompt
    expected = reference_logits(lmm, codes, token_prompt, prompts, cfg)[:, T0:]  # (B, T, K, V)

    got = torch.stack(recorder.logits).reshape(blocks * BF, K, B, V).permute(2, 0, 1, 3)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    replay = torch.Generator().manual_seed(7)  # the same draws, from the reference logits, in generation order
    for t in range(blocks * BF):
        for k in range(K):
            assert torch.equal(sample_codes(expected[:, t, k], sampling, replay), generated[:, k, t])


def test_rvq_round_trip_of_codes() -> None:
    rvq = ResidualVQ(C, levels=K, codes=V)
    rvq.codebooks.normal_()
    codes = torch.randint(0, V, (2, K, 9), generator=torch.Generator().manual_seed(0))
    rvq.codebooks[1:] *= 0.05  # residual levels: smaller, as trained ones are (so decode→encode picks the same codes)
    rvq.codebooks[2:] *= 0.05
    assert torch.equal(rvq.encode(rvq.decode(codes)), codes)


def test_rvq_error_falls_with_depth_and_training() -> None:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 8, 64, generator=g)
    rvq = ResidualVQ(8, levels=6, codes=32)
    first = rvq.update(latents, g)
    for _ in range(5):
        last = rvq.update(latents, g)
    errors = rvq.depth_errors(latents)
    assert bool((errors[1:] < errors[:-1]).all()), errors
    assert errors[-1] < 0.5 * latents.pow(2).mean()
    assert last["mse"] <= first["mse"] * 1.05
    codes = rvq.encode(latents)
    assert codes.shape == (4, 6, 64) and int(codes.max()) < 32
    torch.testing.assert_close((rvq.decode(codes) - latents).pow(2).mean(), errors[-1])


def test_rvq_restarts_a_dead_code() -> None:
    g = torch.Generator().manual_seed(0)
    rvq = ResidualVQ(2, levels=1, codes=4, decay=0.5, dead_threshold=0.5)
    latents = torch.randn(1, 2, 32, generator=g)
    rvq.update(latents, g)
    rvq.codebooks[0, 3] = torch.tensor([1e3, 1e3])  # far from every vector: never chosen
    rvq.ema_sum[0, 3] = rvq.codebooks[0, 3] * rvq.ema_count[0, 3]
    restarted = []
    for _ in range(12):  # its EMA count halves every update: below the threshold within a few
        restarted.append(rvq.update(latents, g)["restarted"])
        if restarted[-1]:
            break
    assert restarted[-1] >= 1, restarted
    vectors = latents[0].T  # (32, 2): the code now sits on one of them
    assert float(torch.cdist(rvq.codebooks[0, 3][None], vectors).min()) < 1e-6


def test_kmeans_init_separates_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    found = kmeans(points, 3, iters=10, generator=g)
    assert torch.cdist(centres, found).min(1).values.max() < 0.5


@pytest.mark.parametrize("kind", ["flat", "framewise"])
def test_packed_runtime_decodes_as_eager(kind: str) -> None:
    lmm = tiny_lmm(kind).float()
    prompt = texts(1)[0].float()
    condition = Condition(text=prompt, key="p")
    out = {}
    for name in ("eager", "packed"):
        engine = LMMEngine(lmm, GEO, LMMSampling(temperature=0.0), get_runtime(name))
        recorder = Recorder(engine)
        rollout(engine, 3, condition, batch=B, generator=torch.Generator().manual_seed(0))
        out[name] = torch.stack(recorder.logits)
    torch.testing.assert_close(out["packed"], out["eager"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["flat", "framewise"])
def test_lmm_engine_interface(kind: str) -> None:
    """As for the LMDM engines: block shapes, the same stream for the same seed, another for another seed, a
    starting context of whole blocks, and clear errors for what an LMM cannot do."""
    lmm = tiny_lmm(kind)
    engine = LMMEngine(lmm, GEO, LMMSampling(temperature=1.0, top_k=8))
    condition = Condition(text=texts(1)[0], key="p")

    def stream(seed: int, context: torch.Tensor | None = None) -> torch.Tensor:
        return rollout(engine, 3, condition, batch=B, context=context, generator=torch.Generator().manual_seed(seed))

    first = stream(0)
    assert first.shape == (B, C, 3 * BF) and first.dtype == F64
    torch.testing.assert_close(stream(0), first, rtol=0, atol=0)
    assert not torch.equal(stream(1), first)
    context = torch.randn(B, C, BF, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert not torch.equal(stream(0, context), first)  # the context is heard
    with pytest.raises(ValueError, match=r"whole blocks of 2"):
        stream(0, context[..., :1])
    state = engine.start(condition, B)
    with pytest.raises(ValueError, match=r"no denoising steps"):
        engine.step(state, condition, exit_step=0)
    textless = LMMEngine(LMM(dataclasses.replace(lmm.args, cond_token_dim=0)).to(F64), GEO, LMMSampling())
    with pytest.raises(ValueError, match=r"no text conditioning"):
        rollout(textless, 1, condition, batch=B)


def test_build_engine_matches_models_and_variants() -> None:
    from lmdm.builders import build_dit, build_engine, build_lmm
    from lmdm.config import load_config
    from lmdm.models.rvq import ResidualVQ

    cfg = load_config(
        "quickstart",
        [
            "dit.width=64",
            "dit.depth=1",
            "dit.head_dim=32",
            "dit.project_cond_tokens=true",
            "lmm.flat.width=64",
            "lmm.flat.depth=1",
            "rvq.levels=2",
            "rvq.codes=8",
        ],
    )
    lmm = build_lmm(cfg, "flat")
    assert isinstance(build_engine(cfg, lmm), LMMEngine)
    with pytest.raises(ValueError, match=r"flat LMM; it streams as variant 'flat', not 'block_causal'"):
        build_engine(cfg, lmm, "block_causal")
    with pytest.raises(ValueError, match=r"variant 'framewise' streams an LMM checkpoint"):
        build_engine(cfg, build_dit(cfg), "framewise")
    with pytest.raises(ValueError, match=r"the RVQ tokenizer has 3 levels of 8 codes.*set rvq.levels=3"):
        build_lmm(cfg, "flat", tokenizer=ResidualVQ(cfg.autoencoder.latent_channels, levels=3, codes=8))


def test_rvq_report_depths() -> None:
    from lmdm.eval.rvq_report import report_depths

    assert report_depths(16) == [1, 2, 4, 8, 16] and report_depths(12) == [1, 2, 4, 8, 12] and report_depths(1) == [1]


def test_bench_compare_on_a_tiny_shape(tmp_path: Path) -> None:
    """Every method measured, the LMMs matched to the DiT within ±10%, the JSON keys the issue names, and the
    analytical FLOPs equal to torch's count (so the printed ratios mean what they say)."""
    from rich.console import Console

    from lmdm.eval.bench_compare import CompareShape, compare_report, plot_compare, run_compare_bench

    shape = CompareShape("tiny", width=64, depth=2, latent_channels=4, block_frames=4, context_blocks=2, steps=2, latent_rate=10.0,
                         head_dim=32, text_tokens=8, levels=4, codes=16)  # fmt: skip
    results = run_compare_bench([shape], runtime="eager", repeats=1, warmup=2, measure_peak=False)
    entry = results["shapes"]["tiny"]
    for kind in ("flat", "framewise"):
        assert abs(entry["parameters"][kind] / entry["parameters"]["dit"] - 1) <= 0.10
    for key in ("lmdm_vs_lmm", "lmdm_vs_lmm_framewise"):
        assert set(results[key]) >= {"speedup_per_audio_second", "flops_ratio", "sequential_pass_ratio"}
    assert results["lmdm_vs_lmm"]["sequential_pass_ratio"] == 4 * 4 / 2  # K per frame × Bf frames against 2 steps
    for method, figures in entry["methods"].items():
        assert figures["counted_flops_per_audio_second"] == pytest.approx(figures["flops_per_audio_second"], rel=0.05), method
        assert figures["median_s"] > 0 and figures["time_to_first_audio_s"] > 0
    assert entry["methods"]["lmdm"]["cache_bytes"] > 0 and entry["methods"]["flat"]["cache_bytes"] > 0
    Console(width=80, file=(tmp_path / "table.txt").open("w")).print(*compare_report(results))
    assert "LMDM vs flat LMM" in (tmp_path / "table.txt").read_text().replace("\n", " ")
    assert plot_compare(results, tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
