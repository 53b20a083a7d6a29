"""``lmdm bench stream``: per-block latency of outpainting vs the LMDM engines on every runtime, in one run.

Every figure comes from the same process: per runtime (:mod:`lmdm.runtime`: ``eager``, ``packed``,
``compile``) and method, the warm-up time (packing, compiling) apart from the steady per-block latency
(median, p90); the measured LMDM/outpainting speedup, both methods always on the same runtime, beside the
analytical token-pass ratio ``steps·(Kc+Bf) / (steps·Bf + Bf)`` (block-causal; ``+ Kc`` instead of ``+ Bf``
for encdec, which re-encodes the context each block); achieved FLOP/s beside this machine's measured matmul
peak (MFU); KV-cache bytes per second of context; real-time factor (with the autoencoder's streaming decode
for the quickstart model).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich import box
from rich.table import Table

from lmdm.config import Config
from lmdm.models.autoencoder import StreamingDecoder
from lmdm.models.dit import DiT, DiTArgs
from lmdm.runtime import RUNTIMES, get_runtime, onednn, resolve_runtime
from lmdm.streaming.engines import Condition, LMDMEngine, OutpaintingEngine, Sampling
from lmdm.streaming.rollout import rollout
from lmdm.streaming.sequences import BlockGeometry

__all__ = ["BenchShape", "commit_flops", "matmul_peak_flops", "pass_flops", "quantiles", "run_stream_bench", "stream_report"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BenchShape:
    """The benchmarked geometry (defaults: the paper's, on a width-512, depth-8 model) and where it runs."""

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
    warmup: int = 2  # blocks per method before timing (at least 2: a plain block, then one with a merged commit)
    runtimes: tuple[str, ...] = RUNTIMES
    device: str = "cpu"
    dtype: str = "float32"


def matmul_peak_flops(repeats: int = 8, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> float:
    """This machine's measured matmul rate (FLOP/s) at the current float32 precision setting: the best of
    ``repeats`` runs over a few large shapes (square 1024/2048, and 1024 tokens × a 512→4096 layer), with
    ``torch.mm`` and, on CPU where available, oneDNN's packed linear."""
    device = device or torch.device("cpu")
    best = 0.0
    for m, k, n in ((1024, 1024, 1024), (2048, 2048, 2048), (1024, 512, 4096)):
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        kernels: list[Callable[[], Any]] = [lambda a=a, b=b: torch.mm(a, b)]
        if device.type == "cpu" and onednn.available() and dtype == torch.float32:
            pack = onednn.LinearPack.of(b.T, None)
            kernels.append(lambda a=a, pack=pack: pack(a))
        with torch.no_grad():
            for kernel in kernels:
                kernel()
                for _ in range(repeats):
                    _sync(device)
                    start = time.perf_counter()
                    kernel()
                    _sync(device)
                    best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


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


def quantiles(samples: list[float]) -> dict[str, float]:
    """Median and p90 (nearest rank) of timings in seconds: ``median_s``, ``p90_s``."""
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"median_s": statistics.median(ordered), "p90_s": p90}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_round_robin(steps: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _bench_dit(shape: BenchShape, device: torch.device, dtype: torch.dtype) -> DiT:
    C = shape.latent_channels
    text_dim = shape.width if shape.cond_token_dim is None else shape.cond_token_dim
    args = DiTArgs(
        io_channels=C, width=shape.width, depth=shape.depth, head_dim=shape.head_dim, cond_token_dim=text_dim, input_concat_dim=C + 1
    )
    dit = DiT(args).eval().to(device=device, dtype=dtype)
    for p in dit.parameters():
        p.requires_grad_(False)  # inference weights (compile may freeze them)
    return dit


def _bench_runtime(name: str, dit: DiT, shape: BenchShape, condition: Condition, flops: dict[str, float], seed: int) -> dict[str, Any]:
    """Every method on runtime ``name``: warm-up (compiles, packs) timed apart, then round-robin blocks
    (MFU is added once the machine's peak is known)."""
    first = next(dit.parameters())
    device, dtype = first.device, first.dtype
    runtime = get_runtime(name, device)
    geometry = BlockGeometry(shape.block_frames, shape.context_blocks)
    sampling = Sampling(steps=shape.steps, cfg_scale=shape.cfg_scale)
    engines: dict[str, OutpaintingEngine | LMDMEngine] = {
        "outpainting": OutpaintingEngine(dit, geometry, sampling, runtime),
        "encdec": LMDMEngine(dit, "encdec", geometry, sampling, runtime=runtime),
        "block_causal": LMDMEngine(dit, "block_causal", geometry, sampling, runtime=runtime),
    }
    C, Kc, Bf = shape.latent_channels, geometry.context_frames, shape.block_frames
    branches = 2 if shape.cfg_scale != 1.0 and condition.text is not None else 1
    entry: dict[str, Any] = {"warmup_s": {}}
    steps: dict[str, Callable[[], Any]] = {}
    states: dict[str, Any] = {}
    with torch.inference_mode():
        for method, engine in engines.items():
            generator = torch.Generator(device=device).manual_seed(seed)
            context = torch.randn(shape.batch, C, Kc, generator=generator, device=device, dtype=dtype)
            _sync(device)
            start = time.perf_counter()  # warm-up: the start's context encoding, a plain block, a block with a merged commit
            state = states[method] = engine.start(condition, shape.batch, context=context, generator=generator)
            rollout(engine, max(shape.warmup, 2), condition, state=state)
            _sync(device)
            entry["warmup_s"][method] = time.perf_counter() - start
            steps[method] = lambda e=engine, s=state: rollout(e, 1, condition, state=s)
        # Round-robin: one block of each method per round, so machine-speed drift hits every method alike.
        times = _time_round_robin(steps, shape.repeats, device)
    for method, engine in engines.items():
        q = quantiles(times[method])
        block_flops = branches * shape.batch * flops[method]
        figures: dict[str, Any] = {
            **q,
            "flops_per_block": block_flops,
            "achieved_flops": block_flops / q["median_s"],
            "realtime_factor": Bf / shape.latent_rate / q["median_s"],
        }
        if isinstance(engine, LMDMEngine):
            cache = states[method].cache
            figures["kv_cache_bytes"] = cache.nbytes()
            figures["kv_cache_bytes_per_context_second"] = cache.nbytes() / (Kc / shape.latent_rate)
        entry[method] = figures
    return entry


def run_stream_bench(
    shape: BenchShape, quickstart: Config | None = None, seed: int = 0, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure every method on every runtime of ``shape.runtimes`` (and the quickstart model's real-time factor)
    in one run. Both methods of a comparison always run on the same runtime; ``runtimes.best`` is the runtime
    with the fastest block-causal LMDM, and the top-level method figures are that runtime's.

    Denormal floats are flushed to zero for every method (``torch.set_flush_denormal``), as a CPU
    deployment would.

    Args:
        progress: called with a line per stage (a runtime's warm-up and timing can take minutes).

    Raises:
        ValueError: an unknown runtime, device or dtype.
    """
    say = progress or (lambda _: None)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    device, dtype = torch.device(shape.device), _DTYPES.get(shape.dtype)
    if dtype is None:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {shape.dtype!r}")
    names = [resolve_runtime(r, device) for r in shape.runtimes]
    skipped = {}
    if "packed" in names and (device.type != "cpu" or dtype != torch.float32):  # it would run the eager path and be named packed
        names = [n for n in names if n != "packed"]
        skipped["packed"] = "runs float32 CPU inference only"
    if not names:
        raise ValueError(f"no runtime to measure on {device} in {shape.dtype} (packed: float32 CPU only)")
    dit = _bench_dit(shape, device, dtype)
    args = dit.args
    text_dim = args.cond_token_dim
    text = torch.randn(shape.batch, shape.text_tokens, text_dim, device=device, dtype=dtype) if text_dim else None
    condition = Condition(text, "bench")
    Bf, Kc, steps = shape.block_frames, shape.block_frames * shape.context_blocks, shape.steps
    flops = {  # every pass's last layer computes the target's outputs only
        "outpainting": steps * pass_flops(args, 1 + Kc + Bf, 1 + Kc + Bf, shape.text_tokens, outputs=Bf),
        "encdec": steps * pass_flops(args, 1 + Bf, 1 + Kc + Bf, shape.text_tokens, outputs=Bf)
        + pass_flops(args, Kc, Kc, shape.text_tokens, outputs=0),  # the context encoding: keys/values only in its last layer
        "block_causal": steps * pass_flops(args, 1 + Bf, 1 + Kc + Bf, shape.text_tokens, outputs=Bf)
        + commit_flops(args, Bf, Kc + Bf, shape.text_tokens),
    }
    analytical = {"encdec": steps * (Kc + Bf) / (steps * Bf + Kc), "block_causal": steps * (Kc + Bf) / (steps * Bf + Bf)}
    peak_before = matmul_peak_flops(dtype=dtype, device=device)
    results: dict[str, Any] = {
        "shape": asdict(shape),
        "machine": {
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "threads": torch.get_num_threads(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "onednn_packed_linear": onednn.available(),
        },
        "runtimes": {},
        "skipped_runtimes": skipped,
    }
    for name in dict.fromkeys(names):
        say(
            f"runtime {name}: warm-up ({'compiling every kind of pass' if name == 'compile' else 'start and 2 blocks'}), then {shape.repeats} rounds of blocks"
        )
        start = time.perf_counter()
        results["runtimes"][name] = _bench_runtime(name, dit, shape, condition, flops, seed)
        say(f"runtime {name}: done in {time.perf_counter() - start:.0f} s")
    # The peak is this machine's best rate: measured before and after the timed blocks, so one slow
    # moment on a shared machine cannot halve it (and double every MFU).
    peak = max(peak_before, matmul_peak_flops(dtype=dtype, device=device))
    results["machine"]["matmul_peak_flops"] = peak
    for entry in results["runtimes"].values():
        for method in ("outpainting", "encdec", "block_causal"):
            entry[method]["mfu"] = entry[method]["achieved_flops"] / peak
        outpaint = entry["outpainting"]["median_s"]
        entry["lmdm_vs_outpainting"] = {
            "measured_speedup": outpaint / entry["block_causal"]["median_s"],
            "analytical_speedup": analytical["block_causal"],
            "efficiency": outpaint / entry["block_causal"]["median_s"] / analytical["block_causal"],
            "encdec_measured_speedup": outpaint / entry["encdec"]["median_s"],
            "encdec_analytical_speedup": analytical["encdec"],
        }
    best = min(results["runtimes"], key=lambda n: results["runtimes"][n]["block_causal"]["median_s"])
    results["runtimes"]["best"] = best
    for method in ("outpainting", "encdec", "block_causal", "lmdm_vs_outpainting"):
        results[method] = results["runtimes"][best][method]
    for name, why in skipped.items():
        say(f"runtime {name} skipped: {why}")
    if quickstart is not None and device.type == "cpu":
        say(f"quickstart model on {best}: real-time factor with decode")
        results["quickstart"] = _quickstart_rtf(quickstart, max(shape.repeats, 20), shape.warmup, seed, best)
    results["lmdm"] = {
        "realtime_factor": results["quickstart"]["realtime_factor"]
        if "quickstart" in results
        else results["block_causal"]["realtime_factor"],
        "model": "quickstart (block_causal, autoencoder decode included)" if "quickstart" in results else "bench shape, no decode",
        "runtime": best,
    }
    return results


def _quickstart_rtf(cfg: Config, repeats: int, warmup: int, seed: int, runtime: str) -> dict[str, Any]:
    """Real-time factor of the quickstart model on ``runtime``: block-causal LMDM step + streaming decode, per block.

    Runs with denormals flushed (set by :func:`run_stream_bench`): the decoder's tiny activations
    otherwise hit the CPU's slow denormal path.
    """
    from lmdm.builders import build_autoencoder_from, build_dit, build_engine, build_runtime

    torch.manual_seed(seed)
    dit, vae = build_dit(cfg).eval(), build_autoencoder_from(cfg).eval()
    engine = build_engine(cfg, dit, "block_causal", build_runtime(cfg, dit, runtime))
    text = torch.randn(1, 64, cfg.dit.cond_token_dim) if cfg.dit.cond_token_dim else None
    condition = Condition(text, "bench")
    generator = torch.Generator().manual_seed(seed)
    Bf = cfg.stream.block_frames
    decoder = StreamingDecoder(vae)
    parts: dict[str, list[float]] = {"dit_s": [], "decode_s": [], "block_s": []}
    with torch.inference_mode():
        context = torch.randn(1, dit.args.io_channels, Bf * cfg.stream.context_blocks, generator=generator)
        state = engine.start(condition, 1, context=context, generator=generator)
        for i in range(warmup + repeats):
            start = time.perf_counter()
            latents = rollout(engine, 1, condition, state=state)
            middle = time.perf_counter()
            decoder.push(latents)
            end = time.perf_counter()
            if i >= warmup:
                parts["dit_s"].append(middle - start)
                parts["decode_s"].append(end - middle)
                parts["block_s"].append(end - start)
    q = quantiles(parts["block_s"])
    latent_rate = cfg.audio.sample_rate / vae.downsampling_ratio
    return {
        **q,
        "median_dit_s": statistics.median(parts["dit_s"]),  # where a block's time goes
        "median_decode_s": statistics.median(parts["decode_s"]),
        "runtime": runtime,
        "dit_parameters": sum(p.numel() for p in dit.parameters()),
        "autoencoder_parameters": sum(p.numel() for p in vae.parameters()),
        "block_seconds": Bf / latent_rate,
        "realtime_factor": (Bf / latent_rate) / q["median_s"],
        "sample_rate": cfg.audio.sample_rate,
        "steps": cfg.stream.steps,
    }


def stream_report(results: dict[str, Any]) -> Table:
    """A table of the figures for the terminal: one row per runtime and method (p90s and FLOPs in the JSON)."""
    table = Table(title="lmdm bench stream (per block, one run)", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("runtime", "method", "warm-up s", "median ms", "GFLOP/s", "MFU", "RTF", "speedup", "eff."):
        table.add_column(column, justify="left" if column in ("runtime", "method") else "right")
    best = results["runtimes"]["best"]
    for name, entry in results["runtimes"].items():
        if name == "best":
            continue
        s = entry["lmdm_vs_outpainting"]
        for method in ("outpainting", "encdec", "block_causal"):
            r = entry[method]
            speedup = {"block_causal": (s["measured_speedup"], s["efficiency"]), "encdec": (s["encdec_measured_speedup"], None)}.get(method)
            table.add_row(
                (f"{name}*" if name == best else name) if method == "outpainting" else "",
                method,
                f"{entry['warmup_s'][method]:.1f}",
                f"{r['median_s'] * 1e3:.1f}",
                f"{r['achieved_flops'] / 1e9:.1f}",
                f"{r['mfu']:.1%}",
                f"{r['realtime_factor']:.1f}x",
                f"{speedup[0]:.2f}x" if speedup else "-",
                f"{speedup[1]:.2f}" if speedup and speedup[1] is not None else "-",
                end_section=method == "block_causal",
            )
    s = results["lmdm_vs_outpainting"]
    m = results["machine"]
    table.caption = (
        f"* fastest LMDM ({best}). Speedup = outpainting / LMDM on the same runtime; analytical block-causal {s['analytical_speedup']:.2f}x "
        f"(steps·(Kc+Bf)/(steps·Bf+Bf)), encdec {s['encdec_analytical_speedup']:.2f}x; efficiency = measured / analytical. "
        f"Warm-up = the stream's start and {results['shape']['warmup']} blocks (packing, compiling), not in the medians. "
        f"Device {m['device']}, {m['threads']} threads, matmul peak {m['matmul_peak_flops'] / 1e9:.1f} GFLOP/s; "
        f"KV cache {results['block_causal']['kv_cache_bytes_per_context_second'] / 1e6:.2f} MB per second of context."
    )
    if "quickstart" in results:
        q = results["quickstart"]
        table.caption += (
            f" Quickstart model ({q['dit_parameters'] / 1e6:.1f}M DiT params, {q['steps']} steps, {q['sample_rate']} Hz, {q['runtime']}): "
            f"{q['median_s'] * 1e3:.1f} ms per {q['block_seconds']:.2f}-s block with decode (DiT {q['median_dit_s'] * 1e3:.1f} ms, "
            f"decode {q['median_decode_s'] * 1e3:.1f} ms) = {q['realtime_factor']:.1f}x real time."
        )
    return table
