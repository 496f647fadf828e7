"""Pieces every sampler shares: reading the sigmas, calling the denoiser, drawing noise.

Samplers read the sigmas to Python floats once per run (one host read) and do all scalar
maths in float64 on the host; tensors only ever see the finished coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


class SigmaRun:
    """The sigmas of one run as floats, and the dtype the denoiser receives them in."""

    def __init__(self, sigmas: torch.Tensor):
        sigmas = torch.as_tensor(sigmas)
        if sigmas.ndim != 1:
            raise ValueError(f"sigmas must be 1-d, got shape {tuple(sigmas.shape)}")
        self.values: list[float] = [float(s) for s in sigmas.tolist()]
        self.dtype = sigmas.dtype if sigmas.dtype.is_floating_point else torch.float32

    @property
    def steps(self) -> int:
        return len(self.values) - 1

    def pair(self, i: int) -> tuple[float, float]:
        return self.values[i], self.values[i + 1]

    def denoise(self, model: Model, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """model(x, sigma) with sigma as a per-sample [B] tensor on x's device."""
        batch_sigma = torch.full((x.shape[0],), sigma, dtype=self.dtype, device=x.device)
        return model(x, batch_sigma)


def euler_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dsigma = (x - x0) / sigma."""
    return x + (x - x0) / sigma * (sigma_next - sigma)


def ancestral_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): go deterministically to sigma_down, then add sigma_up of noise.

    sigma_down^2 + sigma_up^2 = sigma_next^2; eta = 1 makes the pair the DDPM posterior.
    """
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


Generators = torch.Generator | Sequence[torch.Generator]


def check_generator(generator: Generators | None, sampler: str) -> Generators:
    if generator is None:
        raise ValueError(f"{sampler} is stochastic: pass a torch.Generator")
    return generator


def gaussian_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (device-stable).

    A sequence of generators gives row i of the batch from generator i, so an image's noise
    never depends on which other images share its batch (diffusers' convention for lists).
    """
    if isinstance(generator, torch.Generator):
        noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
        return noise.to(x.device)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"{len(gens)} generators for a batch of {x.shape[0]}")
    rows = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in gens]
    return torch.stack([r.to(x.device) for r in rows])
