"""``lmdm bench compare``: the LMDM against outpainting and both LMM baselines, at matched parameter count, in one run.

Per shape (the paper's geometry as in ``bench stream``, and the quickstart's), four methods on the same
runtime, batch 1, the same block and context seconds: outpainting (the bidirectional base), the
block-causal LMDM, the ``flat`` LMM (Magenta RealTime v1 style: ``K`` sequential passes per frame) and the
``framewise`` LMM (Magenta RealTime 2 style: one temporal pass per frame and ``K`` depth-transformer
passes). For each, per second of audio: sequential forward passes, FLOPs (analytical, and counted by
``torch.utils.flop_counter`` over one steady-state block of the eager runtime, the same maths as every
runtime), wall-clock; per block: latency (median, p90); time to first audio (a stream's start and first
block, from silence); real-time factor; KV-cache bytes. Ratios LMDM vs each LMM come from the same run.

Models have random weights: speed does not depend on them (an LMM samples the same number of codes
whatever they are). An LMM is sized to the DiT's parameter count within ±10% (:func:`match_lmm_sizes`;
the quickstart shape uses the config's ``lmm.*`` sizes, chosen so), and the counts print beside each other.

Legend: K RVQ levels, V codes per level, Bf block frames, Kc context frames, W window frames, D width.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.table import Table
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from lmdm.eval.bench_stream import commit_flops, matmul_peak_flops, pass_flops, quantiles
from lmdm.models.dit import DiT, DiTArgs
from lmdm.models.lmm import LMM, LMMArgs
from lmdm.runtime import get_runtime, resolve_runtime
from lmdm.streaming.common import Condition
from lmdm.streaming.engines import LMDMEngine, OutpaintingEngine, Sampling
from lmdm.streaming.lmm_engine import LMMEngine, LMMSampling
from lmdm.streaming.rollout import rollout
from lmdm.streaming.sequences import BlockGeometry

__all__ = ["CompareShape", "compare_report", "lmm_token_flops", "match_lmm_sizes", "plot_compare", "run_compare_bench"]

METHODS = ("outpainting", "lmdm", "flat", "framewise")
MATCH_TOLERANCE = 0.10


@dataclass(frozen=True)
class CompareShape:
    """One benchmarked geometry: the DiT, its stream, the RVQ and the LMM sizes (``None``: matched automatically)."""

    name: str
    width: int
    depth: int
    latent_channels: int
    block_frames: int
    context_blocks: int
    steps: int
    latent_rate: float
    head_dim: int = 64
    cond_token_dim: int | None = None  # None = the width
    text_tokens: int = 64
    levels: int = 16
    codes: int = 1024
    flat: dict[str, int] | None = None  # LMMArgs sizes (width, depth, embed_dim, ...); None = match_lmm_sizes
    framewise: dict[str, int] | None = None

    @property
    def block_seconds(self) -> float:
        return self.block_frames / self.latent_rate

    @property
    def text_dim(self) -> int:
        return self.width if self.cond_token_dim is None else self.cond_token_dim

    def dit_args(self) -> DiTArgs:
        C = self.latent_channels
        return DiTArgs(
            io_channels=C, width=self.width, depth=self.depth, head_dim=self.head_dim, cond_token_dim=self.text_dim, input_concat_dim=C + 1
        )

    def lmm_args(self, kind: str, sizes: dict[str, int]) -> LMMArgs:
        return LMMArgs(kind=kind, latent_channels=self.latent_channels, levels=self.levels, codes=self.codes,
                       window_frames=(self.context_blocks + 1) * self.block_frames, cond_token_dim=self.text_dim,
                       head_dim=self.head_dim, **sizes)  # fmt: skip


def paper_shape(levels: int = 16, codes: int = 1024) -> CompareShape:
    """``bench stream``'s default: the paper's geometry (21.5 Hz, 48-frame blocks, 4 of context, 8 steps) on a 512×8 DiT."""
    return CompareShape("paper", width=512, depth=8, latent_channels=64, block_frames=48, context_blocks=4, steps=8,
                        latent_rate=21.5, levels=levels, codes=codes)  # fmt: skip


def quickstart_shape(cfg: Any) -> CompareShape:
    """The quickstart config's geometry, DiT and LMM sizes (``lmm.flat``, ``lmm.framewise``)."""
    keep = ("width", "depth", "embed_dim", "depth_width", "depth_layers")
    return CompareShape(
        "quickstart",
        width=cfg.dit.width,
        depth=cfg.dit.depth,
        latent_channels=cfg.autoencoder.latent_channels,
        block_frames=cfg.stream.block_frames,
        context_blocks=cfg.stream.context_blocks,
        steps=cfg.stream.steps,
        latent_rate=cfg.audio.sample_rate / math.prod(cfg.autoencoder.strides),
        head_dim=cfg.dit.head_dim,
        cond_token_dim=cfg.dit.cond_token_dim or None,
        levels=cfg.rvq.levels,
        codes=cfg.rvq.codes,
        flat={k: v for k, v in cfg.lmm.flat.model_dump().items() if k in keep},
        framewise={k: v for k, v in cfg.lmm.framewise.model_dump().items() if k in keep},
    )


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def match_lmm_sizes(shape: CompareShape, kind: str, target: int) -> dict[str, int]:
    """LMM sizes of ``kind`` at the DiT's width whose parameter count is closest to ``target`` (temporal depth,
    code-embedding width, and for ``framewise`` a small depth transformer's width and layers, from small grids)."""
    best: tuple[float, dict[str, int]] | None = None
    # framewise: a small depth transformer (Magenta RealTime 2's is a fraction of the temporal one)
    depth_grid = [(w, n) for w in sorted({256, shape.width // 2}) for n in (1, 2)] if kind == "framewise" else [(256, 2)]
    for depth in range(1, 2 * shape.depth + 1):
        for embed_dim in (16, 32, 64, 128):
            for depth_width, depth_layers in depth_grid:
                sizes = {
                    "width": shape.width,
                    "depth": depth,
                    "embed_dim": embed_dim,
                    "depth_width": depth_width,
                    "depth_layers": depth_layers,
                }
                with torch.device("meta"):  # counted without allocating or initialising weights
                    count = _count(LMM(shape.lmm_args(kind, sizes)))
                gap = abs(count - target) / target
                if best is None or gap < best[0]:
                    best = (gap, sizes)
    assert best is not None
    return best[1]


def lmm_token_flops(args: LMMArgs, text_tokens: int) -> dict[str, float]:
    """Analytical matmul FLOPs per frame of an LMM in steady state (a full window), by part.

    Temporal token: per layer ``36·D² + 4·W·D + 4·L·D`` (the DiT block's count, over ``W`` window keys); plus
    its input projection ``2·E·D``. ``flat``: ``K`` temporal tokens per frame, each with the code head
    ``2·D·E + 2·E·V``. ``framewise``: one temporal token, then ``K`` depth tokens of ``32·Dd² + 4·k·Dd`` per layer (qkv 6,
    out 2, feed-forward 24; no cross-attention; ``k ≤ K`` keys) with their input and head projections.
    """
    D, L, E, V, K = args.width, text_tokens if args.cond_token_dim else 0, args.embed_dim, args.codes, args.levels
    W = args.window_frames * (K if args.kind == "flat" else 1)
    temporal = args.depth * (36 * D * D + 4 * W * D + 4 * L * D) + 2 * E * D
    head_in = D if args.kind == "flat" else args.depth_width
    head = 2 * head_in * E + 2 * E * V
    if args.kind == "flat":
        return {"temporal": float(K * temporal), "depth": 0.0, "heads": float(K * head)}
    Dd = args.depth_width
    depth = sum(args.depth_layers * (32 * Dd * Dd + 4 * (k + 1) * Dd) for k in range(K)) + 2 * D * Dd + (K - 1) * 2 * E * Dd
    return {"temporal": float(temporal), "depth": float(depth), "heads": float(K * head)}


def _cpu_attention_flops(query_shape: Any, key_shape: Any, *args: Any, **kwargs: Any) -> int:
    """``4·B·H·S·K·Dh``: the two matmuls of attention (scores and values), as torch counts them for its CUDA kernels."""
    B, H, S, Dh = query_shape
    return 4 * B * H * S * int(key_shape[2]) * Dh


_CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_ATTENTION not in flop_counter.flop_registry:  # torch counts SDPA's CUDA kernels only; CPU attention would count 0
    flop_counter.register_flop_formula(_CPU_ATTENTION)(_cpu_attention_flops)


def _counted_flops(step: Callable[[], Any]) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def _engines(shape: CompareShape, models: dict[str, Any], runtime: Any) -> dict[str, Any]:
    geometry = BlockGeometry(shape.block_frames, shape.context_blocks)
    sampling = Sampling(steps=shape.steps)
    lmm_sampling = LMMSampling(temperature=1.0, top_k=40)
    return {
        "outpainting": OutpaintingEngine(models["dit"], geometry, sampling, runtime),
        "lmdm": LMDMEngine(models["dit"], "block_causal", geometry, sampling, runtime=runtime),
        "flat": LMMEngine(models["flat"], geometry, lmm_sampling, runtime),
        "framewise": LMMEngine(models["framewise"], geometry, lmm_sampling, runtime),
    }


def _bench_shape(
    shape: CompareShape, runtime_name: str, repeats: int, warmup: int, seed: int, say: Callable[[str], None]
) -> dict[str, Any]:
    torch.manual_seed(seed)
    dit = DiT(shape.dit_args()).eval()
    target = _count(dit)
    sizes = {kind: getattr(shape, kind) or match_lmm_sizes(shape, kind, target) for kind in ("flat", "framewise")}
    models: dict[str, Any] = {"dit": dit, **{kind: LMM(shape.lmm_args(kind, sizes[kind])).eval() for kind in sizes}}
    for m in models.values():
        m.requires_grad_(False)
    for kind in ("flat", "framewise"):
        models[kind].rvq.codebooks.normal_()
    text = torch.randn(1, shape.text_tokens, shape.text_dim)
    condition = Condition(text, "bench")
    Bf, Kc, steps, seconds = shape.block_frames, shape.block_frames * shape.context_blocks, shape.steps, shape.block_seconds
    a = dit.args
    analytical = {
        "outpainting": steps * pass_flops(a, 1 + Kc + Bf, 1 + Kc + Bf, shape.text_tokens, outputs=Bf),
        "lmdm": steps * pass_flops(a, 1 + Bf, 1 + Kc + Bf, shape.text_tokens, outputs=Bf) + commit_flops(a, Bf, Kc + Bf, shape.text_tokens),
        **{kind: Bf * sum(lmm_token_flops(models[kind].args, shape.text_tokens).values()) for kind in ("flat", "framewise")},
    }
    passes = {"outpainting": steps, "lmdm": steps, "flat": Bf * shape.levels, "framewise": Bf * (1 + shape.levels)}
    runtime = get_runtime(runtime_name)
    engines = _engines(shape, models, runtime)
    eager = _engines(shape, models, get_runtime("eager"))
    out: dict[str, Any] = {
        "shape": dataclasses.asdict(shape),
        "parameters": {"dit": target, **{k: _count(models[k]) for k in sizes}},
        "sizes": sizes,
    }
    figures: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for method, engine in engines.items():
            say(f"{shape.name}: {method} (warm-up {warmup} blocks, first audio, {repeats} timed blocks, one counted)")
            ttfa = []
            for r in range(2):
                start = time.perf_counter()
                fresh = engine.start(condition, 1, generator=torch.Generator().manual_seed(seed + r))
                rollout(engine, 1, condition, state=fresh)
                ttfa.append(time.perf_counter() - start)
            generator = torch.Generator().manual_seed(seed)
            context = torch.randn(1, shape.latent_channels, Kc, generator=generator)
            state = engine.start(condition, 1, context=context, generator=generator)
            rollout(engine, max(warmup, 2), condition, state=state)  # steady state: a full window behind the block
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                rollout(engine, 1, condition, state=state)
                times.append(time.perf_counter() - start)
            slow = eager[method]
            counted_state = slow.start(condition, 1, context=context, generator=torch.Generator().manual_seed(seed))
            rollout(slow, 2, condition, state=counted_state)
            counted = _counted_flops(lambda e=slow, s=counted_state: rollout(e, 1, condition, state=s))
            q = quantiles(times)
            cache = 0 if method == "outpainting" else (state.cache.nbytes() if method == "lmdm" else engine.cache_bytes(state))
            figures[method] = {
                **q,
                "seconds_per_audio_second": q["median_s"] / seconds,
                "realtime_factor": seconds / q["median_s"],
                "time_to_first_audio_s": min(ttfa),
                "sequential_passes_per_audio_second": passes[method] / seconds,
                "flops_per_audio_second": analytical[method] / seconds,
                "counted_flops_per_audio_second": counted / seconds,
                "cache_bytes": cache,
            }
    figures["framewise"]["temporal_passes_per_audio_second"] = Bf / seconds
    out["methods"] = figures
    for kind in ("flat", "framewise"):
        lm, lmm = figures["lmdm"], figures[kind]
        key = "lmdm_vs_lmm" if kind == "flat" else "lmdm_vs_lmm_framewise"
        out[key] = {
            "speedup_per_audio_second": lmm["seconds_per_audio_second"] / lm["seconds_per_audio_second"],
            "flops_ratio": lmm["flops_per_audio_second"] / lm["flops_per_audio_second"],
            "counted_flops_ratio": lmm["counted_flops_per_audio_second"] / lm["counted_flops_per_audio_second"],
            "sequential_pass_ratio": lmm["sequential_passes_per_audio_second"] / lm["sequential_passes_per_audio_second"],
        }
    out["lmdm_vs_outpainting"] = {"speedup_per_audio_second": figures["outpainting"]["median_s"] / figures["lmdm"]["median_s"]}
    return out


def rvq_error(folder: Path | None) -> dict[str, Any] | None:
    """The reconstruction error per depth a trained RVQ checkpoint records (``meta.depth_mse``), if there is one."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    from lmdm.checkpoints.format import read_checkpoint_info

    info = read_checkpoint_info(folder, kind="rvq")
    if "depth_mse" not in info.meta:
        return None
    return {"folder": str(folder), "levels": info.args["levels"], "codes": info.args["codes"],
            "depth_mse": info.meta["depth_mse"], "latent_power": info.meta.get("latent_power")}  # fmt: skip


def run_compare_bench(
    shapes: list[CompareShape], runtime: str = "auto", repeats: int = 5, warmup: int = 2, seed: int = 0,
    rvq: Path | None = None, progress: Callable[[str], None] | None = None, measure_peak: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Every method of every shape on ``runtime`` (all on the same one), the matmul peak before and after.

    The top-level ``lmdm_vs_lmm`` and ``lmdm_vs_lmm_framewise`` are the first shape's (the paper geometry by default).
    ``measure_peak=False`` skips the matmul peak (NaN; tests).

    Raises:
        ValueError: an unknown runtime, or an LMM that cannot be sized within ±10% of the DiT.
    """
    say = progress or (lambda _: None)
    torch.set_flush_denormal(True)
    name = resolve_runtime(runtime, "cpu")
    peak = matmul_peak_flops if measure_peak else (lambda: float("nan"))
    peak_before = peak()
    results: dict[str, Any] = {"runtime": name, "threads": torch.get_num_threads(), "shapes": {}}
    for shape in shapes:
        entry = _bench_shape(shape, name, repeats, warmup, seed, say)
        p = entry["parameters"]
        for kind in ("flat", "framewise"):
            gap = p[kind] / p["dit"] - 1
            if abs(gap) > MATCH_TOLERANCE:
                raise ValueError(
                    f"{shape.name}: the {kind} LMM has {p[kind]:,} parameters, {gap:+.0%} off the DiT's {p['dit']:,} (±10% allowed)"
                )
        results["shapes"][shape.name] = entry
    results["matmul_peak_flops"] = max(peak_before, peak())
    first = results["shapes"][shapes[0].name]
    results["lmdm_vs_lmm"], results["lmdm_vs_lmm_framewise"] = first["lmdm_vs_lmm"], first["lmdm_vs_lmm_framewise"]
    results["rvq"] = rvq_error(rvq)
    return results


def compare_report(results: dict[str, Any]) -> list[Table]:
    """One table per shape for the terminal (every figure is in the JSON too)."""
    tables = []
    for name, entry in results["shapes"].items():
        s, p = entry["shape"], entry["parameters"]
        table = Table(
            title=f"lmdm bench compare: {name} ({results['runtime']}, batch 1, one run)",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        for column in ("method", "params", "pass/s", "GFLOP/s", "counted", "ms", "p90", "RTF", "TTFA", "MB"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for method in METHODS:
            r = entry["methods"][method]
            passes = f"{r['sequential_passes_per_audio_second']:.0f}"
            table.add_row(
                method,
                f"{p['dit' if method in ('outpainting', 'lmdm') else method] / 1e6:.1f}M",
                passes,
                f"{r['flops_per_audio_second'] / 1e9:.1f}",
                f"{r['counted_flops_per_audio_second'] / 1e9:.1f}",
                f"{r['median_s'] * 1e3:.0f}",
                f"{r['p90_s'] * 1e3:.0f}",
                f"{r['realtime_factor']:.2f}x",
                f"{r['time_to_first_audio_s']:.2f}",
                f"{r['cache_bytes'] / 1e6:.1f}",
            )
        f, fw = entry["lmdm_vs_lmm"], entry["lmdm_vs_lmm_framewise"]
        table.caption = (
            "Per second of audio: sequential passes (pass/s), GFLOP (analytical; counted: torch's FLOP counter, eager). Per block: ms "
            "(median, p90). TTFA: time to first audio, s (a stream's start and first block). MB: KV cache. Framewise: "
            f"{entry['methods']['framewise']['temporal_passes_per_audio_second']:.0f} of its passes are temporal. "
            f"Block {s['block_frames']} frames = {s['block_frames'] / s['latent_rate']:.2f} s, context {s['context_blocks']} blocks, "
            f"{s['steps']} steps, RVQ K={s['levels']}×{s['codes']}. LMDM vs flat LMM: {f['speedup_per_audio_second']:.1f}x wall-clock per "
            f"second of audio, sequential passes {f['sequential_pass_ratio']:.0f}x, FLOPs {f['flops_ratio']:.2f}x analytical / "
            f"{f['counted_flops_ratio']:.2f}x counted. LMDM vs framewise LMM: {fw['speedup_per_audio_second']:.1f}x wall-clock, passes "
            f"{fw['sequential_pass_ratio']:.0f}x, FLOPs {fw['flops_ratio']:.2f}x / {fw['counted_flops_ratio']:.2f}x (below 1: the LMM needs "
            f"fewer FLOPs). LMDM vs outpainting {entry['lmdm_vs_outpainting']['speedup_per_audio_second']:.1f}x."
        )
        tables.append(table)
    tables[-1].caption += f" Matmul peak {results['matmul_peak_flops'] / 1e9:.1f} GFLOP/s, {results['threads']} threads."
    rvq = results.get("rvq")
    if rvq:
        mse, power = rvq["depth_mse"], rvq.get("latent_power") or float("nan")
        picks = [k for k in (1, 2, 4, 8, 16, 32) if k <= len(mse)]
        tables[-1].caption += (
            f" RVQ {rvq['folder']} ({rvq['levels']}×{rvq['codes']}): latent MSE "
            + ", ".join(f"{mse[k - 1]:.3f} at {k}" for k in picks)
            + f" levels (latent power {power:.3f})."
        )
    return tables


def plot_compare(results: dict[str, Any], path: Path) -> Path:
    """Bar charts per shape: wall-clock seconds and GFLOPs per second of audio, and sequential passes, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(results["shapes"])
    fig, axes = plt.subplots(len(shapes), 3, figsize=(13, 3.4 * len(shapes)), squeeze=False)
    colors = {"outpainting": "#999999", "lmdm": "#1f77b4", "flat": "#d62728", "framewise": "#ff7f0e"}
    panels = (("seconds_per_audio_second", "compute s per s of audio (log)"), ("flops_per_audio_second", "GFLOP per s of audio (log)"),
              ("sequential_passes_per_audio_second", "sequential passes per s of audio (log)"))  # fmt: skip
    for row, name in enumerate(shapes):
        methods = results["shapes"][name]["methods"]
        for col, (key, label) in enumerate(panels):
            ax = axes[row][col]
            values = [methods[m][key] / (1e9 if "flops" in key else 1) for m in METHODS]
            ax.bar(METHODS, values, color=[colors[m] for m in METHODS])
            ax.set_yscale("log")
            ax.set_title(f"{name}: {label}", fontsize=9)
            for i, v in enumerate(values):
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
            if key == "seconds_per_audio_second":
                ax.axhline(1.0, color="black", lw=0.8, ls="--")
    fig.suptitle(f"lmdm bench compare ({results['runtime']}, {results['threads']} threads, batch 1; dashed: real time)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
