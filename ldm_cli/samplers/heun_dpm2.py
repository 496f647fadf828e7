"""Second-order single-step samplers: Heun (trapezoid) and DPM2 (log-sigma midpoint)."""

from __future__ import annotations

import math

import torch

from ldm_cli.samplers.common import Callback, Generators, Model, SigmaRun, euler_step


def sample_heun(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    **extra,
) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Alg. 1): two model calls per step, Euler into sigma 0."""
    run = SigmaRun(sigmas)
    for i in range(run.steps):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        if sigma_next == 0:
            x = euler_step(x, x0, sigma, sigma_next)
        else:
            slope = (x - x0) / sigma
            x_pred = x + slope * (sigma_next - sigma)
            x0_pred = run.denoise(model, x_pred, sigma_next)
            slope_pred = (x_pred - x0_pred) / sigma_next
            x = x + (slope + slope_pred) * (0.5 * (sigma_next - sigma))
        if callback is not None:
            callback(i, x, x0)
    return x


def sample_dpm2(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    **extra,
) -> torch.Tensor:
    """DPM-Solver-2 as k-diffusion's sample_dpm_2: midpoint at the geometric mean of the sigmas."""
    run = SigmaRun(sigmas)
    for i in range(run.steps):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        if sigma_next == 0:
            x = euler_step(x, x0, sigma, sigma_next)
        else:
            sigma_mid = math.sqrt(sigma * sigma_next)
            x_mid = euler_step(x, x0, sigma, sigma_mid)
            x0_mid = run.denoise(model, x_mid, sigma_mid)
            x = x + (x_mid - x0_mid) * ((sigma_next - sigma) / sigma_mid)
        if callback is not None:
            callback(i, x, x0)
    return x
