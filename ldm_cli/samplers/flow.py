"""Rectified-flow schedules: the sigmas (flow times) of SD3 and FLUX runs, and their denoiser.

A flow model is trained on ``x_t = (1 - t) * x0 + t * noise`` and predicts the velocity
``v = noise - x0``; its x0 is ``x_t - t * v``. With sigma = t, the samplers' ``d = (x - x0) /
sigma`` is exactly ``v``, so Euler, Heun, DPM2 and LMS integrate the flow ODE ``dx/dt = v``
unchanged, in flow space; Euler is diffusers' ``FlowMatchEulerDiscreteScheduler`` step
``x + (t_next - t) * v``. DPM++ 2M, UniPC, DPM++ SDE and DPM++ 2M SDE step in the flow's own
half log-SNR ``log((1 - t) / t)`` instead (`samplers.flow_solvers`), and Euler ancestral adds
its noise the flow way (`sample_euler_ancestral_flow`).

The sigmas are diffusers' (``FlowMatchEulerDiscreteScheduler.set_timesteps``):
- a static `shift` (SD3: 3.0): the scheduler's shifted training sigmas span [1, shifted(1/1000)],
  and ``set_timesteps`` spaces its steps linearly over that range and shifts them again (the
  pipeline passes no sigmas), ``shifted(s) = shift * s / (1 + (shift - 1) * s)``;
- a resolution-dependent shift (FLUX dev: ``mu`` from 0.5 at 256 image tokens to 1.15 at 4096,
  ``FluxPipeline``'s ``calculate_shift``) applied to ``linspace(1, 1/steps, steps)`` as
  ``e^mu / (e^mu + 1/s - 1)``; FLUX schnell passes the same linspace unshifted.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ldm_cli.samplers.common import (
    Callback,
    Generators,
    Model,
    SigmaRun,
    check_generator,
    euler_step,
    gaussian_like,
)
from ldm_cli.samplers.euler import sample_euler
from ldm_cli.samplers.flow_solvers import (
    sample_dpmpp_2m_flow,
    sample_dpmpp_2m_sde_flow,
    sample_dpmpp_sde_flow,
    sample_unipc_flow,
)
from ldm_cli.samplers.heun_dpm2 import sample_dpm2, sample_heun
from ldm_cli.samplers.lms import sample_lms

TRAIN_STEPS = 1000
BASE_TOKENS, MAX_TOKENS = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def shifted(sigmas, shift: float):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_mu(image_tokens: int) -> float:
    """FLUX dev's resolution-dependent shift for an image of that many 2x2 latent patches."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return image_tokens * slope + BASE_SHIFT - slope * BASE_TOKENS


def static_shift_sigmas(steps: int, shift: float) -> torch.Tensor:
    """SD3's `steps` sigmas and a final 0 (the module docstring's static shift)."""
    train = np.linspace(1, TRAIN_STEPS, TRAIN_STEPS, dtype=np.float32)[::-1].copy()
    train = shifted(torch.from_numpy(train) / TRAIN_STEPS, shift)
    high, low = train[0].item() * TRAIN_STEPS, train[-1].item() * TRAIN_STEPS
    sigmas = np.linspace(high, low, steps) / TRAIN_STEPS
    sigmas = shifted(sigmas, shift)
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def dynamic_shift_sigmas(steps: int, mu: float | None) -> torch.Tensor:
    """FLUX's `steps` sigmas and a final 0: linspace(1, 1/steps), shifted by `mu` unless None."""
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if mu is not None:
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return torch.cat([torch.from_numpy(np.asarray(sigmas, dtype=np.float32)), torch.zeros(1)])


def flow_x0(x: torch.Tensor, sigma: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """The clean sample a velocity prediction implies: x - sigma * v."""
    return x - sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype) * velocity


def sample_euler_ancestral_flow(
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
    """Euler ancestral for a flow model (ComfyUI's rectified-flow variant): a deterministic
    (DDIM) step down to ``s_down = s_next * (1 + (s_next / s - 1) * eta)``, then the signal
    scaled from ``1 - s_down`` to ``1 - s_next`` and fresh noise added up to ``s_next``."""
    if eta > 0:
        check_generator(generator, "euler_a")
    run = SigmaRun(sigmas)
    for i in range(run.steps):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        if sigma_next == 0 or eta == 0:
            x = euler_step(x, x0, sigma, sigma_next)
        else:
            down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
            ratio = down / sigma
            x = ratio * x + (1 - ratio) * x0
            signal = (1 - sigma_next) / (1 - down)
            renoise = math.sqrt(max(sigma_next**2 - (down * signal) ** 2, 0.0))
            x = signal * x + gaussian_like(x, generator) * (renoise * s_noise)
        if callback is not None:
            callback(i, x, x0)
    return x


# The samplers that run a flow model: the sigma-space ODE solvers work on dx/dt = v unchanged
# (module docstring); the ancestral step and the log-SNR solvers (DPM++, UniPC: alpha = 1 - t,
# `flow_solvers`) need their flow forms. DDIM and DDPM assume x = x0 + sigma * noise.
FLOW_SAMPLERS = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral_flow,
    "heun": sample_heun,
    "dpm2": sample_dpm2,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m_flow,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde_flow,
    "dpmpp_sde": sample_dpmpp_sde_flow,
    "unipc": sample_unipc_flow,
}
