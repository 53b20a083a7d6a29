"""``lmdm bench stream``: per-block latency of outpainting vs the LMDM engines, measured in one run.

Every figure comes from the same process: per-block latency (median, p90) per method, the measured
LMDM/outpainting speedup beside the analytical token-pass ratio ``steps·(Kc+Bf) / (steps·Bf + Bf)``
(block-causal; ``+ Kc`` instead of ``+ Bf`` for encdec, which re-encodes the context each block),
achieved FLOP/s beside this machine's measured matmul peak (MFU), KV-cache bytes per second of
context, and real-time factor (with the autoencoder's streaming decode when one is given).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.table import Table

from lmdm.config import Config
from lmdm.models import cpu_gemm
from lmdm.models.autoencoder import StreamingDecoder
from lmdm.models.dit import DiT, DiTArgs
from lmdm.models.packed import PackedLinear, kernels_used, pack_linears, packing_available
from lmdm.streaming.engines import Condition, LMDMEngine, OutpaintingEngine, Sampling
from lmdm.streaming.sequences import BlockGeometry

__all__ = ["BenchShape", "commit_flops", "matmul_peak_flops", "pass_flops", "run_stream_bench", "weight_streaming_probe"]

COLD_BYTES = 96 * 2**20  # weights cycled by the cold probe: more than the last-level cache of the CPUs we run on


@dataclass(frozen=True)
class BenchShape:
    """The benchmarked geometry (defaults: the paper's, on a width-512, depth-8 model)."""

    width: int = 512
    depth: int = 8
    head_dim: int = 64
    latent_channels: int = 64
    block_frames: int = 48
    context_blocks: int = 4
    steps: int = 8
    batch: int = 1
    text_tokens: int = 64
    cond_token_dim: int | None = None  # text token width; None = the model width
    cfg_scale: float = 1.0
    latent_rate: float = 21.5
    repeats: int = 10
    warmup: int = 2
    packed: bool = True  # packed linear layers (lmdm.models.packed) for every method alike
    kernel: str = "auto"  # packed linears' kernel: auto (ours, lmdm.models.cpu_gemm, where it builds) | onednn


def matmul_peak_flops(repeats: int = 8, dtype: torch.dtype = torch.float32) -> float:
    """This machine's measured matmul rate (FLOP/s) at the current float32 precision setting: the best
    of ``repeats`` runs over a few large shapes (square 1024/2048, and 1024 tokens × a 512→4096 layer),
    with ``torch.mm`` and, where available, both packed linear kernels (ours and oneDNN's)."""
    best = 0.0
    for m, k, n in ((1024, 1024, 1024), (2048, 2048, 2048), (1024, 512, 4096)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        kernels = [lambda a=a, b=b: torch.mm(a, b)]
        if packing_available() and dtype == torch.float32:
            for kernel in ("auto", "onednn"):
                layer = PackedLinear(torch.nn.Linear(k, n, bias=False), kernel)  # type: ignore[arg-type]
                kernels.append(lambda a=a, layer=layer: layer(a))
        with torch.no_grad():
            for kernel in kernels:
                kernel()
                for _ in range(repeats):
                    start = time.perf_counter()
                    kernel()
                    best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def weight_streaming_probe(
    width: int, rows: tuple[int, ...], repeats: int = 10, packed: bool = True, kernel: str = "auto"
) -> dict[str, dict[str, float]]:
    """Time of one ``width → 4·width`` linear (the feed-forward's shape) per row count, with its weights
    in cache (one layer called again and again) and streamed from memory (a cycle of layers holding
    more than a server CPU's last-level cache, as a pass over a whole DiT does).

    A pass re-reads every weight, so the cold time is what a DiT pass pays; how much more it is than
    the warm time shows how little of the weight traffic the kernel hides behind its arithmetic, which
    costs a few-row LMDM pass far more (relatively) than a window-sized outpainting pass.

    Returns:
        Per row count ``"rows_<n>"``: ``warm_s`` and ``cold_s``, medians of ``repeats`` calls, and ``cold_over_warm``.
    """
    layer_bytes = 4 * width * width * 4  # float32 weight of width → 4·width
    count = max(2, -(-COLD_BYTES // layer_bytes))
    layers: list[torch.nn.Module] = [torch.nn.Linear(width, 4 * width, bias=False) for _ in range(count)]
    if packed and packing_available():
        layers = [PackedLinear(layer, kernel) for layer in layers]  # type: ignore[arg-type]
    figures: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for n in rows:
            x = torch.randn(n, width)
            for layer in layers:  # pack (and warm the code paths) outside the timed calls
                layer(x)
            warm, cold = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(len(layers)):
                    layers[0](x)
                warm.append((time.perf_counter() - start) / len(layers))
                start = time.perf_counter()
                for layer in layers:
                    layer(x)
                cold.append((time.perf_counter() - start) / len(layers))
            w, c = statistics.median(warm), statistics.median(cold)
            figures[f"rows_{n}"] = {"warm_s": w, "cold_s": c, "cold_over_warm": c / w}
    return figures


def pass_flops(args: DiTArgs, queries: int, keys: int, text_tokens: int, outputs: int | None = None) -> float:
    """Matmul FLOPs of one DiT pass of ``queries`` tokens over ``keys`` self-attention keys, whose last
    layer computes outputs for the last ``outputs`` tokens only (default: all; the others give that layer's
    keys/values only, :meth:`DiT.run_layers <lmdm.models.dit.DiT.run_layers>` ``outputs_from``).

    Per layer and token: ``36·D²`` (qkv 6, out 2, cross q 2, cross out 2, GLU 16 + 8) ``+ 4·K·D`` (self
    attention) ``+ 4·L·D`` (cross-attention; text K/V are cached per prompt); the last layer's tokens without
    outputs pay the qkv's ``6·D²`` only. Plus the input projection of every token and the output
    projection of the output tokens.
    """
    S, K, D, L = queries, keys, args.width, text_tokens if args.cond_token_dim else 0
    So = S if outputs is None else outputs
    per_token = 36 * D * D + 4 * K * D + 4 * L * D
    layers = (args.depth - 1) * S * per_token + S * 6 * D * D + So * (per_token - 6 * D * D)
    io = 2 * S * D * (args.io_channels + args.input_concat_dim) + 2 * So * D * args.io_channels
    return float(layers + io)


def commit_flops(args: DiTArgs, block: int, keys: int, text_tokens: int) -> float:
    """Matmul FLOPs of committing a clean block of ``block`` tokens into the block-causal cache: a pass
    whose last layer computes the tokens' keys/values only (``6·S·D²``: no attention, cross-attention,
    output projection, feed-forward or ``project_out``)."""
    return pass_flops(args, block, keys, text_tokens, outputs=0)


def _quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"median_s": statistics.median(ordered), "p90_s": p90}


def _time_round_robin(steps: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def _time_blocks(step: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def run_stream_bench(shape: BenchShape, quickstart: Config | None = None, seed: int = 0) -> dict[str, Any]:
    """Measure every method on ``shape`` (and the quickstart model's real-time factor) in one run.

    Denormal floats are flushed to zero for every method (``torch.set_flush_denormal``), as a CPU
    deployment would.
    """
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    C = shape.latent_channels
    text_dim = shape.width if shape.cond_token_dim is None else shape.cond_token_dim
    args = DiTArgs(
        io_channels=C,
        width=shape.width,
        depth=shape.depth,
        head_dim=shape.head_dim,
        cond_token_dim=text_dim,
        input_concat_dim=C + 1,
    )
    dit = DiT(args).eval()
    if shape.kernel not in ("auto", "onednn"):
        raise ValueError(f"kernel must be 'auto' or 'onednn', got {shape.kernel!r}")
    packed_layers = pack_linears(dit, shape.kernel) if shape.packed else 0  # type: ignore[arg-type]  # one model: every method gets the same layers
    geometry = BlockGeometry(shape.block_frames, shape.context_blocks)
    sampling = Sampling(steps=shape.steps, cfg_scale=shape.cfg_scale)
    text = torch.randn(shape.batch, shape.text_tokens, text_dim) if text_dim else None
    condition = Condition(text, "bench")
    Bf, Kc, steps = shape.block_frames, geometry.context_frames, shape.steps
    branches = 2 if shape.cfg_scale != 1.0 and text is not None else 1
    engines: dict[str, OutpaintingEngine | LMDMEngine] = {
        "outpainting": OutpaintingEngine(dit, geometry, sampling),
        "encdec": LMDMEngine(dit, "encdec", geometry, sampling),
        "block_causal": LMDMEngine(dit, "block_causal", geometry, sampling),
    }
    flops = {  # every pass's last layer computes the target's outputs only
        "outpainting": steps * pass_flops(args, 1 + Kc + Bf, 1 + Kc + Bf, shape.text_tokens, outputs=Bf),
        "encdec": steps * pass_flops(args, 1 + Bf, 1 + Kc + Bf, shape.text_tokens, outputs=Bf)
        + pass_flops(args, Kc, Kc, shape.text_tokens),
        "block_causal": steps * pass_flops(args, 1 + Bf, 1 + Kc + Bf, shape.text_tokens, outputs=Bf)
        + commit_flops(args, Bf, Kc + Bf, shape.text_tokens),
    }
    analytical = {
        "encdec": steps * (Kc + Bf) / (steps * Bf + Kc),
        "block_causal": steps * (Kc + Bf) / (steps * Bf + Bf),
    }
    peak_before = matmul_peak_flops()
    seconds_per_block = Bf / shape.latent_rate
    results: dict[str, Any] = {
        "shape": asdict(shape),
        "machine": {
            "threads": torch.get_num_threads(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "linear": "F.linear (BLAS)",
        },
    }
    with torch.inference_mode():
        states = {}
        for name, engine in engines.items():
            generator = torch.Generator().manual_seed(seed)
            context = torch.randn(shape.batch, C, Kc, generator=generator)
            states[name] = engine.start(condition, shape.batch, context=context, generator=generator)
        # Round-robin: one block of each method per round, so machine-speed drift hits every method alike.
        times = _time_round_robin(
            {n: (lambda e=e, s=states[n]: e.step(s, condition)) for n, e in engines.items()}, shape.repeats, shape.warmup
        )
        # The peak is this machine's best rate: measured before and after the timed blocks, so one slow
        # moment on a shared machine cannot halve it (and double every MFU).
        peak = max(peak_before, matmul_peak_flops())
        results["machine"]["matmul_peak_flops"] = peak
        if packed_layers:
            used = kernels_used(dit)
            ours = f"{cpu_gemm.status()}: {used['cpu_gemm']} layers, " if used["cpu_gemm"] else ""
            results["machine"]["linear"] = f"{ours}oneDNN packed: {used['onednn']} layers"
            if shape.kernel == "auto" and not cpu_gemm.available():
                results["machine"]["linear"] += f" (lmdm cpu_gemm {cpu_gemm.status()})"
            results["machine"]["linear_kernels"] = used
        results["machine"]["weight_streaming"] = weight_streaming_probe(
            shape.width, (1 + Bf, 1 + Kc + Bf), packed=shape.packed, kernel=shape.kernel
        )
        for name, engine in engines.items():
            q = _quantiles(times[name])
            block_flops = branches * shape.batch * flops[name]
            entry: dict[str, Any] = {
                **q,
                "flops_per_block": block_flops,
                "achieved_flops": block_flops / q["median_s"],
                "mfu": block_flops / q["median_s"] / peak,
                "realtime_factor": seconds_per_block / q["median_s"],
            }
            cache = states[name].cache
            if isinstance(engine, LMDMEngine) and cache is not None:
                entry["kv_cache_bytes"] = cache.nbytes()
                entry["kv_cache_bytes_per_context_second"] = cache.nbytes() / (Kc / shape.latent_rate)
            results[name] = entry
        if quickstart is not None:
            results["quickstart"] = _quickstart_rtf(quickstart, max(shape.repeats, 20), shape.warmup, seed, shape.packed, shape.kernel)
    outpaint = results["outpainting"]["median_s"]
    results["lmdm_vs_outpainting"] = {
        "measured_speedup": outpaint / results["block_causal"]["median_s"],
        "analytical_speedup": analytical["block_causal"],
        "efficiency": outpaint / results["block_causal"]["median_s"] / analytical["block_causal"],
        "encdec_measured_speedup": outpaint / results["encdec"]["median_s"],
        "encdec_analytical_speedup": analytical["encdec"],
    }
    results["lmdm"] = {
        "realtime_factor": results["quickstart"]["realtime_factor"]
        if quickstart is not None
        else results["block_causal"]["realtime_factor"],
        "model": "quickstart (block_causal, autoencoder decode included)" if quickstart is not None else "bench shape, no decode",
    }
    return results


def _quickstart_rtf(cfg: Config, repeats: int, warmup: int, seed: int, packed: bool, kernel: str = "auto") -> dict[str, Any]:
    """Real-time factor of the quickstart model: block-causal LMDM step + streaming decode, per block.

    Runs with denormals flushed (set by :func:`run_stream_bench`): the decoder's tiny activations
    otherwise hit the CPU's slow denormal path.
    """
    from lmdm.builders import build_autoencoder_from, build_dit, build_engine

    torch.manual_seed(seed)
    dit, vae = build_dit(cfg).eval(), build_autoencoder_from(cfg).eval()
    if packed:
        pack_linears(dit, kernel)  # type: ignore[arg-type]
    engine = build_engine(cfg, dit, "block_causal")
    text = torch.randn(1, 64, cfg.dit.cond_token_dim) if cfg.dit.cond_token_dim else None
    condition = Condition(text, "bench")
    generator = torch.Generator().manual_seed(seed)
    Bf = cfg.stream.block_frames
    state = engine.start(
        condition, 1, context=torch.randn(1, dit.args.io_channels, Bf * cfg.stream.context_blocks, generator=generator), generator=generator
    )
    decoder = StreamingDecoder(vae)
    parts: dict[str, list[float]] = {"dit_s": [], "decode_s": []}

    def block() -> None:
        start = time.perf_counter()
        latents = engine.step(state, condition)
        middle = time.perf_counter()
        decoder.push(latents)
        parts["dit_s"].append(middle - start)
        parts["decode_s"].append(time.perf_counter() - middle)

    times = _time_blocks(block, repeats, warmup)
    q = _quantiles(times)
    latent_rate = cfg.audio.sample_rate / vae.downsampling_ratio
    return {
        **q,
        **{f"median_{name}": statistics.median(values[warmup:]) for name, values in parts.items()},  # where a block's time goes
        "dit_parameters": sum(p.numel() for p in dit.parameters()),
        "autoencoder_parameters": sum(p.numel() for p in vae.parameters()),
        "block_seconds": Bf / latent_rate,
        "realtime_factor": (Bf / latent_rate) / q["median_s"],
        "sample_rate": cfg.audio.sample_rate,
        "steps": cfg.stream.steps,
    }


def stream_report(results: dict[str, Any]) -> Table:
    """A table of the figures for the terminal."""
    table = Table(title="lmdm bench stream (per block, one run)")
    for column in ("method", "median ms", "p90 ms", "GFLOP/block", "GFLOP/s", "MFU", "RTF", "KV cache / ctx s"):
        table.add_column(column, justify="right")
    for name in ("outpainting", "encdec", "block_causal"):
        r = results[name]
        kv = f"{r['kv_cache_bytes_per_context_second'] / 1e6:.2f} MB" if "kv_cache_bytes_per_context_second" in r else "-"
        table.add_row(
            name,
            f"{r['median_s'] * 1e3:.1f}",
            f"{r['p90_s'] * 1e3:.1f}",
            f"{r['flops_per_block'] / 1e9:.2f}",
            f"{r['achieved_flops'] / 1e9:.1f}",
            f"{r['mfu']:.1%}",
            f"{r['realtime_factor']:.1f}x",
            kv,
        )
    s = results["lmdm_vs_outpainting"]
    table.caption = (
        f"block-causal speedup {s['measured_speedup']:.2f}x measured vs {s['analytical_speedup']:.2f}x analytical "
        f"(steps·(Kc+Bf)/(steps·Bf+Bf)) = {s['efficiency']:.2f} of the ratio; encdec {s['encdec_measured_speedup']:.2f}x vs "
        f"{s['encdec_analytical_speedup']:.2f}x. Matmul peak {results['machine']['matmul_peak_flops'] / 1e9:.1f} GFLOP/s; "
        f"linear layers: {results['machine']['linear']}."
    )
    probe = results["machine"].get("weight_streaming")
    if probe:
        timings = "; ".join(
            f"{rows.removeprefix('rows_')} rows {t['warm_s'] * 1e6:.0f} µs with its weights in cache, {t['cold_s'] * 1e6:.0f} µs "
            f"streamed from memory ({t['cold_over_warm']:.2f}x)"
            for rows, t in probe.items()
        )
        table.caption += f" One linear of the feed-forward's shape: {timings} (a DiT pass streams every weight from memory)."
    if "quickstart" in results:
        q = results["quickstart"]
        table.caption += (
            f" Quickstart model ({q['dit_parameters'] / 1e6:.1f}M DiT params, {q['steps']} steps, {q['sample_rate']} Hz): "
            f"{q['median_s'] * 1e3:.1f} ms per {q['block_seconds']:.2f}-s block with decode (DiT {q['median_dit_s'] * 1e3:.1f} ms, "
            f"decode {q['median_decode_s'] * 1e3:.1f} ms) = {q['realtime_factor']:.1f}x real time."
        )
    return table
