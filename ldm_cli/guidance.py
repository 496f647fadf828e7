"""Classifier-free guidance as a denoiser closure: samplers never see prompts or CFG."""

from __future__ import annotations

from collections.abc import Callable

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cfg_denoiser(
    denoiser: Callable[..., torch.Tensor],
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    scale: float,
) -> Denoise:
    """`model(x, sigma) -> x0` guided by `scale`; cond and uncond share one batched call.

    Guidance is applied to x0, which for a fixed (x, sigma) is an affine function of the
    network output, so it equals guidance on eps or v exactly (up to rounding).
    With `scale == 1` the unconditional pass is skipped.
    """
    if uncond is None or scale == 1.0:
        return lambda x, sigma: denoiser(x, _batch_sigma(sigma, x), context=cond)

    context = torch.cat([uncond, cond])

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = _batch_sigma(sigma, x)
        x0_uncond, x0_cond = denoiser(torch.cat([x, x]), torch.cat([s, s]), context=context).chunk(
            2
        )
        return x0_uncond + (x0_cond - x0_uncond) * scale

    return guided


def _batch_sigma(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
