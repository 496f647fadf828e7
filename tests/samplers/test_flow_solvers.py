"""DPM++ 2M, UniPC, DPM++ SDE and 2M SDE in flow form (`ldm_cli.samplers.flow_solvers`).

Parity: diffusers' flow-prediction DPMSolverMultistep and UniPCMultistep schedulers step by step
on a seeded toy velocity model, over SD3's and FLUX's schedules. Analytics: a point mass (every
step exact), Gaussian data (the ODE endpoint and the order of convergence; the SDEs' moments).
"""

import math

import pytest
import torch

from ldm_cli.samplers import SAMPLERS
from ldm_cli.samplers.flow import (
    FLOW_SAMPLERS,
    dynamic_shift_sigmas,
    flux_mu,
    static_shift_sigmas,
)
from ldm_cli.samplers.flow_solvers import (
    sample_dpmpp_2m_flow,
    sample_dpmpp_2m_sde_flow,
    sample_dpmpp_sde_flow,
    sample_unipc_flow,
)

F64 = torch.float64
STEPS = [4, 10, 28]
DETERMINISTIC = {"dpmpp_2m": sample_dpmpp_2m_flow, "unipc": sample_unipc_flow}
STOCHASTIC = {"dpmpp_2m_sde": sample_dpmpp_2m_sde_flow, "dpmpp_sde": sample_dpmpp_sde_flow}


def schedule(name: str, steps: int) -> torch.Tensor:
    """The pipeline's sigmas (float32, 1 down to 0): SD3's shift 3 or FLUX dev at 1024x1024."""
    if name == "sd3":
        return static_shift_sigmas(steps, 3.0)
    return dynamic_shift_sigmas(steps, flux_mu(4096))


# -- a seeded toy flow model: a small tanh MLP velocity with a time-dependent bias, float64 --

_g = torch.Generator().manual_seed(0)
_W1 = torch.randn(16, 32, generator=_g, dtype=F64) / 4
_W2 = torch.randn(32, 16, generator=_g, dtype=F64) / 6
_U = torch.randn(32, generator=_g, dtype=F64)
_C = torch.randn(16, generator=_g, dtype=F64)


def velocity(x, sigma):
    t = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1)
    flat = x.reshape(x.shape[0], -1)
    v = torch.tanh(flat @ _W1 + t * _U) @ _W2 + 0.5 * flat + torch.cos(3 * t) * _C
    return v.reshape(x.shape)


def toy_denoiser(x, sigma):
    """What the flow pipeline hands the samplers: x0 = x - sigma * v."""
    return x - sigma.to(x.dtype).reshape(-1, 1, 1, 1) * velocity(x, sigma)


def start(seed=1):
    return torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def run_diffusers(scheduler, x):
    """The diffusers loop: the velocity at the scheduler's own sigma, x after every step."""
    scheduler.set_begin_index(0)
    trajectory = []
    for i, t in enumerate(scheduler.timesteps):
        v = velocity(x, scheduler.sigmas[i].expand(x.shape[0]))
        x = scheduler.step(v, t, x).prev_sample
        trajectory.append(x)
    return trajectory


def run_ours(fn, sigmas, x, **options):
    trajectory = []
    fn(toy_denoiser, x, sigmas, callback=lambda i, x_i, x0: trajectory.append(x_i), **options)
    return trajectory


def max_step_diff(expected, got):
    assert len(expected) == len(got)
    return max((a - b).abs().max().item() for a, b in zip(expected, got, strict=True))


def dpm_scheduler(diffusers, **config):
    return diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        algorithm_type="dpmsolver++",
        solver_order=2,
        **config,
    )


def unipc_scheduler(diffusers, **config):
    return diffusers.UniPCMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", **config
    )


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("steps", STEPS)
def test_dpmpp_2m_follows_diffusers_from_sigma_one(name, steps):
    """DPMSolverMultistep's set_timesteps takes no sigmas: the pipeline's (from exactly 1, where
    diffusers' own IEEE inf arithmetic gives the limit) replace its own after set_timesteps."""
    diffusers = pytest.importorskip("diffusers")
    sigmas = schedule(name, steps)
    assert sigmas[0].item() == 1.0
    ref = dpm_scheduler(diffusers)
    ref.set_timesteps(steps)
    ref.sigmas = sigmas.clone()
    expected = run_diffusers(ref, start())
    # diffusers rounds the sample to float32 inside step(): ~1e-7 of the latents' scale
    assert max_step_diff(expected, run_ours(sample_dpmpp_2m_flow, sigmas, start())) <= 1e-5


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", STEPS)
def test_dpmpp_2m_follows_diffusers_own_flow_sigmas(shift, steps):
    diffusers = pytest.importorskip("diffusers")
    ref = dpm_scheduler(diffusers, flow_shift=shift)
    ref.set_timesteps(steps)
    sigmas = ref.sigmas.clone()
    assert sigmas[0].item() < 1 and sigmas[-1].item() == 0
    expected = run_diffusers(ref, start())
    assert max_step_diff(expected, run_ours(sample_dpmpp_2m_flow, sigmas, start())) <= 1e-5


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("steps", STEPS)
def test_unipc_follows_diffusers_with_its_first_sigma_nudge(name, steps):
    """diffusers gets the pipeline's sigmas through set_timesteps(sigmas=...) and moves the
    first down by 1e-6; ours gets them as they are (from 1.0) and must do the same."""
    diffusers = pytest.importorskip("diffusers")
    sigmas = schedule(name, steps)
    ref = unipc_scheduler(diffusers)
    ref.set_timesteps(sigmas=sigmas[:-1].numpy())
    assert torch.equal(ref.sigmas[1:], sigmas[1:])
    assert ref.sigmas[0].item() == float(torch.tensor(1 - 1e-6))  # in float32
    expected = run_diffusers(ref, start())
    got = run_ours(sample_unipc_flow, sigmas, start())
    assert max_step_diff(expected, got) <= 1e-5
    # with float64 sigmas diffusers' scalar maths is float64 too: agreement to rounding
    ref = unipc_scheduler(diffusers)
    ref.set_timesteps(sigmas=sigmas[:-1].numpy())
    ref.sigmas = ref.sigmas.to(F64)
    assert max_step_diff(run_diffusers(ref, start()), got) <= 1e-12


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", STEPS)
def test_unipc_follows_diffusers_own_flow_sigmas(shift, steps):
    diffusers = pytest.importorskip("diffusers")
    ref = unipc_scheduler(diffusers, flow_shift=shift)
    ref.set_timesteps(steps)
    expected = run_diffusers(ref, start())
    got = run_ours(sample_unipc_flow, ref.sigmas.clone(), start())
    assert max_step_diff(expected, got) <= 1e-5


def test_the_flow_table_serves_the_solvers_under_their_sampler_names():
    for name, fn in {**DETERMINISTIC, **STOCHASTIC}.items():
        assert FLOW_SAMPLERS[name] is fn
        assert SAMPLERS[name].stochastic == (name in STOCHASTIC)


# -- analytic targets --

X0_STAR = torch.tensor([0.8, -1.3, 0.25, 2.0], dtype=F64).reshape(1, 4, 1, 1)


def point_mass(x, sigma):
    return X0_STAR.expand_as(x).clone()


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
@pytest.mark.parametrize("sigmas", [schedule("sd3", 10), schedule("flux", 7)], ids=["sd3", "flux"])
def test_ode_solvers_follow_a_point_mass_exactly(name, sigmas):
    """Data x0*: the flow ODE moves x along (x - x0*) / sigma = const, and every step of an
    exponential integrator is exact on it; the run lands on x0* from any start."""
    x = 3 * torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    directions = []

    def record(i, x_i, x0):
        sigma_next = sigmas[i + 1].item()
        if sigma_next > 0:
            directions.append((x_i - X0_STAR) / sigma_next)

    out = DETERMINISTIC[name](point_mass, x, sigmas, callback=record)
    assert (out - X0_STAR).abs().max().item() <= 1e-6
    for d in directions[1:]:
        assert (d - directions[0]).abs().max().item() <= 1e-6 * directions[0].abs().max().item()


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_sdes_keep_a_point_mass_marginal_at_every_step(name):
    """Data x0*: after every step (x - (1 - sigma) x0*) / sigma is a standard normal, and the
    run lands on x0* exactly."""
    sigmas = schedule("flux", 8)
    count = 20000
    x = torch.randn(count, 4, 1, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    noises = []

    def record(i, x_i, x0):
        sigma_next = sigmas[i + 1].item()
        if sigma_next > 0:
            noises.append((x_i - (1 - sigma_next) * X0_STAR) / sigma_next)

    gen = torch.Generator().manual_seed(3)
    out = STOCHASTIC[name](point_mass, x, sigmas, generator=gen, callback=record)
    assert (out - X0_STAR).abs().max().item() <= 1e-6
    se_mean, se_std = 1 / math.sqrt(4 * count), 1 / math.sqrt(8 * count)
    for noise in noises:
        assert abs(noise.mean().item()) < 5 * se_mean
        assert abs(noise.std().item() - 1) < 5 * se_std
    first_step_noise = (x - (1 - sigmas[0].item()) * X0_STAR) / sigmas[0].item()
    correlation = (noises[-1] * first_step_noise).mean().item()
    assert correlation < 0.9  # eta = 1 draws fresh noise: the sample does not stay on its ray


MU, S = 0.7, 0.3  # Gaussian data N(MU, S^2) in every coordinate


def gaussian_denoiser(x, sigma, mu=MU, s=S):
    """E[x0 | x_t] for x0 ~ N(mu, s^2), x_t = (1 - t) x0 + t n."""
    t = sigma.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
    a = 1 - t
    return mu + a * s**2 / (a**2 * s**2 + t**2) * (x - a * mu)


def gaussian_ode_solution(x, sigma_from, sigma_to):
    """The flow ODE for Gaussian data keeps x's standard score: x_t = m_t + std_t z."""

    def std(t):
        return math.sqrt((1 - t) ** 2 * S**2 + t**2)

    z = (x - (1 - sigma_from) * MU) / std(sigma_from)
    return (1 - sigma_to) * MU + std(sigma_to) * z


def lambda_uniform_sigmas(steps, lam_from=-3.0, lam_to=3.0):
    """Flow sigmas at equal half log-SNR steps, sigma = sigmoid(-lambda): 0.953 to 0.047."""
    return torch.sigmoid(-torch.linspace(lam_from, lam_to, steps + 1, dtype=F64))


ODE_FORMS = {
    "dpmpp_2m": sample_dpmpp_2m_flow,
    "unipc": sample_unipc_flow,
    # eta = 0: the deterministic two-stage DPM-Solver++(2S)
    "dpmpp_sde_eta0": lambda *args, **kw: sample_dpmpp_sde_flow(*args, eta=0.0, **kw),
}


@pytest.mark.parametrize("name", sorted(ODE_FORMS))
def test_ode_solvers_converge_with_second_order_on_gaussian_data(name):
    """Error against the exact ODE solution, doubling the steps: ratio ~4. (UniPC's corrector
    is third order, but the first-order last step, diffusers' lower_order_final, leaves the run
    second order; its third-order part fades only after ~100 steps on this range.)"""
    x = torch.randn(16, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    errors = []
    for steps in (128, 256, 512):
        sigmas = lambda_uniform_sigmas(steps)
        out = ODE_FORMS[name](gaussian_denoiser, x.clone(), sigmas)
        exact = gaussian_ode_solution(x, sigmas[0].item(), sigmas[-1].item())
        errors.append((out - exact).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert 3.5 < errors[1] / errors[2] < 4.5


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_ode_solvers_reach_the_gaussian_endpoint_on_the_pipeline_schedule(name):
    """From sigma 1 to 0 on FLUX's schedule, as the pipeline runs them. Steps equal in t are
    long in lambda at both ends, where error terms of either sign meet: the error is not
    monotone in the steps (measured at 28/56/112/224 steps: 2M 4.0e-2, 2.2e-3, 5.2e-3, 2.4e-3;
    UniPC 3.8e-2, 1.2e-4, 2.4e-3, 8.9e-4; Heun 4.2e-2 ... 7.0e-4), but it does shrink."""
    x = torch.randn(16, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    first = float(torch.tensor(1 - 1e-6)) if name == "unipc" else 1.0  # UniPC's nudge
    errors = []
    for steps in (28, 224):
        out = DETERMINISTIC[name](gaussian_denoiser, x.clone(), schedule("flux", steps))
        errors.append((out - gaussian_ode_solution(x, first, 0.0)).abs().max().item())
    assert errors[0] < 0.05
    assert errors[1] < 0.004


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_sdes_sample_gaussian_data_with_its_mean_and_std(name):
    count, s = 20000, 0.5
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(count, 1, generator=gen, dtype=F64)
    sigmas = dynamic_shift_sigmas(100, None)  # FLUX schnell's linspace: last sigma 1/100

    def denoiser(x, sigma):
        return gaussian_denoiser(x, sigma, s=s)

    out = STOCHASTIC[name](denoiser, x, sigmas, generator=gen)
    assert abs(out.mean().item() - MU) < 5 * s / math.sqrt(count)
    assert abs(out.std().item() - s) < 5 * s / math.sqrt(2 * count)


# -- the SDE samplers' options and noise --


def test_dpmpp_2m_sde_without_noise_is_dpmpp_2m():
    """eta = 0 removes the noise and the extra decay: the 2M step (sigmas below 1, so neither
    sampler moves the first)."""
    sigmas = lambda_uniform_sigmas(12, -2.0, 4.0)
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=F64)])
    ours = run_ours(sample_dpmpp_2m_sde_flow, sigmas, start(), eta=0.0)
    assert max_step_diff(run_ours(sample_dpmpp_2m_flow, sigmas, start()), ours) <= 1e-12


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_sdes_need_a_generator_and_draw_per_image_noise(name):
    fn = STOCHASTIC[name]
    sigmas = schedule("sd3", 6)
    with pytest.raises(ValueError, match="Generator"):
        fn(toy_denoiser, start(), sigmas)
    x = start()
    gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    batch = fn(toy_denoiser, x, sigmas, generator=gens)
    for row in range(2):
        gen = torch.Generator().manual_seed(10 + row)
        alone = fn(toy_denoiser, x[row : row + 1], sigmas, generator=gen)
        assert torch.allclose(batch[row : row + 1], alone, rtol=0, atol=1e-12)
    other = fn(toy_denoiser, x, sigmas, generator=torch.Generator().manual_seed(12))
    assert (other - batch).abs().max().item() > 1e-3  # the noise matters
