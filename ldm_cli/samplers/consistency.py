"""Few-step samplers of consistency-distilled models: LCM and TCD, in sigma space.

Both are diffusers' schedulers (LCMScheduler, TCDScheduler) rewritten over the sigma-space
denoiser. They need the discrete schedule (``schedule=``, which the pipeline passes to every
sampler): LCM's boundary scalings depend on the integer timestep, and TCD jumps to the sigma of
an earlier timestep. With ``z = x / sqrt(sigma^2 + 1)`` the variance-preserving sample:

- LCM: ``denoised = c_out(t) x0 + c_skip(t) z``, then ``x_next = denoised + sigma_next noise``
  (``sqrt(a_next) denoised + sqrt(1 - a_next) noise`` in VP space); the last step returns
  ``denoised`` with no noise.
- TCD with gamma: ``s = floor((1 - gamma) t_next)``; ``x_s = x0 + sigma_s eps`` (the noised
  prediction at s), then ``x_next = x_s + sqrt(sigma_next^2 - sigma_s^2) noise``; gamma 0 is
  deterministic DDIM. The last step lands on sigma_min (``alphas_cumprod[0]``), as diffusers'.
"""

from __future__ import annotations

import math

import torch

from ldm_cli.samplers.common import (
    Callback,
    Generators,
    Model,
    SigmaRun,
    check_generator,
    gaussian_like,
)

# LCMScheduler's boundary condition: sigma_data 0.5, timesteps scaled by 10
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def lcm_boundary_scalings(t: float) -> tuple[float, float]:
    """(c_skip, c_out) of LCMScheduler.get_scalings_for_boundary_condition_discrete at t."""
    scaled = t * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / math.sqrt(scaled**2 + SIGMA_DATA**2)
    return c_skip, c_out


def _table_timestep(schedule, sigma: float) -> int:
    """The integer timestep whose table sigma this is (LCM/TCD run on table entries)."""
    if sigma <= 0:
        return 0
    return round(float(schedule.sigma_to_t(torch.tensor(sigma, dtype=torch.float64))))


def _needs_schedule(schedule, sampler: str):
    if schedule is None:
        raise ValueError(f"{sampler} needs the discrete schedule: pass schedule=")
    return schedule


def sample_lcm(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    schedule=None,
    **extra,
) -> torch.Tensor:
    """Latent Consistency Model sampling: a consistency jump to x0, then fresh noise."""
    schedule = _needs_schedule(schedule, "lcm")
    run = SigmaRun(sigmas)
    if run.steps > 1:
        check_generator(generator, "lcm")
    for i in range(run.steps):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        c_skip, c_out = lcm_boundary_scalings(_table_timestep(schedule, sigma))
        denoised = x0 * c_out + x * (c_skip / math.sqrt(sigma**2 + 1))
        last = i == run.steps - 1
        x = denoised if last else denoised + gaussian_like(x, generator) * sigma_next
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_tcd(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    schedule=None,
    eta: float | None = None,
    **extra,
) -> torch.Tensor:
    """Trajectory Consistency Distillation's strategic stochastic sampling; `eta` is its gamma
    (default 0.3, diffusers'): the share of each step taken back as fresh noise."""
    schedule = _needs_schedule(schedule, "tcd")
    gamma = 0.3 if eta is None else float(eta)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"tcd's gamma (eta) must be within [0, 1], got {gamma}")
    run = SigmaRun(sigmas)
    if gamma > 0 and run.steps > 1:
        check_generator(generator, "tcd")
    table = schedule.sigmas.double()
    for i in range(run.steps):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        t_s = math.floor((1 - gamma) * _table_timestep(schedule, sigma_next))
        sigma_s = float(table[t_s])
        x = x0 + (x - x0) * (sigma_s / sigma)
        if gamma > 0 and i < run.steps - 1:
            x = x + gaussian_like(x, generator) * math.sqrt(max(sigma_next**2 - sigma_s**2, 0.0))
        if callback is not None:
            callback(i, x, x0)
    return x
