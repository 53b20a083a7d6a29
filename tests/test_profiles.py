"""The consumer-GPU profiles and the roofline projection (``lmdm bench serve --profile``)."""

from __future__ import annotations

import pytest

from lmdm.eval.bench_stream import commit_flops, pass_flops
from lmdm.eval.profiles import PROFILES, BlockCosts, DeviceProfile, PassCost, block_costs, max_sessions, project
from lmdm.models.dit import DiT, DiTArgs

# A hand-made device: 1 TFLOP/s, 100 GB/s.
DEVICE = DeviceProfile("hand-made", 1e12, 100e9, 1e9, "this test")


def test_projection_is_exact_when_compute_bound() -> None:
    """1 GFLOP and 1 MB per session: compute 1 ms, memory 10 µs: the block is the compute time (+ overhead)."""
    costs = BlockCosts((PassCost("step", 4, 1e9, 0.0, 1e6),), block_seconds=1.0)
    p = project(costs, DEVICE, sessions=3, pass_overhead_s=1e-4)
    assert p.block_s == pytest.approx(4 * (3 * 1e-3 + 1e-4), rel=1e-12)
    assert p.compute_s == pytest.approx(12e-3) and p.memory_s == pytest.approx(4 * 3e-5) and p.bound == "compute"
    assert p.realtime_factor == pytest.approx(1.0 / p.block_s)


def test_projection_is_exact_when_memory_bound_and_batching_shares_the_weights() -> None:
    """1 MFLOP per session against 100 MB of weights read once per pass: 1 ms of memory for any small batch."""
    costs = BlockCosts((PassCost("step", 2, 1e6, 100e6, 1e4),), block_seconds=0.5)
    one, eight = project(costs, DEVICE, 1), project(costs, DEVICE, 8)
    assert one.block_s == pytest.approx(2 * (100e6 + 1e4) / 100e9, rel=1e-12) and one.bound == "memory"
    assert eight.block_s == pytest.approx(2 * (100e6 + 8e4) / 100e9, rel=1e-12)  # eight sessions for the price of one
    # compute overtakes memory where N·1e6/1e12 = (1e8 + N·1e4)/1e11, N ≈ 1111
    n_cross = (100e6 / 100e9) / (1e6 / 1e12 - 1e4 / 100e9)
    assert project(costs, DEVICE, int(n_cross) - 10).bound == "memory" and project(costs, DEVICE, int(n_cross) + 10).bound == "compute"


def test_max_sessions_is_the_last_batch_within_the_block() -> None:
    costs = BlockCosts((PassCost("step", 1, 1e9, 0.0, 0.0),), block_seconds=0.0105)  # 1 ms per session per block
    assert max_sessions(costs, DEVICE) == 10
    assert max_sessions(costs, DEVICE, pass_overhead_s=0.001) == 9
    assert max_sessions(costs, DEVICE, headroom=0.5) == 5
    assert max_sessions(BlockCosts((PassCost("step", 1, 1e12, 0.0, 0.0),), 0.5), DEVICE) == 0  # one session is already too slow
    with pytest.raises(ValueError, match="sessions must be >= 1"):
        project(costs, DEVICE, 0)


def test_block_costs_count_the_lmdm_passes_and_the_weights() -> None:
    args = DiTArgs(io_channels=8, width=64, depth=3, head_dim=32, cond_token_dim=32, input_concat_dim=9)
    Bf, Ctx, steps, L = 4, 2, 5, 7
    costs = block_costs(args, Bf, Ctx, steps, L, latent_rate=2.0, cfg_branches=2, decoder_flops=123.0, decoder_params=10)
    names = [p.name for p in costs.passes]
    assert names == ["merged step", "step", "decode"] and [p.count for p in costs.passes] == [1, steps - 1, 1]
    keys = Bf + Ctx * Bf + 1 + Bf
    assert costs.passes[0].flops == 2 * (pass_flops(args, 1 + Bf, keys, L) + commit_flops(args, Bf, keys, L))
    assert costs.passes[1].flops == 2 * pass_flops(args, 1 + Bf, Ctx * Bf + 1 + Bf, L)
    params = sum(p.numel() for p in DiT(args).parameters())
    assert costs.passes[1].shared_bytes == 2 * params and costs.passes[2].shared_bytes == 20
    assert costs.block_seconds == 2.0
    encdec = block_costs(args, Bf, Ctx, steps, L, latent_rate=2.0, variant="encdec")
    assert [p.name for p in encdec.passes] == ["context encode", "step"] and encdec.passes[1].count == steps


def test_the_shipped_profiles_say_where_their_figures_come_from() -> None:
    assert set(PROFILES) == {"rtx-4060-laptop", "rtx-4070", "rtx-4090", "m3-max", "h100"}
    assert PROFILES["rtx-4090"].peak_flops == 165.2e12 and PROFILES["rtx-4090"].bandwidth == 1008e9
    assert PROFILES["rtx-4090"].peak_flops == pytest.approx(128 * 512 * 2.52e9, rel=1e-3)  # the per-SM rate the others use
    for p in PROFILES.values():
        assert p.source and p.peak_flops > 1e12 and p.bandwidth > 1e11
