"""DDIM and DDPM, which in sigma space are exactly Euler and Euler ancestral.

Notation: a = alphas_cumprod, sigma = sqrt((1 - a) / a), sigma-space x = z / sqrt(a), where z
is the variance-preserving latent diffusers' DDIMScheduler/DDPMScheduler step, and the x0 and
eps predictions are the same in both spaces (x = x0 + sigma * eps).

DDIM, eta 0: z' = sqrt(a') x0 + sqrt(1 - a') eps. Divided by sqrt(a'):
x' = x0 + sigma' eps = x0 + sigma' (x - x0) / sigma = x + (sigma' - sigma) (x - x0) / sigma,
which is one Euler step of dx/dsigma = (x - x0) / sigma.

DDPM posterior from a to a' (alpha = a / a', beta = 1 - alpha):
mean_z = sqrt(a') beta / (1 - a) x0 + sqrt(alpha) (1 - a') / (1 - a) z,
var_z = (1 - a') / (1 - a) beta. In sigma space (divide by sqrt(a')) this simplifies to
mean_x = x0 + (sigma'^2 / sigma^2) (x - x0) and std_x = sigma' sqrt(sigma^2 - sigma'^2) / sigma:
an Euler step to sigma_down = sigma'^2 / sigma plus sigma_up = std_x of fresh noise, which is
the eta = 1 ancestral split. So DDPM is Euler ancestral, and with the same noise it follows
diffusers' DDPMScheduler (variance_type "fixed_small").

To reproduce diffusers' pipelines: sigmas = get_sigmas(schedule, steps, "leading",
final="sigma_min") for DDIM (set_alpha_to_one=False stops at alphas_cumprod[0]) and
final="zero" for DDPM; start from x = noise * sqrt(sigmas[0]^2 + 1) (pure noise in z); the
latent diffusers ends with is to_vp_latent(x, sigmas[-1]).
"""

from __future__ import annotations

import torch

from ldm_cli.samplers.common import Callback, Generators, Model
from ldm_cli.samplers.euler import sample_euler, sample_euler_ancestral


def sample_ddim(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    **extra,
) -> torch.Tensor:
    """DDIM with eta 0: Euler in sigma space (see the module docstring)."""
    return sample_euler(model, x, sigmas, callback=callback)


def sample_ddpm(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    **extra,
) -> torch.Tensor:
    """Ancestral DDPM posterior sampling: Euler ancestral with eta 1 (see the module docstring)."""
    return sample_euler_ancestral(model, x, sigmas, generator=generator, callback=callback)
