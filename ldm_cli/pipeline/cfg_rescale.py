"""Guidance rescale (``--rescale-cfg PHI``), from "Common Diffusion Noise Schedules and Sample
Steps are Flawed" (Lin et al. 2023, section 3.4), as diffusers' ``rescale_noise_cfg``.

Strong classifier-free guidance inflates the prediction's standard deviation, which
over-exposes images, most visibly with v-prediction models trained on a zero-terminal-SNR
schedule. The rescale brings the guided prediction back to the standard deviation of the
conditional one and mixes the two by PHI (0 = off; the paper uses 0.7)::

    rescaled = guided * std(cond) / std(guided)         (per image, over C, H, W)
    guided   = PHI * rescaled + (1 - PHI) * guided

Standard deviations are not affine invariant, so where it is applied matters: diffusers
applies it to the network's output, eps for eps-models and v for v-models, and so does this
module. Guidance here works on x0 (:mod:`ldm_cli.pipeline.guidance`); for a fixed (x, sigma) the
network output is ``alpha * x + beta * x0`` (:func:`output_coefficients`), so x0 goes to that
space, is rescaled there, and comes back. With several weighted sub-prompts (AND) the
"conditional" prediction is their guidance at scale 1: u + sum_k w_k (c_k - u).
"""

from __future__ import annotations

import torch


def output_coefficients(sigma: torch.Tensor, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta) with network output = alpha * x + beta * x0 in sigma space.

    eps = (x - x0) / sigma; v = (x / (sigma^2 + 1) - x0) * sqrt(sigma^2 + 1) / sigma (the
    inverses of ``schedules.eps_to_x0`` / ``v_to_x0``).
    """
    root = (sigma**2 + 1).sqrt()
    if prediction == "eps":
        return 1 / sigma, -1 / sigma
    if prediction == "v":
        return 1 / (sigma * root), -root / sigma
    raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")


def rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """diffusers' formula on network outputs [B, ...]: the per-image std of `guided` brought
    towards that of `cond` by the fraction `phi`."""
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return phi * rescaled + (1 - phi) * guided


def rescale_x0(
    x0_guided: torch.Tensor,
    x0_cond: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    phi: float,
    prediction: str,
) -> torch.Tensor:
    """`rescale_noise_cfg` applied in the model's output space to x0 predictions at (x, sigma).

    `sigma` is per image ([B]) or shared; at sigma 0 (never evaluated by the samplers) the
    output space is undefined and x0 is returned unchanged.
    """
    if phi == 0:
        return x0_guided
    s = torch.as_tensor(sigma, device=x.device).to(x.dtype)
    s = s.reshape(-1, *[1] * (x.ndim - 1)) if s.ndim else s
    if bool((s == 0).any()):
        return x0_guided
    alpha, beta = output_coefficients(s, prediction)
    guided = alpha * x + beta * x0_guided
    cond = alpha * x + beta * x0_cond
    out = rescale_noise_cfg(guided, cond, phi)
    return ((out - alpha * x) / beta).to(x0_guided.dtype)
