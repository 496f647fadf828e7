import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm_cli.core.config import ScheduleConfig
from ldm_cli.core.errors import UserError
from ldm_cli.samplers.schedules import (
    SPACING_HELP,
    SPACINGS,
    Denoiser,
    DiscreteSchedule,
    eps_to_x0,
    get_sigmas,
    get_timesteps,
    init_noise_sigma,
    to_vp_latent,
    v_to_x0,
)

diffusers = pytest.importorskip("diffusers")

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def schedule():
    return DiscreteSchedule(ScheduleConfig())


def euler_scheduler(**config):
    return diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="linspace", **config)


def test_table_matches_diffusers(schedule):
    ref = euler_scheduler()
    assert torch.equal(schedule.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(schedule.sigmas, ref.sigmas[:-1].flip(0))
    assert schedule.sigma_min == pytest.approx(0.0291675, rel=1e-5)
    assert schedule.sigma_max == pytest.approx(14.6146, rel=1e-5)


def test_compvis_table_is_the_float64_one():
    compvis = DiscreteSchedule(ScheduleConfig(), reference="compvis")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0).float()
    assert torch.equal(compvis.alphas_cumprod, expected)
    diffusers_table = DiscreteSchedule(ScheduleConfig())
    rel = (compvis.sigmas / diffusers_table.sigmas - 1).abs().max().item()
    assert 0 < rel < 1e-4


def test_sigma_to_t_is_exact_on_table_entries(schedule):
    t = schedule.sigma_to_t(schedule.sigmas)
    assert torch.equal(t, torch.arange(1000, dtype=torch.float32))


def test_sigma_to_t_matches_diffusers(schedule):
    ref = euler_scheduler()
    log_sigmas = np.log(schedule.sigmas.numpy().astype(np.float64))
    sigmas = np.exp(np.linspace(math.log(0.01), math.log(20.0), 301))
    expected = np.array([ref._sigma_to_t(np.float64(s), log_sigmas) for s in sigmas])
    got = schedule.sigma_to_t(torch.from_numpy(sigmas)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.floats(min_value=0.0, max_value=999.0))
def test_t_to_sigma_inverts_sigma_to_t(schedule, t):
    t = torch.tensor([t], dtype=torch.float64)
    back = schedule.sigma_to_t(schedule.t_to_sigma(t))
    assert back.item() == pytest.approx(t.item(), abs=1e-6)


@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_normal_spacing_is_diffusers_euler_linspace(schedule, steps):
    ref = euler_scheduler()
    ref.set_timesteps(steps)
    sigmas = get_sigmas(schedule, steps, "normal")
    assert sigmas.dtype == torch.float32
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=1e-6, atol=0)
    torch.testing.assert_close(get_timesteps(schedule, steps, "normal"), ref.timesteps)


@pytest.mark.parametrize("steps", [5, 25])
def test_karras_spacing_is_diffusers_karras(schedule, steps):
    ref = euler_scheduler(use_karras_sigmas=True)
    ref.set_timesteps(steps)
    torch.testing.assert_close(get_sigmas(schedule, steps, "karras"), ref.sigmas, rtol=1e-6, atol=0)
    timesteps = get_timesteps(schedule, steps, "karras")
    torch.testing.assert_close(timesteps, ref.timesteps, rtol=0, atol=1e-4)


def test_exponential_spacing_is_diffusers_exponential(schedule):
    ref = euler_scheduler(use_exponential_sigmas=True)
    ref.set_timesteps(12)
    torch.testing.assert_close(
        get_sigmas(schedule, 12, "exponential"), ref.sigmas, rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("steps", [10, 30, 50])
def test_leading_spacing_is_diffusers_ddim(schedule, steps):
    ref = diffusers.DDIMScheduler(**SD_BETAS, steps_offset=1, set_alpha_to_one=False)
    ref.set_timesteps(steps)
    timesteps = get_timesteps(schedule, steps, "leading")
    assert torch.equal(timesteps.long(), ref.timesteps)
    sigmas = get_sigmas(schedule, steps, "leading", final="sigma_min")
    a = ref.alphas_cumprod[ref.timesteps]
    torch.testing.assert_close(sigmas[:-1], ((1 - a) / a) ** 0.5, rtol=1e-7, atol=0)
    a_final = ref.final_alpha_cumprod
    assert sigmas[-1].item() == pytest.approx((((1 - a_final) / a_final) ** 0.5).item(), rel=1e-7)
    assert get_sigmas(schedule, steps, "leading")[-1] == 0


def test_simple_and_sgm_uniform(schedule):
    simple = get_sigmas(schedule, 10, "simple")
    expected_t = [999 - int(k * 100.0) for k in range(10)]
    assert torch.equal(simple[:-1], schedule.sigmas[expected_t])
    sgm = get_sigmas(schedule, 4, "sgm_uniform")
    t = schedule.sigma_to_t(sgm[:-1].double())
    torch.testing.assert_close(t, torch.tensor([999.0, 749.25, 499.5, 249.75], dtype=torch.float64))


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 3, 40])
def test_every_spacing_descends_to_zero(schedule, spacing, steps):
    sigmas = get_sigmas(schedule, steps, spacing)
    assert sigmas.shape == (steps + 1,)
    assert sigmas[-1] == 0
    assert (sigmas[:-1] >= schedule.sigma_min * (1 - 1e-6)).all()
    assert (sigmas[0] <= schedule.sigma_max * (1 + 1e-6)).all()
    if steps > 1:
        assert (sigmas.diff() < 0).all()
    assert get_timesteps(schedule, steps, spacing).shape == (steps,)
    assert spacing in SPACING_HELP


def test_bad_arguments(schedule):
    with pytest.raises(ValueError, match="unknown spacing"):
        get_sigmas(schedule, 10, "cosine")
    with pytest.raises(ValueError, match="steps"):
        get_sigmas(schedule, 0, "normal")
    with pytest.raises(ValueError, match="sigma_min"):
        get_sigmas(schedule, 10, "karras", final="sigma_min")
    with pytest.raises(ValueError, match="final"):
        get_sigmas(schedule, 10, "normal", final="one")
    with pytest.raises(UserError, match="'leading' schedule .* at most 999 steps, got 1000"):
        get_sigmas(schedule, 1000, "leading")


def test_init_noise_sigma_follows_diffusers():
    for spacing, diffusers_spacing in [("normal", "linspace"), ("leading", "leading")]:
        ref = euler_scheduler() if spacing == "normal" else None
        if ref is None:
            ref = diffusers.EulerDiscreteScheduler(
                **SD_BETAS, timestep_spacing=diffusers_spacing, steps_offset=1
            )
        ref.set_timesteps(20)
        scale = init_noise_sigma(ref.sigmas[0].item(), spacing)
        assert scale == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


def _noised(shape=(3, 4, 5, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.0, 14.0], dtype=torch.float64)
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    return x0, eps, sigma, x


def test_eps_and_v_conversions_recover_x0():
    x0, eps, sigma, x = _noised()
    torch.testing.assert_close(eps_to_x0(x, eps, sigma), x0)
    alpha = 1 / (sigma**2 + 1) ** 0.5
    noise_std = sigma * alpha
    v = alpha.view(-1, 1, 1, 1) * eps - noise_std.view(-1, 1, 1, 1) * x0
    torch.testing.assert_close(v_to_x0(x, v, sigma), x0)
    z = to_vp_latent(x, sigma)
    torch.testing.assert_close(z, alpha.view(-1, 1, 1, 1) * x0 + noise_std.view(-1, 1, 1, 1) * eps)


def test_v_conversion_matches_diffusers_euler(schedule):
    ref = euler_scheduler(prediction_type="v_prediction")
    ref.set_timesteps(10)
    x0, eps, _, _ = _noised((1, 4, 5, 5))
    x0, eps = x0.float(), eps.float()
    sigma = ref.sigmas[3]
    x = x0 + sigma * eps
    v = torch.randn_like(x)
    ref._step_index = 3
    expected = ref.step(v, ref.timesteps[3], x).pred_original_sample
    torch.testing.assert_close(v_to_x0(x, v, sigma), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoiser_with_oracle_unet_returns_x0(schedule, prediction):
    x0, eps, sigma, x = _noised()
    calls = []

    def oracle(z, t):
        calls.append((z, t))
        alpha = 1 / (sigma**2 + 1) ** 0.5
        if prediction == "eps":
            return eps
        return alpha.view(-1, 1, 1, 1) * eps - (sigma * alpha).view(-1, 1, 1, 1) * x0

    denoiser = Denoiser(oracle, schedule, prediction)
    torch.testing.assert_close(denoiser(x, sigma), x0)
    z, t = calls[0]
    torch.testing.assert_close(z, to_vp_latent(x, sigma))
    torch.testing.assert_close(t, schedule.sigma_to_t(sigma))


def test_denoiser_broadcasts_scalar_sigma_and_passes_cond(schedule):
    seen = {}

    def unet(z, t, context=None):
        seen.update(t=t, context=context)
        return torch.zeros_like(z)

    x = torch.randn(2, 4, 3, 3)
    out = Denoiser(unet, schedule)(x, torch.tensor(schedule.sigmas[500].item()), context="c")
    assert torch.equal(out, x)
    assert torch.equal(seen["t"], torch.tensor([500.0, 500.0]))
    assert seen["context"] == "c"


def test_denoiser_pinned_timesteps(schedule):
    sigmas = get_sigmas(schedule, 20, "normal")
    timesteps = get_timesteps(schedule, 20, "normal")
    seen = []
    unet = lambda z, t: seen.append(t) or torch.zeros_like(z)  # noqa: E731
    pinned = Denoiser(unet, schedule, pinned_timesteps=(sigmas[:-1], timesteps))
    x = torch.zeros(2, 1)
    pinned(x, sigmas[1].repeat(2))
    pinned(x, torch.stack([sigmas[2], torch.tensor(1.2345)]))
    assert torch.equal(seen[0], timesteps[1].repeat(2))
    assert seen[1][0] == timesteps[2]
    assert seen[1][1] == schedule.sigma_to_t(torch.tensor(1.2345))
    # unpinned: sigma_to_t of a linearly interpolated sigma misses diffusers' t by < 0.003
    drift = (schedule.sigma_to_t(sigmas[:-1]) - timesteps).abs().max().item()
    assert 0 < drift < 3e-3
