"""Samplers: plain functions over a sigma-space denoiser ``model(x, sigma[B]) -> x0``.

Every sampler has the signature
``sample_xxx(model, x, sigmas, *, generator=None, callback=None, **extra) -> x``:
``x`` starts at ``sigmas[0]`` (``noise * init_noise_sigma(sigmas[0], spacing)``), ``sigmas``
descends and usually ends in 0, ``callback(i, x, x0)`` runs after step ``i`` with the new
sample and the x0 predicted at step ``i``, and stochastic samplers draw noise only from
``generator``. Options a sampler does not know (``eta``, ``order``, ...) are ignored, so one call
site can serve them all. Importing this package needs only torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ldm_cli.samplers.consistency import sample_lcm, sample_tcd
from ldm_cli.samplers.ddim_ddpm import sample_ddim, sample_ddpm
from ldm_cli.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_sde
from ldm_cli.samplers.euler import sample_euler, sample_euler_ancestral
from ldm_cli.samplers.heun_dpm2 import sample_dpm2, sample_heun
from ldm_cli.samplers.lms import sample_lms
from ldm_cli.samplers.unipc import sample_unipc


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable
    display_name: str  # as AUTOMATIC1111 writes it in PNG parameters
    description: str
    stochastic: bool = False
    default_spacing: str = "normal"
    default_final: str = "zero"  # get_sigmas(final=...): "sigma_min" stops where DDIM does


SAMPLERS: dict[str, SamplerInfo] = {
    "euler": SamplerInfo(sample_euler, "Euler", "first-order ODE steps; 1 call/step"),
    "euler_a": SamplerInfo(
        sample_euler_ancestral, "Euler a", "Euler plus fresh noise each step", stochastic=True
    ),
    "heun": SamplerInfo(sample_heun, "Heun", "second-order ODE (trapezoid); 2 calls/step"),
    "dpm2": SamplerInfo(sample_dpm2, "DPM2", "second-order ODE (log-sigma midpoint); 2 calls/step"),
    "lms": SamplerInfo(sample_lms, "LMS", "fourth-order linear multistep; 1 call/step"),
    "ddim": SamplerInfo(
        sample_ddim,
        "DDIM",
        "deterministic DDIM (eta 0), diffusers' timesteps; 1 call/step",
        default_spacing="leading",
        default_final="sigma_min",
    ),
    "ddpm": SamplerInfo(
        sample_ddpm,
        "DDPM",
        "ancestral DDPM posterior sampling; needs many steps",
        stochastic=True,
        default_spacing="leading",
    ),
    "dpmpp_2m": SamplerInfo(
        sample_dpmpp_2m, "DPM++ 2M", "DPM-Solver++ second-order multistep; 1 call/step"
    ),
    "dpmpp_2m_sde": SamplerInfo(
        sample_dpmpp_2m_sde,
        "DPM++ 2M SDE",
        "stochastic DPM-Solver++ 2M (midpoint); 1 call/step",
        stochastic=True,
    ),
    "dpmpp_sde": SamplerInfo(
        sample_dpmpp_sde, "DPM++ SDE", "stochastic DPM-Solver++ SDE; 2 calls/step", stochastic=True
    ),
    "unipc": SamplerInfo(
        sample_unipc, "UniPC", "UniPC-bh2 predictor-corrector, order 2; 1 call/step"
    ),
    "lcm": SamplerInfo(
        sample_lcm,
        "LCM",
        "Latent Consistency Model sampling (LCM models and LCM-LoRAs; 2-8 steps, cfg 1-2)",
        stochastic=True,
        default_spacing="lcm",
    ),
    "tcd": SamplerInfo(
        sample_tcd,
        "TCD",
        "Trajectory Consistency Distillation, gamma --eta (0.3); TCD and Hyper-SD LoRAs",
        stochastic=True,
        default_spacing="lcm",
        default_final="sigma_min",
    ),
}

__all__ = [
    "SAMPLERS",
    "SamplerInfo",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm2",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sample_lms",
    "sample_tcd",
    "sample_unipc",
]
