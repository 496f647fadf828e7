"""The text-to-image pipeline: prompts -> CLIP -> guided sampler over the U-Net -> VAE -> PIL."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image

from .devices import resolve_device, resolve_dtype
from .errors import UserError
from .guidance import cfg_denoiser
from .loading import load_model
from .models.latent_diffusion import LatentDiffusion
from .samplers import SAMPLERS
from .schedules import (
    SPACINGS,
    Denoiser,
    DiscreteSchedule,
    get_sigmas,
    get_timesteps,
    init_noise_sigma,
    to_vp_latent,
)
from .tokenizer import get_tokenizer

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Request:
    """Everything that decides an image, besides the model."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 30
    cfg: float = 7.5
    seed: int = 0
    sampler: str = "euler_a"
    scheduler: str = "auto"
    width: int = 512
    height: int = 512

    @property
    def spacing(self) -> str:
        return (
            SAMPLERS[self.sampler].default_spacing if self.scheduler == "auto" else self.scheduler
        )


def random_seed() -> int:
    return secrets.randbelow(2**32)


class Pipeline:
    def __init__(
        self, model: LatentDiffusion, path: Path, device: torch.device, dtype: torch.dtype
    ):
        self.model = model
        self.config = model.config
        self.path = Path(path)
        self.device = device
        self.dtype = dtype
        self.schedule = DiscreteSchedule(self.config.schedule)
        self.tokenizer = get_tokenizer(self.config.text.pad_token_id)

    @property
    def unet(self):
        return self.model.unet

    @property
    def vae(self):
        return self.model.vae

    @property
    def text_encoder(self):
        return self.model.text_encoder

    @property
    def name(self) -> str:
        return self.path.stem

    @cached_property
    def model_hash(self) -> str:
        from .pngmeta import model_hash

        return model_hash(self.path)

    @property
    def latent_factor(self) -> int:
        return self.config.vae.downscale

    @property
    def size_multiple(self) -> int:
        return self.latent_factor * 2 ** (len(self.config.unet.channel_mult) - 1)

    # -- stages ---------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(tokens).to(self.dtype)

    def initial_noise(
        self, seed: int, width: int, height: int
    ) -> tuple[torch.Tensor, torch.Generator]:
        """Noise for one image, always drawn on the CPU so a seed means the same on every device."""
        f = self.latent_factor
        gen = torch.Generator("cpu").manual_seed(seed)
        shape = (1, self.config.unet.out_channels, height // f, width // f)
        return torch.randn(shape, generator=gen, dtype=torch.float32), gen

    def sigmas(self, req: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """The run's sigmas and the U-Net timestep of each step (as diffusers feeds them)."""
        info = SAMPLERS[req.sampler]
        final = info.default_final if req.spacing == info.default_spacing else "zero"
        sigmas = get_sigmas(self.schedule, req.steps, req.spacing, final=final)
        return sigmas, get_timesteps(self.schedule, req.steps, req.spacing)

    @torch.inference_mode()
    def sample(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        noise: torch.Tensor,
        generators: list[torch.Generator],
        req: Request,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """Denoise unit `noise` [B, C, h, w]; returns the latents the VAE decodes."""
        sigmas, timesteps = self.sigmas(req)
        denoiser = Denoiser(
            _in_dtype(self.unet, self.dtype),
            self.schedule,
            self.config.prediction,
            pinned_timesteps=(sigmas[:-1], timesteps),
        )
        model = cfg_denoiser(denoiser, cond, uncond, req.cfg)
        x = noise.to(self.device) * init_noise_sigma(float(sigmas[0]), req.spacing)
        total = len(sigmas) - 1

        def on_step(i, *_):
            if progress:
                progress(i + 1, total)

        sigmas = sigmas.to(self.device)
        x = SAMPLERS[req.sampler].fn(model, x, sigmas, generator=generators, callback=on_step)
        # DDIM stops at the first table sigma as diffusers/CompVis do; it decodes the VP latent
        return to_vp_latent(x, sigmas[-1])

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae_dtype = next(self.vae.parameters()).dtype
        z = latents.to(vae_dtype) / self.config.vae.scale_factor
        images = self.vae.decode(z).float()
        if not torch.isfinite(images).all():
            raise UserError("the decoded image holds NaN/inf values (numerical overflow)")
        images = (images / 2 + 0.5).clamp(0, 1)
        arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in arr]

    # -- whole requests ---------------------------------------------------------------------

    def validate(self, req: Request) -> None:
        m = self.size_multiple
        if req.width % m or req.height % m or req.width <= 0 or req.height <= 0:
            raise UserError(
                f"size {req.width}x{req.height} is not supported: width and height must be "
                f"positive multiples of {m} for this model"
            )
        if req.steps < 1:
            raise UserError(f"steps must be at least 1, got {req.steps}")
        if req.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {req.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if req.scheduler != "auto" and req.scheduler not in SPACINGS:
            raise UserError(
                f"unknown scheduler {req.scheduler!r}; choose one of auto, {', '.join(SPACINGS)}"
            )

    def render(
        self, requests: list[Request], progress: Progress | None = None
    ) -> Iterator[tuple[Request, Image.Image]]:
        """Render requests as one batch; they may differ in prompts and seeds only."""
        head = requests[0]
        for r in requests:
            self.validate(r)
            if replace(r, seed=head.seed, prompt=head.prompt, negative_prompt="") != replace(
                head, negative_prompt=""
            ):
                raise ValueError("a batch must share everything but prompts and seeds")
        cond = self._encode_unique([r.prompt for r in requests])
        uncond = None
        if head.cfg != 1.0:
            uncond = self._encode_unique([r.negative_prompt for r in requests])
        noises, gens = zip(
            *(self.initial_noise(r.seed, r.width, r.height) for r in requests), strict=True
        )
        latents = self.sample(cond, uncond, torch.cat(noises), list(gens), head, progress)
        yield from zip(requests, self.decode(latents), strict=True)

    def _encode_unique(self, prompts: list[str]) -> torch.Tensor:
        unique = list(dict.fromkeys(prompts))
        features = self.encode_prompts(unique)
        return features[[unique.index(p) for p in prompts]]

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int = 30,
        cfg: float = 7.5,
        seed: int | None = None,
        sampler: str = "euler_a",
        scheduler: str = "auto",
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        batch_size: int = 1,
        progress: Progress | None = None,
    ) -> list[Image.Image]:
        """Images k = 0..num_images-1 use seed + k whatever the batch size.

        Each image carries its AUTOMATIC1111 `parameters` text in `image.info`.
        """
        size = self.config.default_size
        base = Request(
            prompt,
            negative_prompt,
            steps,
            cfg,
            random_seed() if seed is None else seed,
            sampler,
            scheduler,
            width or size,
            height or size,
        )
        reqs = [replace(base, seed=base.seed + k) for k in range(num_images)]
        out = []
        for i in range(0, len(reqs), max(1, batch_size)):
            for req, image in self.render(reqs[i : i + batch_size], progress):
                image.info["parameters"] = self.parameters_text(req)
                out.append(image)
        return out

    def parameters_text(self, req: Request) -> str:
        from .pngmeta import GenerationParams, format_parameters

        return format_parameters(
            GenerationParams(
                prompt=req.prompt,
                negative_prompt=req.negative_prompt,
                steps=req.steps,
                sampler=req.sampler,
                scheduler=req.spacing,
                cfg_scale=req.cfg,
                seed=req.seed,
                width=req.width,
                height=req.height,
                model_hash=self.model_hash,
                model_name=self.name,
            )
        )


def _in_dtype(unet, dtype: torch.dtype):
    """Run the network in the model dtype; samplers keep their state in fp32."""

    def call(z, t, **cond):
        return unet(z.to(dtype), t, **{k: v.to(dtype) for k, v in cond.items()}).float()

    return call


def load(
    path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Pipeline:
    """Open a single-file checkpoint (default: the embedded model) as a Pipeline."""
    from .embedded import default_model_path

    path = Path(path) if path else default_model_path()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model, header = load_model(path, device=dev, dtype=dt)
    return Pipeline(model, header.path, dev, dt)
