"""How an image-conditioned run starts, and what the U-Net sees besides the noisy latents.

`Pipeline.sample` takes an `ImageStart` for img2img, inpainting and the hires fix; samplers
stay plain functions over a denoiser `model(x, sigma) -> x0`, because everything here is a
wrapper around the U-Net call or around that denoiser.

Strength follows diffusers (and A1111 without "fix steps"): the schedule is built for all
`steps`, and the run skips its first `steps - int(steps * strength)` sigmas. A run that skips
none (strength 1) starts from pure noise exactly as txt2img does; otherwise it starts from the
image latents plus noise of the first remaining sigma, `x = latents + sigma * noise` in sigma
space (diffusers' `add_noise`, for its Euler and DDIM schedulers alike). A run that skips all
of them (strength 0) returns the image latents untouched: the VAE round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldm_cli.samplers.schedules import init_noise_sigma

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def first_step(steps: int, strength: float, flow: bool = False) -> int:
    """Index of the first sigma an image-conditioned run uses (diffusers' `get_timesteps`:
    its SD pipelines run int(steps * strength) steps; its flow pipelines, FLUX's and SD3's,
    skip int(steps - steps * strength), so 4 steps at 0.6 run 3 there, 2 here)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be within [0, 1], got {strength}")
    if flow:
        return int(max(steps - steps * strength, 0))
    return steps - min(int(steps * strength), steps)


@dataclass(frozen=True)
class ImageStart:
    """The image side of a run over a batch of B images, all tensors on the model's device.

    latents: the clean, scaled image latents [B, 4, h, w]; None when the run starts from pure
        noise and no blending needs them.
    skip: how many of the schedule's sigmas to skip (`first_step`).
    concat: extra U-Net input channels [B, k, h, w], concatenated after the (scaled) noisy
        latents at every call: mask and masked-image latents for 9-channel inpainting models.
    keep: latent mask [B or 1, 1, h, w], 1 where the image latents are kept (inpainting with an
        ordinary 4-channel model).
    flow: a rectified-flow model's run, where noising to sigma is `(1 - sigma) * latents +
        sigma * noise` (diffusers' `scale_noise`) instead of `latents + sigma * noise`.
    """

    latents: torch.Tensor | None
    skip: int = 0
    concat: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    flow: bool = False

    def __post_init__(self) -> None:
        if self.latents is None and (self.skip > 0 or self.keep is not None):
            raise ValueError("a run that starts from the image or keeps part of it needs latents")

    def wrap_unet(self, unet_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if self.concat is None:
            return unet_fn
        return concat_channels(unet_fn, self.concat)

    def wrap_denoiser(self, model: Denoise, noise: torch.Tensor) -> Denoise:
        if self.keep is None:
            return model
        return keep_outside_mask(model, self.latents, noise, self.keep, self.flow)

    def initial_x(self, noise: torch.Tensor, first_sigma: float, spacing: str) -> torch.Tensor:
        if self.flow:
            return noise if self.skip == 0 else noised(self.latents, noise, first_sigma, True)
        if self.skip == 0:
            return noise * init_noise_sigma(first_sigma, spacing)
        return noised(self.latents, noise, first_sigma)

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampled latents with the kept region set back to the image's latents exactly."""
        if self.keep is None:
            return latents
        return latents * (1 - self.keep) + self.latents * self.keep


def concat_channels(
    unet_fn: Callable[..., torch.Tensor], extra: torch.Tensor
) -> Callable[..., torch.Tensor]:
    """`unet_fn` fed cat([z, extra]) along channels; `extra` repeats over the CFG-doubled batch."""

    def call(z: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        repeats = z.shape[0] // extra.shape[0]
        return unet_fn(torch.cat([z, extra.repeat(repeats, 1, 1, 1).to(z.dtype)], dim=1), t, **cond)

    return call


def noised(latents: torch.Tensor, noise: torch.Tensor, sigma, flow: bool = False) -> torch.Tensor:
    """The latents noised to `sigma`: in sigma space, or on a rectified flow's path."""
    if flow:
        return (1 - sigma) * latents + sigma * noise
    return latents + noise * sigma


def keep_outside_mask(
    model: Denoise,
    latents: torch.Tensor,
    noise: torch.Tensor,
    keep: torch.Tensor,
    flow: bool = False,
) -> Denoise:
    """Inpainting with a model that never saw a mask (ComfyUI's KSamplerX0Inpaint).

    Before each call the kept region of x is replaced by the image latents noised to the
    current sigma (with the run's own noise), and the kept region of the predicted x0 is
    replaced by the image latents. The sampler then steers x towards the image outside the mask
    at every step and lands on it exactly when the last sigma is 0.
    """

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, device=x.device).reshape(-1, 1, 1, 1)
        x = x * (1 - keep) + noised(latents, noise, s, flow) * keep
        x0 = model(x, sigma)
        return x0 * (1 - keep) + latents * keep

    return denoise
