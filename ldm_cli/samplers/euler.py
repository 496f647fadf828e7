"""Euler and Euler ancestral (k-diffusion's sample_euler / sample_euler_ancestral)."""

from __future__ import annotations

import torch

from ldm_cli.samplers.common import (
    Callback,
    Generators,
    Model,
    SigmaRun,
    ancestral_split,
    check_generator,
    euler_step,
    gaussian_like,
)


def sample_euler(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    **extra,
) -> torch.Tensor:
    """First-order Euler steps on the probability-flow ODE (one model call per step)."""
    run = SigmaRun(sigmas)
    for i in range(run.steps):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        x = euler_step(x, x0, sigma, sigma_next)
        if callback is not None:
            callback(i, x, x0)
    return x


def sample_euler_ancestral(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    **extra,
) -> torch.Tensor:
    """Euler to sigma_down, then fresh noise of sigma_up (no noise on the step to sigma 0)."""
    if eta > 0:
        check_generator(generator, "euler_a")
    run = SigmaRun(sigmas)
    for i in range(run.steps):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        x = euler_step(x, x0, sigma, sigma_down)
        if sigma_up > 0:
            x = x + gaussian_like(x, generator) * (sigma_up * s_noise)
        if callback is not None:
            callback(i, x, x0)
    return x
