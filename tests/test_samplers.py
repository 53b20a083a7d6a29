"""Diffusion maths: objectives, time grids and samplers, checked against closed forms.

The sampler tests use a Gaussian data distribution ``x0 ~ N(MU, S²)`` per scalar, whose exact denoiser
is closed-form: with ``x_t = alpha·x0 + sigma·eps``,
``E[x0 | x_t] = MU + (alpha·S² / (alpha²·S² + sigma²))·(x_t − alpha·MU)``. With that denoiser the ODE
samplers are affine maps of their start batch, so a start batch standardised to exactly the marginal's
mean and variance makes the output's empirical moments the exact moments of the sampler's output
distribution: the errors below are discretisation errors only, with no Monte Carlo noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import pairwise

import pytest
import torch
from torch import Tensor

from lmdm.diffusion import (
    SAMPLERS,
    Denoiser,
    Objective,
    broadcast_t,
    cfg_combine,
    dpmpp_2m_step,
    euler_step,
    get_objective,
    pingpong_step,
    sample,
    sample_dpmpp_2m,
    sample_euler,
    sample_pingpong,
    timesteps,
    x0_denoiser,
)

MU, S = 0.7, 0.5
N = 20_000
OBJECTIVES = ["rectified_flow", "v"]
SCHEDULES = ["linear", "logsnr"]
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: intra-op threads only add contention (25x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian_denoiser(objective: Objective) -> Denoiser:
    """The exact posterior mean ``E[x0 | x_t]`` for ``x0 ~ N(MU, S²)``."""

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = objective.alpha_sigma(broadcast_t(t, x))
        gain = alpha * S**2 / (alpha**2 * S**2 + sigma**2)
        return (MU + gain * (x.to(F64) - alpha * MU)).to(x.dtype)

    return denoise


def standardised_normal(n: int, seed: int) -> Tensor:
    """``(n,)`` float64 with empirical mean exactly 0 and (population) variance exactly 1."""
    z = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return (z - z.mean()) / z.std(correction=0)


def marginal_start(objective: Objective, ts: Tensor, z: Tensor) -> Tensor:
    """A start batch with the exact mean and variance of ``x_t`` at ``t = ts[0]``."""
    alpha, sigma = objective.alpha_sigma(ts[0].to(F64))
    return alpha * MU + torch.sqrt(alpha**2 * S**2 + sigma**2) * z


def ode_moment_errors(sampler: str, objective_name: str, schedule: str, steps: int) -> tuple[float, float]:
    """``(mean − MU, var − S²)`` of an ODE sampler's output under the exact Gaussian denoiser."""
    objective = get_objective(objective_name)
    ts = timesteps(steps, objective, schedule, dtype=F64)
    x0 = sample(sampler, gaussian_denoiser(objective), marginal_start(objective, ts, standardised_normal(N, seed=0)), ts, objective)
    return float(x0.mean()) - MU, float(x0.var(correction=0)) - S**2


def toy_network(x: Tensor, t: Tensor) -> Tensor:
    """A nonlinear stand-in for a network output in any parameterisation, ``(B, C, T)``."""
    tb = broadcast_t(t, x).to(x.dtype)
    return torch.tanh(x) * (1 + tb) - 0.3 * x + 0.1 * tb


# --------------------------------------------------------------------------- ODE samplers, Gaussian target

# Steps at which the ODE errors are compared. 16 is left out on purpose: on the linear grids the
# dpmpp_2m variance error changes sign between 16 and 32 steps, so its magnitude is not monotone there.
CONVERGENCE_STEPS = [4, 8, 32, 64, 128]
TOL_VAR_AT_64 = {"euler": 2.5e-2, "dpmpp_2m": 2e-3}  # measured at most 1.9e-2 and 1.5e-3 (S² = 0.25)


@pytest.mark.parametrize("objective_name", OBJECTIVES)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_ode_samplers_converge_to_the_data_distribution(sampler: str, objective_name: str, schedule: str) -> None:
    errors = {steps: ode_moment_errors(sampler, objective_name, schedule, steps) for steps in CONVERGENCE_STEPS}
    var_errors = [abs(errors[steps][1]) for steps in CONVERGENCE_STEPS]
    for steps, (mean_error, _) in errors.items():
        # Each step maps "mean alpha·MU" to "mean alpha_next·MU" exactly, so only rounding remains.
        assert abs(mean_error) < 1e-12, f"{steps} steps: mean error {mean_error:.3g}"
    assert all(a > b for a, b in pairwise(var_errors)), f"variance errors not decreasing: {var_errors}"
    assert var_errors[CONVERGENCE_STEPS.index(64)] < TOL_VAR_AT_64[sampler], f"variance error at 64 steps: {var_errors}"
    assert var_errors[0] > 1e-2, "4 steps should be visibly inaccurate; a test that cannot fail is a defect"


@pytest.mark.parametrize("objective_name", OBJECTIVES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_euler_is_first_order(objective_name: str, schedule: str) -> None:
    ratio = ode_moment_errors("euler", objective_name, schedule, 64)[1] / ode_moment_errors("euler", objective_name, schedule, 128)[1]
    assert 1.8 < ratio < 2.2, f"doubling the steps should halve the Euler error, got ratio {ratio:.3f}"


@pytest.mark.parametrize("objective_name", OBJECTIVES)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("steps", [4, 8, 16])
def test_dpmpp_2m_beats_euler_at_few_steps(objective_name: str, schedule: str, steps: int) -> None:
    euler = abs(ode_moment_errors("euler", objective_name, schedule, steps)[1])
    dpmpp = abs(ode_moment_errors("dpmpp_2m", objective_name, schedule, steps)[1])
    assert dpmpp < euler, f"{steps} steps: dpmpp_2m variance error {dpmpp:.3g} >= euler {euler:.3g}"


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_ode_samplers_depend_only_on_the_logsnr_grid(sampler: str) -> None:
    """DDIM and DPM-Solver++ live in lambda = log(alpha/sigma): on the same logsnr grid, with start
    batches that correspond (x_rf = (sigma_rf/sigma_v)·x_v), both objectives give the same samples."""
    z = standardised_normal(256, seed=1)
    outs = []
    for name in OBJECTIVES:
        objective = get_objective(name)
        ts = timesteps(12, objective, "logsnr", dtype=F64)
        outs.append(sample(sampler, gaussian_denoiser(objective), marginal_start(objective, ts, z), ts, objective))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- reference implementations


def reference_rf_euler(model: Denoiser, x: Tensor, ts: Tensor) -> Tensor:
    """stable-audio-tools' ``sample_discrete_euler``: ``x ← x + (t_next − t)·u``."""
    for t, t_next in pairwise(ts):
        x = x + (t_next - t) * model(x, t.expand(x.shape[0]))
    return x


def reference_rf_dpmpp(model: Denoiser, x: Tensor, ts: Tensor) -> Tensor:
    """stable-audio-tools' ``sample_flow_dpmpp`` (k-diffusion's DPM-Solver++(2M) for rectified flow)."""

    def log_snr(t: Tensor) -> Tensor:
        return ((1 - t) / t).log()

    old_denoised = None
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        denoised = x - t * model(x, t.expand(x.shape[0]))
        h = log_snr(t_next) - log_snr(t)
        if old_denoised is None or t_next == 0:
            x = (t_next / t) * x - (1 - t_next) * (-h).expm1() * denoised
        else:
            r = (log_snr(t) - log_snr(ts[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (t_next / t) * x - (1 - t_next) * (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def reference_v_ddim(model: Denoiser, x: Tensor, ts: Tensor) -> Tensor:
    """stable-audio-tools' v-diffusion ``sample`` with eta = 0 (returns the last ``pred``)."""
    alphas, sigmas = torch.cos(ts * math.pi / 2), torch.sin(ts * math.pi / 2)
    for i in range(len(ts) - 1):
        v = model(x, ts[i].expand(x.shape[0]))
        pred, eps = x * alphas[i] - v * sigmas[i], x * sigmas[i] + v * alphas[i]
        x = pred * alphas[i + 1] + eps * sigmas[i + 1]
    return x


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_samplers_match_stable_audio_tools_loops(schedule: str) -> None:
    x_T = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    rf, v = get_objective("rectified_flow"), get_objective("v")
    ts_rf, ts_v = timesteps(10, rf, schedule, dtype=F64), timesteps(10, v, schedule, dtype=F64)
    pairs = [
        (sample_euler(x0_denoiser(toy_network, rf), x_T, ts_rf, rf), reference_rf_euler(toy_network, x_T, ts_rf)),
        (sample_dpmpp_2m(x0_denoiser(toy_network, rf), x_T, ts_rf, rf), reference_rf_dpmpp(toy_network, x_T, ts_rf)),
        (sample_euler(x0_denoiser(toy_network, v), x_T, ts_v, v), reference_v_ddim(toy_network, x_T, ts_v)),
    ]
    for ours, reference in pairs:
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_step_functions_in_a_loop_equal_the_samplers(objective_name: str) -> None:
    """The per-step API a streaming engine uses reproduces the whole-grid samplers bit for bit."""
    objective = get_objective(objective_name)
    denoise = x0_denoiser(toy_network, objective)
    x_T = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3))
    ts = timesteps(6, objective)
    B = x_T.shape[0]

    x = x_T
    for i in range(len(ts) - 1):
        x = euler_step(x, denoise(x, ts[i].expand(B)), ts[i], ts[i + 1], objective)
    assert torch.equal(x, sample_euler(denoise, x_T, ts, objective))

    x, x0_prev, t_prev = x_T, None, None
    for i in range(len(ts) - 1):
        x0_hat = denoise(x, ts[i].expand(B))
        x = dpmpp_2m_step(x, x0_hat, ts[i].expand(B), ts[i + 1].expand(B), objective, x0_prev, t_prev)
        x0_prev, t_prev = x0_hat, ts[i].expand(B)
    assert torch.equal(x, sample_dpmpp_2m(denoise, x_T, ts, objective))

    generator = torch.Generator().manual_seed(4)
    x = x_T
    for i in range(len(ts) - 1):
        x0_hat = denoise(x, ts[i].expand(B))
        x = pingpong_step(x0_hat, ts[i + 1].expand(B), objective, torch.randn(x.shape, generator=generator))
    assert torch.equal(x, sample_pingpong(denoise, x_T, ts, objective, generator=torch.Generator().manual_seed(4)))


# --------------------------------------------------------------------------- ping-pong


def pingpong_output_moments(objective: Objective, ts: Tensor, mean: float, var: float) -> tuple[float, float]:
    """Exact mean and variance of ping-pong's output from ``x_T ~ N(mean, var)`` under the Gaussian denoiser.

    Per step ``x0_hat = MU + g·(x − alpha·MU)`` with ``g = alpha·S²/(alpha²·S² + sigma²)``, so
    ``x0_hat ~ N(MU + g·(mean − alpha·MU), g²·var)``; re-noising gives
    ``x_next ~ N(alpha_next·E[x0_hat], alpha_next²·Var[x0_hat] + sigma_next²)``. The output is the last
    ``x0_hat`` (``ts[-1] = 0``).
    """
    x0_mean, x0_var = mean, var
    for t, t_next in pairwise(ts.tolist()):
        alpha, sigma = (float(c) for c in objective.alpha_sigma(torch.tensor(t, dtype=F64)))
        alpha_next, sigma_next = (float(c) for c in objective.alpha_sigma(torch.tensor(t_next, dtype=F64)))
        gain = alpha * S**2 / (alpha**2 * S**2 + sigma**2)
        x0_mean, x0_var = MU + gain * (mean - alpha * MU), gain**2 * var
        mean, var = alpha_next * x0_mean, alpha_next**2 * x0_var + sigma_next**2
    return x0_mean, x0_var


@pytest.mark.parametrize("objective_name", OBJECTIVES)
@pytest.mark.parametrize(("schedule", "steps"), [("linear", 8), ("linear", 3), ("logsnr", 8)])
def test_pingpong_output_matches_its_closed_form(objective_name: str, schedule: str, steps: int) -> None:
    """Ping-pong returns a posterior mean, so its samples are narrower than the data: its exact output
    law (propagated analytically through ``ts``) is matched within 5 standard errors."""
    objective = get_objective(objective_name)
    ts = timesteps(steps, objective, schedule, dtype=F64)
    n = 200_000
    x_T = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=F64)  # pure noise, as in use
    out = sample_pingpong(gaussian_denoiser(objective), x_T, ts, objective, generator=torch.Generator().manual_seed(6))

    mean, var = pingpong_output_moments(objective, ts, mean=0.0, var=1.0)
    emp_mean, emp_var = float(out.mean()), float(out.var())
    assert abs(emp_mean - mean) < 5 * math.sqrt(var / n), (emp_mean, mean)
    assert abs(emp_var - var) < 5 * var * math.sqrt(2 / n), (emp_var, var)
    assert var < 0.95 * S**2 and emp_var < S**2, f"ping-pong should shrink the variance below S² = {S**2}: {var}, {emp_var}"
    # The tolerance is tight enough to tell ping-pong's law from the data distribution.
    assert abs(var - S**2) > 10 * S**2 * math.sqrt(2 / n)


@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_pingpong_with_one_step_is_the_x0_prediction(objective_name: str) -> None:
    objective = get_objective(objective_name)
    denoise = x0_denoiser(toy_network, objective)
    x_T = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(7))
    ts = timesteps(1, objective, "linear")
    assert ts.tolist() == [1.0, 0.0]
    out = sample_pingpong(denoise, x_T, ts, objective, generator=torch.Generator().manual_seed(8))
    assert torch.equal(out, denoise(x_T, torch.ones(4)))


# --------------------------------------------------------------------------- sampler plumbing


def test_samplers_never_read_tensors_back_to_the_host() -> None:
    """On the meta device any ``.item()``, ``bool(tensor)`` or ``tolist()`` raises."""
    for name in OBJECTIVES:
        objective = get_objective(name)
        ts = timesteps(5, objective, device="meta")
        x_T = torch.empty(2, 3, 4, device="meta")
        for sampler in SAMPLERS:
            out = sample(sampler, x0_denoiser(toy_network, objective), x_T, ts, objective)
            assert out.shape == x_T.shape and out.device.type == "meta"


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_samplers_keep_the_input_dtype(sampler: str) -> None:
    objective = get_objective("rectified_flow")
    x_T = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    out = sample(sampler, x0_denoiser(toy_network, objective), x_T, timesteps(4, objective), objective)
    assert out.dtype == torch.bfloat16 and out.shape == x_T.shape


def test_sampler_argument_errors() -> None:
    objective = get_objective("v")
    x_T, ts = torch.zeros(2, 3), timesteps(4, objective)
    denoise = gaussian_denoiser(objective)
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        sample("heun", denoise, x_T, ts, objective)
    with pytest.raises(ValueError, match="1-D with at least 2 entries"):
        sample_euler(denoise, x_T, ts[:1], objective)
    with pytest.raises(ValueError, match="1-D with at least 2 entries"):
        sample_euler(denoise, x_T, ts[None], objective)
    with pytest.raises(ValueError, match="ts is on meta"):
        sample_euler(denoise, x_T, ts.to("meta"), objective)
    with pytest.raises(ValueError, match="together"):
        dpmpp_2m_step(x_T, x_T, ts[1], ts[2], objective, x0_prev=x_T)


def test_cfg_combine() -> None:
    generator = torch.Generator().manual_seed(10)
    cond, uncond = torch.randn(3, 2, 5, generator=generator), torch.randn(3, 2, 5, generator=generator)
    assert torch.equal(cfg_combine(cond, uncond, 1.0), cond)
    assert torch.equal(cfg_combine(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(cfg_combine(cond, uncond, 3.5), uncond + 3.5 * (cond - uncond))
    scale = torch.tensor([0.0, 1.0, 2.0]).reshape(3, 1, 1)
    per_sample = cfg_combine(cond, uncond, scale)
    assert torch.equal(per_sample[0], uncond[0]) and torch.equal(per_sample[1], cond[1])
    torch.testing.assert_close(per_sample[2], 2 * cond[2] - uncond[2])


# --------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_objective_conversions_round_trip(objective_name: str) -> None:
    objective = get_objective(objective_name)
    generator = torch.Generator().manual_seed(11)
    x0, eps = torch.randn(64, 2, 7, generator=generator, dtype=F64), torch.randn(64, 2, 7, generator=generator, dtype=F64)
    t = torch.rand(64, generator=generator, dtype=F64).clamp(1e-3, 1 - 1e-3)
    x_t, out = objective.noise(x0, eps, t), objective.target(x0, eps, t)
    torch.testing.assert_close(objective.x0_from_output(x_t, out, t), x0, rtol=0, atol=1e-13)
    torch.testing.assert_close(objective.eps_from_output(x_t, out, t), eps, rtol=0, atol=1e-13)
    alpha, sigma = objective.alpha_sigma(t)
    torch.testing.assert_close(x_t, alpha[:, None, None] * x0 + sigma[:, None, None] * eps, rtol=0, atol=1e-14)
    # A 0-d t is shared by the batch.
    t0 = torch.tensor(0.3, dtype=F64)
    assert torch.equal(objective.noise(x0, eps, t0), objective.noise(x0, eps, t0.expand(64)))


def test_objective_targets_are_the_documented_parameterisations() -> None:
    generator = torch.Generator().manual_seed(12)
    x0, eps, t = torch.randn(5, 3, generator=generator, dtype=F64), torch.randn(5, 3, generator=generator, dtype=F64), torch.tensor(0.4)
    torch.testing.assert_close(get_objective("rectified_flow").target(x0, eps, t), eps - x0)
    torch.testing.assert_close(get_objective("rectified_flow").noise(x0, eps, t), 0.6 * x0 + 0.4 * eps)
    alpha, sigma = math.cos(0.2 * math.pi), math.sin(0.2 * math.pi)
    torch.testing.assert_close(get_objective("v").target(x0, eps, t), alpha * eps - sigma * x0)
    torch.testing.assert_close(get_objective("v").noise(x0, eps, t), alpha * x0 + sigma * eps)


@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_objective_conversions_compute_in_float64(objective_name: str) -> None:
    """float32 in, float32 out, equal to the float64 computation rounded once (naive float32 is not)."""
    objective = get_objective(objective_name)
    generator = torch.Generator().manual_seed(13)
    x, y = torch.randn(4096, 8, generator=generator), torch.randn(4096, 8, generator=generator)
    t = torch.rand(4096, generator=generator)
    conversions = [objective.noise, objective.target, objective.x0_from_output, objective.eps_from_output]
    for convert in conversions:
        ours = convert(x, y, t)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, convert(x.double(), y.double(), t.double()).float()), convert.__name__
    alpha, sigma = (c[:, None] for c in objective.alpha_sigma(t))
    naive = alpha * x + sigma * y  # float32 arithmetic rounds twice
    assert not torch.equal(naive, objective.noise(x, y, t))
    lam = 40 * t - 20
    scalar_maps = [
        (objective.logsnr, t),
        (objective.t_from_logsnr, lam),
        (lambda u: objective.alpha_sigma(u)[0], t),
        (lambda u: objective.alpha_sigma(u)[1], t),
    ]
    for convert_t, u in scalar_maps:
        assert convert_t(u).dtype == torch.float32
        assert torch.equal(convert_t(u), convert_t(u.double()).float())


@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_logsnr_and_its_inverse(objective_name: str) -> None:
    objective = get_objective(objective_name)
    t = torch.linspace(1e-3, 1 - 1e-3, 999, dtype=F64)
    alpha, sigma = objective.alpha_sigma(t)
    torch.testing.assert_close(objective.logsnr(t), 2 * torch.log(alpha / sigma), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(objective.t_from_logsnr(objective.logsnr(t)), t, rtol=0, atol=1e-14)
    lam = torch.linspace(-30, 30, 601, dtype=F64)
    torch.testing.assert_close(objective.logsnr(objective.t_from_logsnr(lam)), lam, rtol=0, atol=1e-9)
    assert objective.logsnr(torch.tensor(0.0, dtype=F64)) == math.inf
    assert float(objective.t_from_logsnr(torch.tensor(math.inf, dtype=F64))) == 0.0
    assert float(objective.t_from_logsnr(torch.tensor(-math.inf, dtype=F64))) == 1.0


def test_objective_errors() -> None:
    with pytest.raises(ValueError, match="unknown objective 'eps'"):
        get_objective("eps")
    with pytest.raises(ValueError, match=r"t must be 0-d or \(B,\)"):
        get_objective("v").noise(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(3))


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("objective_name", OBJECTIVES)
def test_linear_schedule(objective_name: str) -> None:
    objective = get_objective(objective_name)
    ts = timesteps(8, objective, "linear", dtype=F64)
    torch.testing.assert_close(ts, torch.linspace(1, 0, 9, dtype=F64), rtol=0, atol=0)
    ts = timesteps(5, objective, "linear", t_max=0.9, t_min=0.1, dtype=F64)
    assert ts.shape == (6,) and ts[0] == 0.9 and ts[-2] == 0.1 and ts[-1] == 0.0
    assert bool((ts.diff() < 0).all())


@pytest.mark.parametrize("objective_name", OBJECTIVES)
@pytest.mark.parametrize("steps", [1, 2, 8, 50])
def test_logsnr_schedule_is_uniform_in_logsnr(objective_name: str, steps: int) -> None:
    objective = get_objective(objective_name)
    ts = timesteps(steps, objective, dtype=F64)
    assert ts.shape == (steps + 1,) and ts.dtype == F64 and ts[-1] == 0.0
    assert bool((ts.diff() < 0).all())
    lam = objective.logsnr(ts[:-1])
    # t_max = 1 has logsnr below -10, so the grid starts at logsnr_min; it ends at logsnr_max.
    torch.testing.assert_close(lam[0], torch.tensor(-10.0, dtype=F64), rtol=0, atol=1e-12)
    if steps > 1:
        torch.testing.assert_close(lam[-1], torch.tensor(10.0, dtype=F64), rtol=0, atol=1e-12)
        torch.testing.assert_close(lam.diff(), torch.full((steps - 1,), 20 / (steps - 1), dtype=F64), rtol=0, atol=1e-10)


def test_logsnr_schedule_bounds() -> None:
    objective = get_objective("rectified_flow")
    ts = timesteps(6, objective, t_max=0.8, t_min=0.05, dtype=F64)  # logsnr(0.8) = -2.77 > -10, logsnr(0.05) = 5.89 < 10
    assert float(ts[0]) == pytest.approx(0.8, abs=1e-15) and float(ts[-2]) == pytest.approx(0.05, abs=1e-15)
    ts = timesteps(4, objective, device="meta")
    assert ts.device.type == "meta" and ts.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"steps": 2.0}, "steps must be an int >= 1"),
        ({"schedule": "karras"}, "unknown schedule 'karras'"),
        ({"t_max": 0.0}, r"t_max must be in \(0, 1\]"),
        ({"t_max": 1.5}, r"t_max must be in \(0, 1\]"),
        ({"t_min": 1.0}, r"t_min must be in \[0, t_max\)"),
        ({"logsnr_min": 5.0, "logsnr_max": 5.0}, "logsnr_min must be < logsnr_max"),
        ({"t_max": 1e-3}, "empty logsnr range"),
    ],
)
def test_schedule_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"steps": 4, "objective": get_objective("rectified_flow"), **kwargs}
    with pytest.raises(ValueError, match=message):
        timesteps(**args)  # type: ignore[arg-type]
