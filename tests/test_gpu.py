"""GPU paths users will run (``make gpu-check``): skipped without CUDA; the CPU test at the end runs everywhere."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import pytest
import torch

from lmdm.models.dit import DiT, DiTArgs
from lmdm.runtime import Compile, Eager
from lmdm.streaming.engines import Condition, LMDMEngine, OutpaintingEngine, Sampling
from lmdm.streaming.rollout import rollout
from lmdm.streaming.sequences import BlockGeometry, block_causal_forward

GEO = BlockGeometry(block_frames=8, context_blocks=2)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run `make gpu-check` on a GPU machine)")


def dit_on(device: str, dtype: torch.dtype = torch.float32) -> DiT:
    torch.manual_seed(0)
    dit = DiT(DiTArgs(io_channels=8, width=128, depth=2, head_dim=64, cond_token_dim=64, input_concat_dim=9)).eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
        p.requires_grad_(False)
    return dit.to(device=device, dtype=dtype)


def full_cache_step_mask(
    engine: LMDMEngine, device: str, around_step: Callable[[], AbstractContextManager[object]] = nullcontext
) -> object:
    """The mask of an ordinary step once every context slot is filled; only that step runs inside ``around_step``
    (the context encoding and the merged commit pass carry masks)."""
    cond = Condition(torch.randn(1, 4, 64, device=device, dtype=engine.core.dtype), "p")
    x = torch.randn(1, 8, 8, device=device, dtype=engine.core.dtype)
    t = torch.full((1,), 0.5, device=device)
    with torch.inference_mode():
        state = engine.start(cond, 1, context=torch.randn(1, 8, 16, device=device, dtype=engine.core.dtype))
        engine.begin_block(state, cond)
        engine.denoise_step(state, x, t)
        engine.end_block(state, x)
        engine.begin_block(state, cond)
        engine.denoise_step(state, x, t)  # the merged pass: commits the last block (a masked pass)
        assert state.step_plan is not None
        with around_step():
            engine.denoise_step(state, x, t)
        return state.step_plan.mask


def test_a_step_over_a_full_cache_attends_without_a_mask() -> None:
    """Once every context slot is filled, an LMDM step's mask allows every key: SDPA gets no mask, so on
    CUDA it may take FlashAttention (tested below where a GPU exists)."""
    for variant in ("block_causal", "encdec"):
        assert full_cache_step_mask(LMDMEngine(dit_on("cpu"), variant, GEO, Sampling(steps=2)), "cpu") is None  # type: ignore[arg-type]
    outpainting = OutpaintingEngine(dit_on("cpu"), GEO, Sampling(steps=2))
    state = outpainting.start(Condition(), 1, context=torch.randn(1, 8, 16))
    outpainting.begin_block(state, Condition())
    assert state.plan is not None and state.plan.mask is None


@pytest.mark.gpu
@cuda
def test_lmdm_step_reaches_flash_attention_in_bf16() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    engine = LMDMEngine(dit_on("cuda", torch.bfloat16), "block_causal", GEO, Sampling(steps=2))
    only_flash = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # noqa: E731  # raises if the step cannot use FlashAttention
    assert full_cache_step_mask(engine, "cuda", only_flash) is None


@pytest.mark.gpu
@cuda
def test_compiled_bf16_stream_close_to_eager_on_cuda() -> None:
    dit = dit_on("cuda", torch.bfloat16)
    cond = Condition(torch.randn(1, 4, 64, device="cuda", dtype=torch.bfloat16), "p")
    streams = []
    for runtime in (Eager(), Compile()):
        engine = LMDMEngine(dit, "block_causal", GEO, Sampling(steps=2), runtime=runtime)
        with torch.inference_mode():
            streams.append(rollout(engine, 4, cond, generator=torch.Generator(device="cuda").manual_seed(0)).float())
    err = float((streams[1] - streams[0]).abs().max() / streams[0].abs().max())
    assert err < 5e-2, f"compiled bf16 stream differs from eager by {err:.2e} (relative)"


@pytest.mark.gpu
@cuda
def test_flex_training_forward_equals_dense_on_cuda() -> None:
    dit = dit_on("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    clean, noisy = torch.randn(2, 8, 6 * 8, device="cuda", generator=g), torch.randn(2, 8, 3 * 8, device="cuda", generator=g)
    t = torch.rand(2, 3, device="cuda", generator=g)
    dense = block_causal_forward(dit, GEO, clean, noisy, [1, 3, 6], t, flex=False)
    flex = block_causal_forward(dit, GEO, clean, noisy, [1, 3, 6], t, flex=True)
    assert float((flex - dense).abs().max() / dense.abs().max()) < 1e-3


@pytest.mark.gpu
@cuda
@pytest.mark.timeout(900)
def test_training_smoke_on_cuda_with_nccl_and_bf16_then_stream(tmp_path, local_ray, tiny_corpus) -> None:  # type: ignore[no-untyped-def]
    """A few LMDM training steps on the GPU through Ray Train (nccl process group, bf16 autocast), then a
    stream from the checkpoint it wrote, on CUDA in bf16."""
    from conftest import tiny_config
    from lmdm.checkpoints.format import load_checkpoint, save_checkpoint
    from lmdm.models.autoencoder import OobleckVAE
    from lmdm.pipelines.precompute import run_precompute
    from lmdm.pipelines.train import process_group_backend, run_train

    _, summary = tiny_corpus
    torch.manual_seed(0)
    ae = save_checkpoint(tmp_path / "autoencoder", OobleckVAE(1, 4, [1, 2], [2, 4], 4))
    latents = tmp_path / "latents"
    run_precompute(tiny_config(f"data.root={summary.root}", f"precompute.out={latents}", "precompute.chunk_frames=96"), ae)
    cfg = tiny_config(
        "dit.width=128", "dit.depth=2", "dit.head_dim=64", "dit.cond_token_dim=384", "dit.project_cond_tokens=true",
        "autoencoder.latent_channels=4", "stream.block_frames=8", "stream.context_blocks=2", "train.workers=1",
        "train.use_gpu=true", "train.precision=bf16", "train.batch_size=2", "train.steps=3", "train.checkpoint_every=3",
        f"train.storage_path={tmp_path / 'ray_results'}",
    )  # fmt: skip
    assert process_group_backend(cfg) == "nccl"
    result = run_train(cfg, "lmdm", latents)
    assert result.checkpoint is not None and result.metrics["step"] == 3 and math.isfinite(result.metrics["train/loss"])
    dit, _ = load_checkpoint(result.checkpoint / "model", kind="dit")
    engine = LMDMEngine(dit.to("cuda", torch.bfloat16), "block_causal", BlockGeometry(8, 2), Sampling(steps=2))  # type: ignore[arg-type]
    cond = Condition(torch.randn(1, 4, 384, device="cuda", dtype=torch.bfloat16), "p")
    with torch.inference_mode():
        out = rollout(engine, 4, cond, generator=torch.Generator(device="cuda").manual_seed(0))
    assert out.shape == (1, 4, 32) and bool(torch.isfinite(out).all())
