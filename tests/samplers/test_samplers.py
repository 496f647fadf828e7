import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_cli.core.config import ScheduleConfig
from ldm_cli.samplers import SAMPLERS
from ldm_cli.samplers.schedules import (
    SPACINGS,
    Denoiser,
    DiscreteSchedule,
    get_sigmas,
    get_timesteps,
    init_noise_sigma,
    to_vp_latent,
)

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 6, 6)
DETERMINISTIC = ["euler", "heun", "dpm2", "lms", "ddim", "dpmpp_2m", "unipc"]
STOCHASTIC = ["euler_a", "ddpm", "dpmpp_2m_sde", "dpmpp_sde", "lcm", "tcd"]


@pytest.fixture(scope="module")
def schedule():
    return DiscreteSchedule(ScheduleConfig())


def eps_unet(z, t):
    """A smooth, t-dependent stand-in for an eps-predicting U-Net in diffusers' (z, t) space."""
    t = torch.as_tensor(t, dtype=z.dtype).reshape(-1, *([1] * (z.ndim - 1)))
    return 0.7 * z + 0.3 * torch.tanh(z.roll(1, dims=1)) * torch.cos(t / 170.0)


def noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_diffusers(scheduler, latents, generator=None):
    """The diffusers pipeline loop with eps_unet; returns the latents after every step."""
    trajectory = []
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t)
        eps = eps_unet(model_in, t.expand(latents.shape[0]))
        extra = {} if generator is None else {"generator": generator}
        latents = scheduler.step(eps, t, latents, **extra).prev_sample
        trajectory.append(latents)
    return trajectory


def run_ours(name, denoiser, x, sigmas, generator=None, vp_space=False, **options):
    """Our sampler; the trajectory is mapped into the space diffusers keeps its latents in."""
    trajectory = []

    def record(i, x_next, x0):
        sigma = sigmas[i + 1]
        trajectory.append(to_vp_latent(x_next, sigma) if vp_space else x_next)

    SAMPLERS[name].fn(denoiser, x, sigmas, generator=generator, callback=record, **options)
    return trajectory


def assert_same_trajectory(ours, ref, tol=1e-5):
    assert len(ours) == len(ref)
    worst = 0.0
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        err = ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()
        worst = max(worst, err)
        assert err <= tol, f"step {step}: relative error {err:.2e}"
    return worst


@pytest.mark.parametrize("spacing", ["normal", "karras"])
def test_euler_follows_diffusers_euler_discrete(schedule, spacing):
    diffusers = pytest.importorskip("diffusers")

    ref = diffusers.EulerDiscreteScheduler(
        **SD_BETAS, timestep_spacing="linspace", use_karras_sigmas=spacing == "karras"
    )
    ref.set_timesteps(20)
    sigmas = get_sigmas(schedule, 20, spacing)
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=1e-6, atol=0)
    pinned = (sigmas[:-1], get_timesteps(schedule, 20, spacing))
    denoiser = Denoiser(eps_unet, schedule, "eps", pinned_timesteps=pinned)
    x = noise() * init_noise_sigma(sigmas[0].item(), spacing)
    expected = run_diffusers(ref, noise() * ref.init_noise_sigma)
    assert_same_trajectory(run_ours("euler", denoiser, x, sigmas), expected)


def test_euler_a_follows_diffusers_with_the_same_noise(schedule):
    diffusers = pytest.importorskip("diffusers")

    ref = diffusers.EulerAncestralDiscreteScheduler(**SD_BETAS, timestep_spacing="linspace")
    ref.set_timesteps(15)
    sigmas = get_sigmas(schedule, 15, "normal")
    pinned = (sigmas[:-1], get_timesteps(schedule, 15, "normal"))
    denoiser = Denoiser(eps_unet, schedule, "eps", pinned_timesteps=pinned)
    expected = run_diffusers(ref, noise() * ref.init_noise_sigma, torch.Generator().manual_seed(7))
    ours = run_ours(
        "euler_a", denoiser, noise() * sigmas[0], sigmas, torch.Generator().manual_seed(7)
    )
    assert_same_trajectory(ours, expected)


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_follows_diffusers_ddim(schedule, steps):
    diffusers = pytest.importorskip("diffusers")

    ref = diffusers.DDIMScheduler(
        **SD_BETAS, steps_offset=1, set_alpha_to_one=False, clip_sample=False
    )
    ref.set_timesteps(steps)
    info = SAMPLERS["ddim"]
    sigmas = get_sigmas(schedule, steps, info.default_spacing, final=info.default_final)
    # no pinning: DDIM's integer timesteps are table entries, where sigma_to_t is exact
    denoiser = Denoiser(eps_unet, schedule, "eps")
    x = noise() * init_noise_sigma(sigmas[0].item(), info.default_spacing)
    ours = run_ours("ddim", denoiser, x, sigmas, vp_space=True)
    assert_same_trajectory(ours, run_diffusers(ref, noise()))


def test_ddpm_follows_diffusers_ddpm_with_the_same_noise(schedule):
    diffusers = pytest.importorskip("diffusers")

    ref = diffusers.DDPMScheduler(
        **SD_BETAS, steps_offset=1, clip_sample=False, timestep_spacing="leading"
    )
    ref.set_timesteps(25)
    sigmas = get_sigmas(schedule, 25, SAMPLERS["ddpm"].default_spacing)
    denoiser = Denoiser(eps_unet, schedule, "eps")
    x = noise() * init_noise_sigma(sigmas[0].item(), "leading")
    ours = run_ours("ddpm", denoiser, x, sigmas, torch.Generator().manual_seed(3), vp_space=True)
    expected = run_diffusers(ref, noise(), torch.Generator().manual_seed(3))
    assert_same_trajectory(ours, expected)


@pytest.mark.parametrize(
    ("name", "scheduler", "order", "config"),
    [
        ("dpmpp_2m", "DPMSolverMultistepScheduler", 2, dict(algorithm_type="dpmsolver++")),
        ("unipc", "UniPCMultistepScheduler", 2, dict(solver_type="bh2", predict_x0=True)),
        ("unipc", "UniPCMultistepScheduler", 3, dict(solver_type="bh2", predict_x0=True)),
    ],
)
@pytest.mark.parametrize("steps", [8, 20])
def test_multistep_follows_diffusers(schedule, name, scheduler, order, config, steps):
    diffusers = pytest.importorskip("diffusers")

    ref = getattr(diffusers, scheduler)(**SD_BETAS, solver_order=order, **config)
    ref.set_timesteps(steps)
    # these schedulers space their own integer timesteps; run ours on exactly their sigmas
    sigmas = ref.sigmas.clone()
    torch.testing.assert_close(schedule.sigma_to_t(sigmas[:-1]), ref.timesteps.float())
    denoiser = Denoiser(eps_unet, schedule, "eps")
    # diffusers starts these from pure noise in z, which is sqrt(sigma^2 + 1) in sigma space
    assert ref.init_noise_sigma == 1.0
    x = noise() * (sigmas[0] ** 2 + 1) ** 0.5
    ours = run_ours(name, denoiser, x, sigmas, vp_space=True, order=order)
    expected = run_diffusers(ref, noise())
    assert_same_trajectory(ours, expected)


@pytest.mark.parametrize(
    ("name", "scheduler"),
    [
        ("lms", "LMSDiscreteScheduler"),
        ("heun", "HeunDiscreteScheduler"),
        ("dpm2", "KDPM2DiscreteScheduler"),
    ],
)
def test_k_samplers_end_where_diffusers_ends(schedule, name, scheduler):
    diffusers = pytest.importorskip("diffusers")

    ref = getattr(diffusers, scheduler)(**SD_BETAS, timestep_spacing="linspace")
    ref.set_timesteps(12)
    expected = run_diffusers(ref, noise() * ref.init_noise_sigma)[-1]
    sigmas = get_sigmas(schedule, 12, "normal")
    pinned = (sigmas[:-1], get_timesteps(schedule, 12, "normal"))
    denoiser = Denoiser(eps_unet, schedule, "eps", pinned_timesteps=pinned)
    out = SAMPLERS[name].fn(denoiser, noise() * sigmas[0], sigmas)
    assert_same_trajectory([out], [expected])


# lcm keeps c_skip of the sample and tcd stops at sigma_min, by design (see test_few_step)
@pytest.mark.parametrize("name", [n for n in SAMPLERS if n not in ("lcm", "tcd")])
@pytest.mark.parametrize("spacing", ["karras", "normal"])
def test_point_mass_lands_exactly_on_x0(schedule, name, spacing):
    target = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    sigmas = get_sigmas(schedule, 12, spacing)
    x = noise() * sigmas[0]
    out = SAMPLERS[name].fn(
        lambda x, sigma: target, x, sigmas, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out, target, rtol=1e-6, atol=1e-6)


# Gaussian data N(mu, s^2): the exact denoiser and probability-flow ODE solution are known.
GAUSS_MU = torch.linspace(-1, 1, 32, dtype=torch.float64)
GAUSS_S = torch.linspace(0.5, 1.5, 32, dtype=torch.float64)
SIGMA_MAX, SIGMA_MIN = 14.6146, 0.0292


def gaussian_denoiser(x, sigma):
    sigma = sigma.reshape(-1, 1)
    return GAUSS_MU + GAUSS_S**2 / (GAUSS_S**2 + sigma**2) * (x - GAUSS_MU)


def ode_solution(x_start, sigma_start, sigma_end):
    ratio = (GAUSS_S**2 + sigma_end**2) / (GAUSS_S**2 + sigma_start**2)
    return GAUSS_MU + (x_start - GAUSS_MU) * ratio.sqrt()


def convergence_slope(name, grid, **options):
    x_start = (
        GAUSS_MU + torch.randn(2, 32, generator=torch.Generator().manual_seed(0)).double() * 15
    )
    errors, counts = [], [16, 32, 64, 128]
    for n in counts:
        if grid == "log":
            sigmas = torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), n + 1).double().exp()
        else:  # karras, stopping at sigma_min so the error is the solver's alone
            ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)
            lo, hi = SIGMA_MIN ** (1 / 7), SIGMA_MAX ** (1 / 7)
            sigmas = (hi + ramp * (lo - hi)) ** 7
        out = SAMPLERS[name].fn(gaussian_denoiser, x_start.clone(), sigmas, **options)
        exact = ode_solution(x_start, sigmas[0].item(), sigmas[-1].item())
        errors.append((out - exact).abs().max().item())
    slope = -np.polyfit(np.log(counts), np.log(errors), 1)[0]
    return slope, errors


EXPECTED_ORDER = {
    "euler": (0.8, 1.3),
    "ddim": (0.8, 1.3),
    "heun": (1.7, 2.4),
    "dpm2": (1.7, 2.4),
    "dpmpp_2m": (1.7, 2.4),
    "lms": (2.5, 4.5),
    "unipc": (2.5, 3.6),
}


@pytest.mark.parametrize("grid", ["log", "karras"])
@pytest.mark.parametrize("name", list(EXPECTED_ORDER))
def test_convergence_order_on_gaussian_data(name, grid):
    low, high = EXPECTED_ORDER[name]
    slope, errors = convergence_slope(name, grid)
    assert low <= slope <= high, f"{name} on {grid}: slope {slope:.2f}, errors {errors}"


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_sde"])
def test_sde_samplers_without_noise_are_second_order(name):
    slope, errors = convergence_slope(name, "log", eta=0.0)
    assert 1.7 <= slope <= 2.6, f"{name}: slope {slope:.2f}, errors {errors}"


# Euler a / DDPM drop Var[x0 | x] from each step: a first-order bias in the spread, which
# shrinks 0.60 -> 0.65 -> 0.67 -> 0.69 (of 0.7) over 20 -> 40 -> 80 -> 160 steps here.
@pytest.mark.parametrize(
    ("name", "steps"), [("euler_a", 250), ("ddpm", 250), ("dpmpp_2m_sde", 40), ("dpmpp_sde", 40)]
)
def test_stochastic_samplers_draw_from_the_data_distribution(name, steps):
    mu, s = 0.5, 0.7
    model = lambda x, sigma: mu + s**2 / (s**2 + sigma.reshape(-1, 1) ** 2) * (x - mu)  # noqa: E731
    sigmas = torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), steps + 1).exp()
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 20000, generator=g, dtype=torch.float64) * (SIGMA_MAX**2 + s**2) ** 0.5
    out = SAMPLERS[name].fn(model, x + mu, sigmas, generator=g)
    assert out.mean().item() == pytest.approx(mu, abs=0.03)
    assert out.std().item() == pytest.approx(s, rel=0.03)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_are_reproducible(schedule, name):
    sigmas = get_sigmas(schedule, 8, "karras")
    denoiser = Denoiser(eps_unet, schedule, "eps")

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return SAMPLERS[name].fn(
            denoiser, noise() * sigmas[0], sigmas, generator=g, schedule=schedule
        )

    first, again, other = sample(5), sample(5), sample(6)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_require_a_generator(schedule, name):
    sigmas = get_sigmas(schedule, 4, "karras")
    with pytest.raises(ValueError, match="Generator"):
        SAMPLERS[name].fn(lambda x, s: x, noise() * sigmas[0], sigmas, schedule=schedule)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_once_per_step_and_no_model_call_at_sigma_zero(schedule, name):
    sigmas = get_sigmas(schedule, 6, "karras")
    seen_sigmas, steps = [], []

    def model(x, sigma):
        assert sigma.shape == (SHAPE[0],)
        seen_sigmas.append(sigma[0].item())
        return x * 0.5

    def callback(i, x, x0):
        assert x.shape == x0.shape == SHAPE
        steps.append(i)

    g = torch.Generator().manual_seed(0)
    SAMPLERS[name].fn(
        model, noise() * sigmas[0], sigmas, generator=g, callback=callback, schedule=schedule
    )
    assert steps == list(range(6))
    assert min(seen_sigmas) > 0


def test_sampler_table_metadata():
    assert list(SAMPLERS) == [
        "euler", "euler_a", "heun", "dpm2", "lms", "ddim", "ddpm",
        "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "unipc", "lcm", "tcd",
    ]  # fmt: skip
    names = [info.display_name for info in SAMPLERS.values()]
    assert names == [
        "Euler", "Euler a", "Heun", "DPM2", "LMS", "DDIM", "DDPM",
        "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "UniPC", "LCM", "TCD",
    ]  # fmt: skip
    assert {n for n, info in SAMPLERS.items() if info.stochastic} == set(STOCHASTIC)
    for info in SAMPLERS.values():
        assert info.default_spacing in SPACINGS
        assert info.description and "\n" not in info.description
    assert SAMPLERS["ddim"].default_spacing == SAMPLERS["ddpm"].default_spacing == "leading"
    assert SAMPLERS["ddim"].default_final == "sigma_min"


def test_importing_samplers_stays_light():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    code = "import sys, ldm_cli.samplers; print(sorted({'diffusers', 'scipy'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "[]"
