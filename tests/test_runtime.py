"""Runtimes (lmdm.runtime) compute what the plain model computes; compile really runs compiled; the private
torch APIs they rely on still exist."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from lmdm.models.dit import DiT, DiTArgs
from lmdm.runtime import Compile, Eager, Packed, get_runtime, onednn, resolve_runtime
from lmdm.runtime.compiled import compiled_layers, freezing_available, raise_recompile_limit
from lmdm.runtime.packed import packed_layers
from lmdm.streaming.engines import Condition, LMDMEngine, OutpaintingEngine, Sampling
from lmdm.streaming.rollout import rollout
from lmdm.streaming.sequences import BlockGeometry

IO, BF, CTX, B = 4, 3, 2, 2
GEO = BlockGeometry(block_frames=BF, context_blocks=CTX)
X86 = platform.machine().lower() in ("x86_64", "amd64")


def tiny_dit(seed: int = 0, depth: int = 2, global_cond_dim: int = 0) -> DiT:
    torch.manual_seed(seed)
    args = DiTArgs(
        io_channels=IO, width=64, depth=depth, head_dim=32, cond_token_dim=32, input_concat_dim=IO + 1, global_cond_dim=global_cond_dim
    )
    dit = DiT(args).eval()
    for p in dit.parameters():  # non-zero everywhere (the default init zeroes the residual convs)
        torch.nn.init.normal_(p, std=0.2)
        p.requires_grad_(False)
    return dit


def condition(key: str = "p") -> Condition:
    return Condition(torch.randn(B, 5, 32, generator=torch.Generator().manual_seed(len(key))), key)


def engine(dit: DiT, method: str, runtime: object, cfg: float = 1.0) -> OutpaintingEngine | LMDMEngine:
    sampling = Sampling(steps=2, cfg_scale=cfg)
    if method == "outpainting":
        return OutpaintingEngine(dit, GEO, sampling, runtime)  # type: ignore[arg-type]
    return LMDMEngine(dit, method, GEO, sampling, runtime=runtime)  # type: ignore[arg-type]


def stream(dit: DiT, method: str, runtime: object, blocks: int = 4, cfg: float = 1.0) -> torch.Tensor:
    """A stream from a real context, a prompt change at block 2 (a merged commit under another prompt)."""
    eng = engine(dit, method, runtime, cfg)
    prompts = [condition("a"), condition("bb")]
    with torch.inference_mode():
        context = torch.randn(B, IO, 2 * BF, generator=torch.Generator().manual_seed(7))
        return rollout(eng, blocks, lambda i: prompts[i // 2], batch=B, context=context, generator=torch.Generator().manual_seed(3))


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    err = float((a - b).abs().max() / b.abs().max())
    assert err < rel, f"relative error {err:.2e} >= {rel:.0e}"


# ---- private torch APIs: fail loudly if a torch upgrade removes them ------------------------------------


@pytest.mark.skipif(not X86, reason="oneDNN's packed linear ops exist in x86 CPU builds of torch only")
def test_onednn_private_ops_exist() -> None:
    missing = [f"torch.ops.{ns}.{op}" for ns, op in onednn.PRIVATE_OPS if not hasattr(getattr(torch.ops, ns), op)]
    assert not missing, f"the packed runtime's private ops are gone from torch {torch.__version__}: {missing} (it falls back to F.linear)"
    assert onednn.available()


def test_compile_private_settings_exist() -> None:
    assert raise_recompile_limit(), f"torch {torch.__version__}: no dynamo recompile limit setting (recompile_limit / cache_size_limit)"
    assert freezing_available(), f"torch {torch.__version__}: no torch._inductor.config.freezing"


def test_onednn_packs_equal_f_linear_and_fall_back() -> None:
    g = torch.Generator().manual_seed(0)
    w, b, x, r = (
        torch.randn(48, 32, generator=g),
        torch.randn(48, generator=g),
        torch.randn(5, 32, generator=g),
        torch.randn(5, 48, generator=g),
    )
    pack, plain = onednn.LinearPack.of(w, b), onednn.LinearPack(w, b, packed=False)
    assert pack.packed == onednn.available()
    for p in (pack, plain):
        torch.testing.assert_close(p(x), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p.add(x, r), r + torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    value, gate = torch.nn.functional.linear(x, w, b).chunk(2, -1)
    torch.testing.assert_close(onednn.GluPack.of(w, b)(x), value * torch.nn.functional.silu(gate), rtol=1e-5, atol=1e-5)


# ---- selection ------------------------------------------------------------------------------------------


def test_auto_is_packed_on_cpu_and_compile_on_cuda() -> None:
    assert resolve_runtime("auto", "cpu") == "packed" and resolve_runtime("auto", "cuda") == "compile"
    assert isinstance(get_runtime("auto", "cpu"), Packed) and isinstance(get_runtime("eager"), Eager)
    with pytest.raises(ValueError, match="unknown runtime 'fast'"):
        get_runtime("fast")


# ---- every runtime equals eager, through the engines --------------------------------------------------


@pytest.mark.parametrize("method", ["block_causal", "encdec", "outpainting"])
def test_packed_stream_equals_eager_float32(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmdm.runtime import packed

    calls = [0]
    forward = packed.packed_block_forward

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        return forward(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(packed, "packed_block_forward", counted)
    dit = tiny_dit()
    close(stream(dit, method, Packed(), cfg=3.0), stream(dit, method, Eager(), cfg=3.0))
    assert calls[0] > 0  # the packed blocks really ran


@pytest.mark.parametrize("method", ["block_causal", "encdec", "outpainting"])
def test_compiled_stream_equals_eager_float32(method: str) -> None:
    """The graphs dynamo captures (aot_eager: the same graphs, no code generation) compute the model's outputs."""
    dit = tiny_dit()
    close(stream(dit, method, Compile(backend="aot_eager")), stream(dit, method, Eager()))


def test_inductor_frozen_stream_equals_eager_and_follows_weight_changes() -> None:
    """Inductor with freezing (weights baked in as constants) equals eager; an in-place weight change (an EMA
    step) is not silently ignored: the frozen graphs are compiled again."""
    from torch._dynamo import config as dynamo_config

    dit = tiny_dit(depth=1)
    runtime = Compile(backend="inductor", freeze=True)
    close(stream(dit, "block_causal", runtime, blocks=3), stream(dit, "block_causal", Eager(), blocks=3))
    with dynamo_config.patch(error_on_recompile=True):  # every kind of pass compiled: a new stream reuses them all
        stream(dit, "block_causal", runtime, blocks=4)
    layers = compiled_layers(dit, "inductor", True)
    before = layers.recompiles_for_weights
    with torch.no_grad():
        for p in dit.parameters():
            p.mul_(0.9)  # EMA-like, in place
    close(stream(dit, "block_causal", runtime, blocks=3), stream(dit, "block_causal", Eager(), blocks=3))
    assert layers.recompiles_for_weights == before + 1
    for p in dit.parameters():
        p.data.mul_(1.1)  # keeps no version: the caller says so
    layers.invalidate()
    close(stream(dit, "block_causal", runtime, blocks=3), stream(dit, "block_causal", Eager(), blocks=3))


def test_compiled_stream_does_not_recompile_after_warm_up() -> None:
    """After a warm-up (start with context, a plain block, a block with a merged commit) a stream of several
    blocks triggers no recompilation (error_on_recompile) and no new graph: per-block values are tensors."""
    from torch._dynamo import config as dynamo_config
    from torch._dynamo.utils import counters

    dit = tiny_dit(seed=1)
    eng = engine(dit, "block_causal", Compile(backend="aot_eager"))
    cond = condition("a")
    with torch.inference_mode():
        state = eng.start(cond, B, context=torch.randn(B, IO, 3 * BF), generator=torch.Generator().manual_seed(0))
        rollout(eng, 2, cond, state=state)
        graphs = counters["stats"]["unique_graphs"]
        with dynamo_config.patch(error_on_recompile=True):
            rollout(eng, 5, cond, state=state)  # the FIFO evicts, slots and positions change every block
    assert counters["stats"]["unique_graphs"] == graphs


def test_runtimes_step_aside_under_gradients() -> None:
    """Under autograd, packed and compile run the model's own path: gradients reach the weights."""
    dit = tiny_dit()
    for p in dit.parameters():
        p.requires_grad_(True)
    h = torch.randn(1, 6, 64)
    freqs = dit.freqs(torch.arange(6))
    for runner in (packed_layers(dit), compiled_layers(dit, "aot_eager")):
        dit.zero_grad()
        runner(h, freqs, None, None).sum().backward()
        assert dit.layers[0].self_attn.to_qkv.weight.grad is not None


def test_packed_repacks_after_in_place_update_and_stands_aside_for_hooks() -> None:
    dit = tiny_dit()
    h, freqs = torch.randn(1, 6, 64), dit.freqs(torch.arange(6))
    runner = packed_layers(dit)
    with torch.inference_mode():
        runner(h, freqs, None, None)
    first = runner.packs()
    dit.load_state_dict({k: v * 0.5 for k, v in dit.state_dict().items()})  # in place: the packs are stale
    with torch.inference_mode():
        close(runner(h, freqs, None, None), dit.run_layers(h, freqs, None, None), 1e-5)
    assert runner.packs() is not first
    seen: list[int] = []
    dit.layers[0].ff.register_forward_hook(lambda m, a, out: seen.append(1))
    with torch.inference_mode():
        runner(h, freqs, None, None)
    assert seen == [1] and runner.packs() is None  # a hook: the module path, which calls it


def test_a_transformer_block_compiles_fullgraph_and_equals_eager() -> None:
    """The model file is plain PyTorch: inductor traces a whole block (rotary, masks, cache writes) without a break."""
    from lmdm.models.kv_cache import CacheIO

    dit = tiny_dit(depth=1)
    block = dit.layers[0]
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(B, 7, 64, generator=g), dit.text_kv(torch.randn(B, 5, 32, generator=g))[0]
    mask = torch.rand(7, 9, generator=g) > 0.3
    mask[:, 2:] |= torch.eye(7, dtype=torch.bool)

    def io() -> CacheIO:
        return CacheIO(torch.zeros(1, B, 2, 9, 32), torch.zeros(1, B, 2, 9, 32), torch.arange(2, 9), 0, 9)

    eager_io, compiled_io = io(), io()
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    with torch.no_grad():
        want = block(x, dit.freqs(torch.arange(7)), mask, text, None, eager_io.layer(0), 2)
        got = compiled(x, dit.freqs(torch.arange(7)), mask, text, None, compiled_io.layer(0), 2)
    close(got, want, 1e-5)
    torch.testing.assert_close(compiled_io.k, eager_io.k, rtol=1e-5, atol=1e-6)


def test_model_files_import_no_runtime() -> None:
    """The model is plain PyTorch: dit.py and attention.py (and friends) import no runtime."""
    import ast
    import importlib

    for name in ("lmdm.models.dit", "lmdm.models.attention", "lmdm.models.rotary", "lmdm.models.kv_cache", "lmdm.models.block_mask"):
        path = importlib.import_module(name).__file__
        assert path is not None
        tree = ast.parse(Path(path).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        }
        assert not [m for m in imported if m.startswith("lmdm.runtime")], f"{name} imports a runtime"
