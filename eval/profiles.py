"""Consumer-GPU profiles and the roofline projection of an LMDM's serving cost on them.

``lmdm bench serve --profile NAME`` projects, from the FLOPs and bytes of one block that it counts
(:func:`block_costs`), how long a block takes on a device and how many live sessions it holds in real
time. Roofline: each pass takes the larger of its compute time (FLOPs over the device's dense fp16/bf16
peak) and its memory time (bytes over the memory bandwidth), plus a fixed per-pass overhead (launches,
host work) measured on the machine that runs the bench. Sessions batched into one pass share its weight
reads, so on a memory-bound device batching is nearly free until compute catches up.

Every profile's peak and bandwidth say where they come from (:attr:`DeviceProfile.source`). The GeForce
peaks are dense FP16 tensor FLOP/s with FP32 accumulate (the rate a bf16/fp16 DiT gets: 512 FLOP per clock
per Ada SM, the whitepaper's RTX 4090 figure ÷ its SMs × boost clock), not the doubled FP16-accumulate or
sparse figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lmdm.models.dit import DiTArgs

__all__ = ["PROFILES", "BlockCosts", "DeviceProfile", "PassCost", "Projection", "block_costs", "max_sessions", "project", "sessions_table"]


@dataclass(frozen=True)
class DeviceProfile:
    """A device's dense fp16/bf16 matmul peak (FLOP/s), memory bandwidth (bytes/s) and memory (bytes)."""

    name: str
    peak_flops: float
    bandwidth: float
    memory: float
    source: str


_ADA = "NVIDIA Ada Lovelace GPU Architecture whitepaper v2.1, Appendix A (RTX 4090: 165.2 dense FP16 TFLOPS with FP32 accumulate = 128 SMs × 2.52 GHz × 512)"

PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            "rtx-4060-laptop", 24 * 512 * 2.37e9, 256e9, 8e9,
            f"24 SMs, boost up to 2,370 MHz (the highest-TGP part), 128-bit GDDR6 at 16 Gbps: NVIDIA's GeForce RTX 4060 Laptop specifications; FP16 rate as in the {_ADA}",
        ),
        DeviceProfile(
            "rtx-4070", 46 * 512 * 2.475e9, 504e9, 12e9,
            f"46 SMs, boost 2,475 MHz, 192-bit GDDR6X at 21 Gbps: NVIDIA's GeForce RTX 4070 specifications; FP16 rate as in the {_ADA}",
        ),
        DeviceProfile("rtx-4090", 165.2e12, 1008e9, 24e9, f"{_ADA}; 384-bit GDDR6X at 21 Gbps = 1,008 GB/s"),
        DeviceProfile(
            "m3-max", 40 * 128 * 2 * 1.398e9, 400e9, 128e9,
            "Apple M3 Max, 40-core GPU: 400 GB/s and up to 128 GB unified memory (Apple's M3 Max specifications); Apple publishes "
            "no FLOP rate: 40 cores × 128 ALUs × 2 FLOP × 1.398 GHz (third-party clock), FP16 at the FP32 rate",
        ),
        DeviceProfile(
            "h100", 989.4e12, 3.35e12, 80e9,
            "NVIDIA H100 Tensor Core GPU datasheet, SXM5: 989.4 dense BF16/FP16 TFLOPS (1,979 with sparsity), HBM3 3.35 TB/s, 80 GB",
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class PassCost:
    """One kind of pass in a block: its count per block, FLOPs per session, bytes read or written once per
    pass whatever the batch (weights), and bytes per session (KV cache, text K/V, activations)."""

    name: str
    count: int
    flops: float
    shared_bytes: float
    session_bytes: float


@dataclass(frozen=True)
class BlockCosts:
    """The passes of one block of one session, and the block's audio length."""

    passes: tuple[PassCost, ...]
    block_seconds: float

    @property
    def flops(self) -> float:
        return sum(p.count * p.flops for p in self.passes)

    def bytes(self, sessions: int = 1) -> float:
        return sum(p.count * (p.shared_bytes + sessions * p.session_bytes) for p in self.passes)


@dataclass(frozen=True)
class Projection:
    """A block's projected time on a device for ``sessions`` sessions batched into every pass."""

    device: str
    sessions: int
    block_s: float  # one batched block, every pass
    compute_s: float  # the passes' compute times alone
    memory_s: float  # their memory times alone
    overhead_s: float  # passes × the per-pass overhead
    bound: str  # "compute", "memory" or "overhead": what takes most of block_s
    realtime_factor: float  # the sessions' audio per second of device time, per session

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def project(costs: BlockCosts, device: DeviceProfile, sessions: int = 1, pass_overhead_s: float = 0.0) -> Projection:
    """The roofline time of one block for ``sessions`` sessions batched: per pass ``max(N·F / peak, (W + N·S) /
    bandwidth) + overhead``, times its count, summed over the block's passes.

    Raises:
        ValueError: fewer than one session, or a negative overhead.
    """
    if sessions < 1 or pass_overhead_s < 0:
        raise ValueError(f"sessions must be >= 1 and the pass overhead >= 0, got {sessions} and {pass_overhead_s}")
    total = compute = memory = overhead = 0.0
    for p in costs.passes:
        c = sessions * p.flops / device.peak_flops
        m = (p.shared_bytes + sessions * p.session_bytes) / device.bandwidth
        total += p.count * (max(c, m) + pass_overhead_s)
        compute, memory, overhead = compute + p.count * c, memory + p.count * m, overhead + p.count * pass_overhead_s
    parts = {"compute": compute, "memory": memory, "overhead": overhead}
    bound = max(parts, key=lambda k: parts[k])
    return Projection(device.name, sessions, total, compute, memory, overhead, bound, costs.block_seconds / total)


def max_sessions(costs: BlockCosts, device: DeviceProfile, pass_overhead_s: float = 0.0, headroom: float = 1.0, limit: int = 4096) -> int:
    """The most sessions one device keeps in real time batched: the largest ``N`` whose projected block takes
    at most ``headroom × block_seconds`` (0: not even one session)."""
    budget = headroom * costs.block_seconds
    if project(costs, device, 1, pass_overhead_s).block_s > budget:
        return 0
    lo, hi = 1, 2
    while hi <= limit and project(costs, device, hi, pass_overhead_s).block_s <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # block_s grows with N: bisect for the last N within budget
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if project(costs, device, mid, pass_overhead_s).block_s <= budget else (lo, mid)
    return lo


def block_costs(
    args: DiTArgs,
    block_frames: int,
    context_blocks: int,
    steps: int,
    text_tokens: int,
    latent_rate: float,
    cfg_branches: int = 1,
    bytes_per_value: int = 2,
    decoder_flops: float = 0.0,
    decoder_params: int = 0,
    variant: str = "block_causal",
) -> BlockCosts:
    """What one block of one LMDM session costs, counted from the model's shape.

    Passes (``block_causal``): the block's first denoising step also commits the previous block (queries
    ``Bf + 1 + Bf`` over keys ``Bf + Kc + 1 + Bf``), then ``steps − 1`` ordinary steps (``1 + Bf`` over
    ``Kc + 1 + Bf``); ``encdec`` instead encodes the context once per block and runs ``steps`` ordinary
    steps. Each CFG branch is a row of its own. Then, with ``decoder_flops`` given, one streaming decode
    of the block.

    FLOPs: :func:`~lmdm.eval.bench_stream.pass_flops` (matmuls and attention). Bytes: every pass reads the
    DiT's weights once (``shared``); per session it reads the attended keys/values and writes its own, reads
    the cached text keys/values, and reads and writes the residual stream once per layer (the activations
    a fused kernel cannot avoid), all at ``bytes_per_value``. A lower bound, as a roofline is.
    """
    from lmdm.eval.bench_stream import commit_flops, pass_flops

    if variant not in ("block_causal", "encdec"):
        raise ValueError(f"variant must be 'block_causal' or 'encdec', got {variant!r}")
    D, Ly, Bf, Kc, R, b = args.width, args.depth, block_frames, context_blocks * block_frames, cfg_branches, bytes_per_value
    L = text_tokens if args.cond_token_dim else 0
    weights = _dit_params(args) * b

    def session_bytes(queries: int, keys: int) -> float:
        kv = 2 * Ly * keys * D + 2 * Ly * queries * D  # read the attended K/V, write the pass's own
        text = 2 * Ly * L * D
        residual = 2 * Ly * queries * D
        return float(R * b * (kv + text + residual))

    plain = PassCost("step", steps - 1 if variant == "block_causal" else steps, R * pass_flops(args, 1 + Bf, Kc + 1 + Bf, L), weights,
                     session_bytes(1 + Bf, Kc + 1 + Bf))  # fmt: skip
    passes = [plain]
    if variant == "block_causal":
        keys = Bf + Kc + 1 + Bf
        merged = R * (pass_flops(args, 1 + Bf, keys, L) + commit_flops(args, Bf, keys, L))
        passes.insert(0, PassCost("merged step", 1, merged, weights, session_bytes(2 * Bf + 1, keys)))
    elif context_blocks:
        passes.insert(0, PassCost("context encode", 1, R * pass_flops(args, Kc, Kc, L, outputs=0), weights, session_bytes(Kc, Kc)))
    if decoder_flops:
        passes.append(PassCost("decode", 1, decoder_flops, decoder_params * b, 0.0))
    return BlockCosts(tuple(passes), Bf / latent_rate)


def _dit_params(args: DiTArgs) -> int:
    """The DiT's parameters, counted on a meta-device copy (no memory)."""
    import torch

    from lmdm.models.dit import DiT

    with torch.device("meta"):
        dit = DiT(args)
    return sum(p.numel() for p in dit.parameters())


def sessions_table(costs: BlockCosts, overhead_s: float, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Per profile: one session's projected block time and real-time factor, and the most real-time sessions."""
    rows = []
    for name in names or list(PROFILES):
        device = PROFILES[name]
        one = project(costs, device, 1, overhead_s)
        n = max_sessions(costs, device, overhead_s)
        rows.append({**one.as_dict(), "max_realtime_sessions": n, "at_max": project(costs, device, max(n, 1), overhead_s).as_dict()})
    return rows
