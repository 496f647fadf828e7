"""The image-to-image entry points of a Pipeline (img2img, inpaint, outpaint, upscale): each
hands over to its module, whose function documents the options."""

from __future__ import annotations

import re


class ImageCommands:
    """Mixed into :class:`ldm_cli.pipeline.base.Pipeline`."""

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
