"""The public pipelines: `base.Pipeline`'s stages plus the tasks people call (generate,
img2img, inpaint, outpaint, upscale), each handing over to its module in `pipeline.tasks`,
whose function documents the options. `ldm_cli.load` returns one of these."""

from __future__ import annotations

import re
from collections.abc import Iterator

from PIL import Image

from ldm_cli.control.units import control_specs
from ldm_cli.pipeline import base
from ldm_cli.pipeline.base import Progress
from ldm_cli.pipeline.request import Request, random_seed, seeded_batches
from ldm_cli.pipeline.tasks import sdxl
from ldm_cli.pipeline.tasks.hires import HiresFix


class Tasks:
    """What a loaded pipeline can be asked to make; mixed into the pipelines below."""

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int | None = None,
        cfg: float | None = None,
        seed: int | None = None,
        sampler: str | None = None,
        scheduler: str = "auto",
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        batch_size: int = 1,
        progress: Progress | None = None,
        hires: HiresFix | None = None,
        rescale_cfg: float = 0.0,
        deep_cache: int = 0,
        token_merging: float = 0.0,
        control=None,
        control_mode: str = "balanced",
        guidance: float | None = None,
        eta: float | None = None,
    ) -> list[Image.Image]:
        """Images k = 0..num_images-1 use seed + k whatever the batch size.

        `cfg` defaults to the checkpoint's own guidance scale (`config.default_cfg`, 7.5 unless
        its metadata names another); `steps` and `sampler` to the model's (30 and euler_a; a
        flow model's own count and euler). `guidance` is FLUX dev's distilled guidance (default
        3.5). Each image carries its AUTOMATIC1111 `parameters` text in
        `image.info`. `hires` upscales each image and refines it with img2img (A1111's "hires fix").
        `rescale_cfg` is the guidance rescale PHI (0..1; see ldm_cli.pipeline.cfg_rescale).
        `deep_cache` N > 1 reuses the U-Net's deep features for N-1 of every N calls: faster,
        slightly different images (see ldm_cli.runtime.deep_cache). `token_merging` (0..0.9) merges
        that ratio of the full-resolution self-attention tokens (ToMe;
        ldm_cli.runtime.token_merging). `control` is one `ldm_cli.Control` (a ControlNet file,
        its control image and weight, start and end) or several, their residuals summed;
        `control_mode` "controlnet" makes them more important than the prompt (diffusers' guess
        mode), "balanced" (default) does not. `eta` is the share of fresh noise of the samplers
        that add it (euler_a, dpmpp_sde, dpmpp_2m_sde: 1 by default; tcd's gamma: 0.3).
        """
        base = self.request(
            prompt, negative_prompt, steps=steps, cfg=cfg, seed=seed, sampler=sampler,
            scheduler=scheduler, width=width, height=height, rescale_cfg=rescale_cfg,
            deep_cache=deep_cache, token_merging=token_merging, control=control,
            control_mode=control_mode, guidance=guidance, eta=eta,
        )  # fmt: skip
        return [
            image
            for batch in seeded_batches(base, num_images, batch_size)
            for _, image in self.render_text_to_image(batch, progress, hires)
        ]

    def request(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int | None = None,
        cfg: float | None = None,
        seed: int | None = None,
        sampler: str | None = None,
        scheduler: str = "auto",
        width: int | None = None,
        height: int | None = None,
        rescale_cfg: float = 0.0,
        deep_cache: int = 0,
        token_merging: float = 0.0,
        control=None,
        control_mode: str = "balanced",
        guidance: float | None = None,
        eta: float | None = None,
    ) -> Request:
        """A text-to-image request with this model's defaults where an option is None (its
        size, guidance scale, steps and sampler, a random seed), checked against the model."""
        size = self.config.default_size
        req = Request(
            prompt,
            negative_prompt,
            steps,
            cfg,
            random_seed() if seed is None else seed,
            sampler,
            scheduler,
            size if width is None else width,
            size if height is None else height,
            rescale_cfg,
            deep_cache,
            token_merging,
            control_specs(control),
            control_mode,
            guidance,
            eta,
        )
        req = self.with_defaults(req)
        self.validate(req)
        return req

    def render_text_to_image(
        self,
        batch: list[Request],
        progress: Progress | None = None,
        hires: HiresFix | None = None,
        last: bool = False,
    ) -> Iterator[tuple[Request, Image.Image]]:
        """One batch of text-to-image requests, the hires fix after it where asked, each image
        with its parameters text. `last`: as in `render` (a hires pass keeps the U-Net)."""
        pairs = self.render(batch, progress, last=last and hires is None)
        if hires is not None:
            pairs = hires.apply(self, list(pairs), progress)
        for req, image in pairs:
            image.info["parameters"] = self.text_to_image_parameters(req, hires)
            yield req, image

    def text_to_image_parameters(self, req: Request, hires: HiresFix | None = None) -> str:
        """The parameters text of a text-to-image request (and its hires fix)."""
        if hires is None:
            return self.parameters_text(req)
        second = hires.size(req.width, req.height, self.size_multiple)
        return self.parameters_text(req, hires.parameters(), second_pass=second)

    def img2img(self, image, prompt: str, negative_prompt: str = "", **options):
        """Image to image; see `ldm_cli.pipeline.tasks.img2img.img2img` for the options."""
        from ldm_cli.pipeline.tasks.img2img import img2img

        return _named_options("img2img", img2img, self, image, prompt, negative_prompt, **options)

    def inpaint(self, image, mask, prompt: str, negative_prompt: str = "", **options):
        """Repaint where `mask` is white; see `ldm_cli.pipeline.tasks.inpaint.inpaint`."""
        from ldm_cli.pipeline.tasks.inpaint import inpaint

        return _named_options(
            "inpaint", inpaint, self, image, mask, prompt, negative_prompt, **options
        )

    def outpaint(self, image, prompt: str, negative_prompt: str = "", **options):
        """Extend the canvas and paint the new area; see `pipeline.tasks.inpaint.outpaint`."""
        from ldm_cli.pipeline.tasks.inpaint import outpaint

        return _named_options("outpaint", outpaint, self, image, prompt, negative_prompt, **options)

    def upscale(self, image, prompt: str = "", negative_prompt: str = "", **options):
        """4x super-resolution with an x4 upscaler checkpoint; see `pipeline.tasks.upscale`."""
        from ldm_cli.pipeline.tasks.upscale import upscale

        return _named_options("upscale", upscale, self, image, prompt, negative_prompt, **options)


def _named_options(method: str, fn, *args, **options):
    """`fn(*args, **options)`; a misspelt option is named as an option of `Pipeline.method`
    rather than of the inner function that received it."""
    try:
        return fn(*args, **options)
    except TypeError as error:
        match = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if match is None or match.group(1) not in options:
            raise
        raise TypeError(
            f"Pipeline.{method}() got an unexpected keyword argument {match.group(1)!r}"
        ) from None


class Pipeline(Tasks, base.Pipeline):
    """SD 1.x/2.x (and the x4 upscaler's) pipeline with its tasks."""


class SDXLPipeline(Tasks, sdxl.SDXLPipeline):
    """SDXL base, inpainting and refiner files' pipeline with its tasks."""
