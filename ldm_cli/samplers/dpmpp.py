"""DPM-Solver++ samplers in k-diffusion's form: 2M, 2M SDE (midpoint) and SDE.

All work in lambda = -log(sigma), with h = lambda_next - lambda the step. The first-order
update is the exact solution for a constant x0: x' = (sigma'/sigma) x + (1 - e^-h) x0.

Noise: k-diffusion draws the SDE noise of these samplers from a Brownian tree over sigma. Here
it comes from the generator, one standard normal per disjoint sigma interval, combined where
a step's interval contains a sub-step's (DPM++ SDE), so the noise has the joint law of
k-diffusion's Brownian motion; it is not the same sample for the same seed.
"""

from __future__ import annotations

import math

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


def sample_dpmpp_2m(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    **extra,
) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep from the last two x0 predictions."""
    run = SigmaRun(sigmas)
    prev_x0: torch.Tensor | None = None
    prev_h = 0.0
    for i in range(run.steps):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma / sigma_next)
            target = x0
            if prev_x0 is not None:
                target = x0 + (x0 - prev_x0) * (h / (2 * prev_h))
            x = x * (sigma_next / sigma) - target * math.expm1(-h)
            prev_h = h
        prev_x0 = x0
        if callback is not None:
            callback(i, x, x0)
    return x


def sample_dpmpp_2m_sde(
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
    """DPM-Solver++(2M) SDE, midpoint variant: the 2M update with (1 + eta) h decay plus noise."""
    if eta > 0:
        check_generator(generator, "dpmpp_2m_sde")
    run = SigmaRun(sigmas)
    prev_x0: torch.Tensor | None = None
    prev_h = 0.0
    for i in range(run.steps):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma / sigma_next)
            eta_h = eta * h
            growth = -math.expm1(-h - eta_h)  # 1 - e^-(1+eta)h
            x = x * (sigma_next / sigma * math.exp(-eta_h)) + x0 * growth
            if prev_x0 is not None:
                x = x + (x0 - prev_x0) * (0.5 * growth * h / prev_h)
            if eta > 0:
                noise_scale = sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
                x = x + gaussian_like(x, generator) * noise_scale
            prev_h = h
        prev_x0 = x0
        if callback is not None:
            callback(i, x, x0)
    return x


def sample_dpmpp_sde(
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
    """DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde, r = 1/2): two model calls per step.

    Each step draws two normals, w1 for sigma -> sigma_mid and w2 for sigma_mid -> sigma_next;
    the sub-step adds w1 and the full step the normalised Brownian increment over the whole
    interval, (w1 sqrt(sigma - sigma_mid) + w2 sqrt(sigma_mid - sigma_next)) / sqrt(sigma -
    sigma_next), as the Brownian tree over sigma would.
    """
    if eta > 0:
        check_generator(generator, "dpmpp_sde")
    run = SigmaRun(sigmas)
    for i in range(run.steps):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        if sigma_next == 0:
            x = euler_step(x, x0, sigma, sigma_next)
        else:
            sigma_mid = math.sqrt(sigma * sigma_next)  # lambda + h / 2
            w1 = w2 = None
            if eta > 0:
                w1, w2 = gaussian_like(x, generator), gaussian_like(x, generator)
            # sub-step to sigma_mid: exact first-order step to sigma_down, then noise
            down, up = ancestral_split(sigma, sigma_mid, eta)
            x_mid = x0 + (x - x0) * (down / sigma)
            if w1 is not None and up > 0:
                x_mid = x_mid + w1 * (up * s_noise)
            x0_mid = run.denoise(model, x_mid, sigma_mid)
            # full step with the midpoint's x0 (for r = 1/2 the weights are 0 and 1)
            down, up = ancestral_split(sigma, sigma_next, eta)
            x = x0_mid + (x - x0_mid) * (down / sigma)
            if w1 is not None and up > 0:
                span_1, span_2 = sigma - sigma_mid, sigma_mid - sigma_next
                increment = (w1 * math.sqrt(span_1) + w2 * math.sqrt(span_2)) / math.sqrt(
                    span_1 + span_2
                )
                x = x + increment * (up * s_noise)
        if callback is not None:
            callback(i, x, x0)
    return x
