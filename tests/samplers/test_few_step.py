"""Few-step sampling, step by step against diffusers' schedulers: lcm (LCMScheduler), tcd
(TCDScheduler with its gamma) and the 'trailing' spacing (Euler and Euler ancestral)."""

import numpy as np
import pytest
import torch

from ldm_cli.core.config import ScheduleConfig
from ldm_cli.core.errors import UserError
from ldm_cli.samplers import SAMPLERS
from ldm_cli.samplers.consistency import lcm_boundary_scalings
from ldm_cli.samplers.schedules import (
    Denoiser,
    DiscreteSchedule,
    get_sigmas,
    get_timesteps,
    init_noise_sigma,
)
from tests.samplers.test_samplers import (
    SD_BETAS,
    assert_same_trajectory,
    eps_unet,
    noise,
    run_diffusers,
    run_ours,
)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def schedule():
    return DiscreteSchedule(ScheduleConfig())


def our_run(schedule, sampler, steps, seed=None, **options):
    info = SAMPLERS[sampler]
    sigmas = get_sigmas(schedule, steps, info.default_spacing, final=info.default_final)
    x = noise() * init_noise_sigma(sigmas[0].item(), info.default_spacing)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    denoiser = Denoiser(eps_unet, schedule, "eps")
    return run_ours(sampler, denoiser, x, sigmas, gen, vp_space=True, schedule=schedule, **options)


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_lcm_timesteps_are_diffusers(schedule, steps):
    ref = diffusers.LCMScheduler(**SD_BETAS)
    ref.set_timesteps(steps)
    ours = get_timesteps(schedule, steps, "lcm")
    assert ours.long().tolist() == ref.timesteps.tolist()
    tcd = diffusers.TCDScheduler(**SD_BETAS)
    tcd.set_timesteps(steps)
    assert ours.long().tolist() == tcd.timesteps.tolist()


@pytest.mark.parametrize("steps", [1, 3, 4, 8, 25])
def test_trailing_sigmas_are_diffusers(schedule, steps):
    ref = diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing")
    ref.set_timesteps(steps)
    assert get_timesteps(schedule, steps, "trailing").tolist() == ref.timesteps.tolist()
    torch.testing.assert_close(
        get_sigmas(schedule, steps, "trailing"), ref.sigmas, rtol=1e-6, atol=0
    )
    assert init_noise_sigma(ref.sigmas[0].item(), "trailing") == pytest.approx(
        float(ref.init_noise_sigma), rel=1e-6
    )


def test_lcm_boundary_scalings_are_diffusers():
    ref = diffusers.LCMScheduler(**SD_BETAS)
    for t in (0, 19, 259, 999):
        assert lcm_boundary_scalings(t) == pytest.approx(
            ref.get_scalings_for_boundary_condition_discrete(t), rel=1e-12
        )


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_follows_diffusers_with_the_same_noise(schedule, steps):
    ref = diffusers.LCMScheduler(**SD_BETAS)
    ref.set_timesteps(steps)
    expected = run_diffusers(ref, noise() * ref.init_noise_sigma, torch.Generator().manual_seed(5))
    ours = our_run(schedule, "lcm", steps, seed=5)
    assert_same_trajectory(ours, expected)


@pytest.mark.parametrize("steps, gamma", [(4, None), (4, 0.0), (6, 0.7), (1, 0.3)])
def test_tcd_follows_diffusers_with_the_same_noise(schedule, steps, gamma):
    ref = diffusers.TCDScheduler(**SD_BETAS)
    ref.set_timesteps(steps)
    gen = torch.Generator().manual_seed(9)
    latents, expected = noise() * ref.init_noise_sigma, []
    for t in ref.timesteps:
        eps = eps_unet(latents, t.expand(latents.shape[0]))
        eta = 0.3 if gamma is None else gamma
        latents = ref.step(eps, t, latents, eta=eta, generator=gen).prev_sample
        expected.append(latents)
    options = {} if gamma is None else {"eta": gamma}
    assert_same_trajectory(our_run(schedule, "tcd", steps, seed=9, **options), expected)


@pytest.mark.parametrize(
    "sampler, reference",
    [
        ("euler", "EulerDiscreteScheduler"),
        ("euler_a", "EulerAncestralDiscreteScheduler"),
    ],
)
def test_trailing_euler_follows_diffusers(schedule, sampler, reference):
    """SDXL-Lightning's (Euler, trailing) and SDXL-Turbo's (Euler ancestral, trailing) runs."""
    ref = getattr(diffusers, reference)(**SD_BETAS, timestep_spacing="trailing")
    ref.set_timesteps(4)
    gen = torch.Generator().manual_seed(2) if sampler == "euler_a" else None
    expected = run_diffusers(ref, noise() * ref.init_noise_sigma, gen)
    sigmas = get_sigmas(schedule, 4, "trailing")
    x = noise() * init_noise_sigma(sigmas[0].item(), "trailing")
    denoiser = Denoiser(eps_unet, schedule, "eps")
    ours_gen = torch.Generator().manual_seed(2) if sampler == "euler_a" else None
    assert_same_trajectory(run_ours(sampler, denoiser, x, sigmas, ours_gen), expected)


def test_few_step_schedules_refuse_more_steps_than_they_have(schedule):
    with pytest.raises(UserError, match="at most 50 steps"):
        get_sigmas(schedule, 51, "lcm")
    with pytest.raises(UserError, match="at most 1000 steps"):
        get_sigmas(schedule, 1001, "trailing")


def test_lcm_needs_the_schedule(schedule):
    sigmas = get_sigmas(schedule, 2, "lcm")
    with pytest.raises(ValueError, match="schedule"):
        SAMPLERS["lcm"].fn(lambda x, s: x, noise(), sigmas, generator=torch.Generator())
    assert np.isfinite(sigmas.numpy()).all()


def test_consistency_samplers_land_next_to_a_point_mass(schedule):
    """LCM keeps c_skip(19) ~ 7e-6 of the sample; TCD stops at sigma_min (0.029) of it."""
    target = torch.randn((2, 4, 6, 6), generator=torch.Generator().manual_seed(1))
    sigmas = get_sigmas(schedule, 4, "lcm")
    x = noise() * init_noise_sigma(sigmas[0].item(), "lcm")
    out = SAMPLERS["lcm"].fn(
        lambda x, s: target, x, sigmas, generator=torch.Generator(), schedule=schedule
    )
    torch.testing.assert_close(out, target, rtol=0, atol=1e-4)
    sigmas = get_sigmas(schedule, 4, "lcm", final="sigma_min")
    out = SAMPLERS["tcd"].fn(
        lambda x, s: target, x, sigmas, generator=torch.Generator(), schedule=schedule
    )
    # x0 plus sigma_min (0.029) of the unit noise the last step saw: a few hundredths
    assert 0.005 < (out - target).abs().max() < 0.15
